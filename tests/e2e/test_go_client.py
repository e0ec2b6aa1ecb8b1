"""The Go client (clients/go) against the real stack: its live tests (ListMethods, a SYNC explanation, the stream,
GetExplanation, UNAUTHENTICATED and INVALID_ARGUMENT as typed errors, an API key over TLS), the README's France
example, and the same explanation decoded in Go and by the Python SDK giving identical matrices and top sources."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from sightline import TLS, Client

from deploy.local_stack import LocalStack
from server.keys import hash_key, new_key
from tests.certs import CertificateAuthority
from tests.gateway_process import GatewayProcess
from tests.go_client import prepare_go_module, run_go

pytestmark = pytest.mark.e2e

LIVE_TESTS = (
    "TestLiveListMethods",
    "TestLiveGenerateWithSyncExplanation",
    "TestLiveGenerateStream",
    "TestLiveBadRequestsAreInvalidArgument",
    "TestLiveAPIKeyOverTLS",
)
# One line per top source, as the example prints it: position, quoted token text, signed score.
SOURCE_LINE = re.compile(r'^(\d+) "(?:[^"\\]|\\.)*" [+-]\d+\.\d{4}$')


@dataclass(frozen=True)
class SecuredGateway:
    address: str
    api_key: str
    ca: Path


@pytest.fixture(scope="module")
def secured_gateway(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredGateway]:
    """A gateway that serves TLS only and requires an API key, in front of the session stack."""
    authority = CertificateAuthority("server", tmp_path_factory.mktemp("certs"))
    server = authority.issue_server("gateway")
    key = new_key()
    env = {
        "SIGHTLINE_TLS_CERT": str(server.cert),
        "SIGHTLINE_TLS_KEY": str(server.key),
        "SIGHTLINE_API_KEYS": f"acme:{hash_key(key).hex()}",
    }
    credentials = TLS.from_files(ca=authority.cert).credentials()
    with GatewayProcess(
        stack, "go-secured-gateway", env, channel=lambda address: grpc.secure_channel(address, credentials)
    ) as gateway:
        yield SecuredGateway(gateway.address, key, authority.cert)


def test_go_live_tests_and_cross_language_decoding(
    stack: LocalStack, secured_gateway: SecuredGateway, tmp_path: Path
) -> None:
    prepare_go_module()
    dump = tmp_path / "go-explanation.json"
    env = {
        "SIGHTLINE_TEST_TARGET": stack.config.gateway_address,
        "SIGHTLINE_TEST_SECURED_TARGET": secured_gateway.address,
        "SIGHTLINE_TEST_API_KEY": secured_gateway.api_key,
        "SIGHTLINE_TEST_CA": str(secured_gateway.ca),
        "SIGHTLINE_TEST_DUMP": str(dump),
    }
    tested = run_go("test", "-count=1", "-v", "-timeout=15m", "-run", "^TestLive", "./sightline", env=env, timeout=1000)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    for live_test in LIVE_TESTS:
        assert f"--- PASS: {live_test}" in tested.stdout, tested.stdout
    assert "--- SKIP" not in tested.stdout

    decoded = json.loads(dump.read_text())
    with Client(stack.config.gateway_address, timeout=120) as client:
        explanation = client.get_explanation(decoded["explanation_id"])
    assert sorted(decoded["matrices"]) == ["input_x_gradient"]
    # Go widened each float32 to float64, as array('f').tolist() does: equal means bit for bit.
    assert decoded["matrices"]["input_x_gradient"] == explanation.attributions("input_x_gradient").tolist()
    for key, content_only in (("top_sources", False), ("top_content_sources", True)):
        python_sources = [
            [
                {"position": s.position, "token_id": s.token.id, "text": s.token.text, "score": s.score}
                for s in explanation.top_sources(target, k=5, method="input_x_gradient", content_only=content_only)
            ]
            for target in range(len(explanation.target_positions))
        ]
        assert decoded[key]["input_x_gradient"] == python_sources, key


def test_go_france_example(stack: LocalStack) -> None:
    prepare_go_module()
    ran = run_go("run", "./examples/france", "-target", stack.config.gateway_address)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    text, fidelity, *sources = ran.stdout.splitlines()
    assert "Paris" in text
    assert 0 <= float(fidelity) < 0.02
    assert len(sources) == 3 and all(SOURCE_LINE.match(line) for line in sources), ran.stdout
