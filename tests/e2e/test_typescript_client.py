"""The TypeScript SDK (clients/typescript) against the real stack, and the same explanation decoded in Python.

The SDK's own node:test files do the calls (clients/typescript/test/live.test.ts): this test builds the
package, starts a gateway that serves TLS and requires an API key in front of the session stack's vLLM,
Redis and explainer, runs `node --test` with its address, then fetches the explanation the TypeScript
client decoded with the Python SDK and checks that both give identical matrices and top sources.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
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

pytestmark = pytest.mark.e2e

PACKAGE = Path(__file__).resolve().parents[2] / "clients" / "typescript"
TEST_FILES = ["dist/test/unit.test.js", "dist/test/live.test.js"]
SOURCE_TEST_FILES = [PACKAGE / "test" / "unit.test.ts", PACKAGE / "test" / "live.test.ts"]
# A top-level node:test case in the SDK's sources, e.g. `test("topCells ranks ...", () => {`.
TEST_CASE = re.compile(r"^test\(", re.MULTILINE)
# node:test's TAP summary, e.g. "# pass 12".
SUMMARY_LINE = re.compile(r"^# (tests|pass|fail|cancelled|skipped|todo) (\d+)$", re.MULTILINE)


@dataclass(frozen=True)
class SecuredGateway:
    address: str
    api_key: str
    ca: Path
    tls: TLS


@pytest.fixture(scope="module")
def secured_gateway(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredGateway]:
    """A gateway serving TLS with a throwaway CA's certificate and requiring one API key."""
    authority = CertificateAuthority("ts-server", tmp_path_factory.mktemp("ts-certs"))
    server = authority.issue_server("gateway")
    api_key = new_key()
    tls = TLS.from_files(ca=authority.cert)
    env = {
        "SIGHTLINE_TLS_CERT": str(server.cert),
        "SIGHTLINE_TLS_KEY": str(server.key),
        "SIGHTLINE_API_KEYS": f"ts-client:{hash_key(api_key).hex()}",
    }
    secure = tls.credentials()
    with GatewayProcess(stack, "ts-gateway", env, channel=lambda address: grpc.secure_channel(address, secure)) as gw:
        yield SecuredGateway(gw.address, api_key, authority.cert, tls)


def _node() -> str:
    node = shutil.which("node")
    if node is None or not (PACKAGE / "node_modules" / "typescript").is_dir():
        # Node and the package's dependencies are part of what this checks; `make test` installs both.
        pytest.fail("node or clients/typescript/node_modules is missing; run `make test`, which installs them")
    return node


def test_typescript_client_against_the_stack(
    stack: LocalStack, secured_gateway: SecuredGateway, tmp_path: Path
) -> None:
    node = _node()
    build = subprocess.run(
        [node, "node_modules/typescript/bin/tsc", "-p", "tsconfig.json"],
        cwd=PACKAGE,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, f"tsc failed:\n{build.stdout}{build.stderr}"

    decoded_path = tmp_path / "decoded.json"
    env = {
        **os.environ,
        "SIGHTLINE_TARGET": secured_gateway.address,
        "SIGHTLINE_TLS_CA": str(secured_gateway.ca),
        "SIGHTLINE_API_KEY": secured_gateway.api_key,
        "SIGHTLINE_PLAINTEXT_TARGET": stack.config.gateway_address,
        "SIGHTLINE_DECODED_OUT": str(decoded_path),
    }
    run = subprocess.run(
        [node, "--test", "--test-reporter=tap", *TEST_FILES],
        cwd=PACKAGE,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    summary = {name: int(count) for name, count in SUMMARY_LINE.findall(run.stdout)}
    report = f"node --test exited {run.returncode}; {summary}\n{run.stdout[-20000:]}\n{run.stderr[-5000:]}"
    assert run.returncode == 0, report
    # Every test written in the sources ran and passed: none skipped, cancelled or left out.
    written = sum(len(TEST_CASE.findall(path.read_text())) for path in SOURCE_TEST_FILES)
    assert written >= 17, f"only {written} test cases found in {SOURCE_TEST_FILES}"
    expected = {"tests": written, "pass": written, "fail": 0, "cancelled": 0, "skipped": 0, "todo": 0}
    assert summary == expected, report

    # The explanation the TypeScript client decoded from its SYNC Generate response, fetched again and
    # decoded by the Python SDK: the same float32 cells, int32 extras and ranking, exactly.
    decoded = json.loads(decoded_path.read_text())
    with Client(secured_gateway.address, api_key=secured_gateway.api_key, tls=secured_gateway.tls, timeout=60) as sdk:
        explanation = sdk.get_explanation(decoded["explanationId"])
    assert [token.id for token in explanation.tokens] == decoded["tokenIds"]
    assert list(explanation.target_positions) == decoded["targetPositions"]
    assert explanation.attributions("input_x_gradient").tolist() == decoded["attributions"]
    extras = explanation.result("logit_lens").extras
    assert {name: matrix.tolist() for name, matrix in extras.items()} == decoded["logitLens"]
    assert set(decoded["logitLens"]) == {"top_token_ids", "top_logprobs", "target_logprobs"}
    for content_only, key in ((False, "topSources"), (True, "contentTopSources")):
        python_top_sources = [
            [
                [source.position, source.token.id, source.score]
                for source in explanation.top_sources(index, k=5, content_only=content_only)
            ]
            for index in range(len(explanation.target_positions))
        ]
        assert python_top_sources == decoded[key], key
        assert len(python_top_sources) > 1 and all(len(sources) > 0 for sources in python_top_sources)
