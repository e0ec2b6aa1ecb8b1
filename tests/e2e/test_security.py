"""Security end to end: API keys, tenant isolation, per-tenant limits, message size, TLS and mutual TLS.

Each configuration runs in its own gateway process (tests/gateway_process.py) in front of the session
stack's vLLM, Redis and explainer; the session's own gateway keeps running without authentication.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sightline import TLS, Client, SightlineError, cli
from sightline.v1 import explanations_pb2, explanations_pb2_grpc, inference_pb2, inference_pb2_grpc, types_pb2

from deploy.local_stack import LocalStack
from server.auth import INVALID_KEY, MISSING_KEY, NOT_BEARER
from server.keys import hash_key, new_key
from tests.certs import CertificateAuthority, Pem
from tests.gateway_process import ChannelFactory, GatewayProcess

pytestmark = pytest.mark.e2e

# Tenants of the authenticated gateway, each with the limits its tests need (0 or absent: none).
TENANT_LIMITS: dict[str, dict[str, float]] = {
    "acme": {},
    "globex": {},
    "auditor": {},
    "burst": {"requests_per_minute": 3},
    "serial": {"max_concurrent_explanations": 1},
    "small": {"max_prompt_tokens": 8, "max_tokens": 4, "max_explanation_cost": 500},
}
MAX_REQUEST_BYTES = 16 * 1024
# Token ids of the embedded model's vocabulary: a short prompt and output to explain.
PROMPT_IDS = [504, 3575, 282, 4649, 314]
OUTPUT_IDS = [7042, 30]
CHEAP_METHOD = types_pb2.MethodSpec(name="logit_lens")


@dataclass(frozen=True)
class KeyedGateway:
    address: str
    keys: dict[str, str]
    key_file: Path
    process: GatewayProcess


@pytest.fixture(scope="module")
def secured(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyedGateway]:
    """A plaintext gateway that requires API keys, with per-tenant limits and a small request size limit."""
    keys = {tenant: new_key() for tenant in TENANT_LIMITS}
    key_file = tmp_path_factory.mktemp("keys") / "keys.json"
    key_file.write_text(
        json.dumps(
            {
                "keys": [
                    {"id": f"{tenant}-1", "tenant": tenant, "sha256": hash_key(key).hex()}
                    for tenant, key in keys.items()
                ],
                "tenants": {tenant: limits for tenant, limits in TENANT_LIMITS.items() if limits},
            }
        )
    )
    env = {"SIGHTLINE_API_KEYS_FILE": str(key_file), "SIGHTLINE_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES)}
    with GatewayProcess(stack, "secured-gateway", env) as process:
        yield KeyedGateway(process.address, keys, key_file, process)


@pytest.fixture(scope="module")
def secured_channel(secured: KeyedGateway) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(secured.address) as channel:
        yield channel


def as_tenant(gateway: KeyedGateway, tenant: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {gateway.keys[tenant]}"),)


def explain_request(
    mode: types_pb2.ExplainMode = types_pb2.EXPLAIN_MODE_ASYNC, method: types_pb2.MethodSpec = CHEAP_METHOD
) -> explanations_pb2.ExplainRequest:
    return explanations_pb2.ExplainRequest(
        prompt_token_ids=PROMPT_IDS,
        output_token_ids=OUTPUT_IDS,
        explain=types_pb2.ExplainSpec(methods=[method], mode=mode),
    )


def rpc_error(call: object) -> grpc.RpcError:
    assert callable(call)
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


# --- authentication ------------------------------------------------------------------------------------------


def test_health_and_reflection_need_no_key(secured_channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(secured_channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING

    reflection = reflection_pb2_grpc.ServerReflectionStub(secured_channel)
    replies = list(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    services = {service.name for service in replies[0].list_services_response.service}
    assert {"sightline.v1.InferenceService", "sightline.v1.ExplanationsService"} <= services


def test_every_other_rpc_needs_a_key(secured_channel: grpc.Channel) -> None:
    explanations = explanations_pb2_grpc.ExplanationsServiceStub(secured_channel)
    inference = inference_pb2_grpc.InferenceServiceStub(secured_channel)
    generate = inference_pb2.GenerateRequest(input=inference_pb2.GenerationInput(prompt="Hello"))
    calls = {
        "ListMethods": lambda: explanations.ListMethods(explanations_pb2.ListMethodsRequest(), timeout=10),
        "ListExplanations": lambda: explanations.ListExplanations(
            explanations_pb2.ListExplanationsRequest(), timeout=10
        ),
        "GetExplanation": lambda: explanations.GetExplanation(
            explanations_pb2.GetExplanationRequest(explanation_id="exp_x"), timeout=10
        ),
        "Explain": lambda: explanations.Explain(explain_request(), timeout=10),
        "Generate": lambda: inference.Generate(generate, timeout=10),
        "GenerateStream": lambda: list(inference.GenerateStream(generate, timeout=10)),
    }
    for name, call in calls.items():
        error = rpc_error(call)
        assert (error.code(), error.details()) == (grpc.StatusCode.UNAUTHENTICATED, MISSING_KEY), name


def test_a_wrong_or_malformed_key_is_refused_and_a_good_one_accepted(
    secured: KeyedGateway, secured_channel: grpc.Channel
) -> None:
    explanations = explanations_pb2_grpc.ExplanationsServiceStub(secured_channel)
    request = explanations_pb2.ListMethodsRequest()
    for metadata, message in [
        ((("authorization", "Bearer sl_not-a-key"),), INVALID_KEY),
        ((("authorization", f"Bearer {secured.keys['acme']}x"),), INVALID_KEY),
        ((("authorization", secured.keys["acme"]),), NOT_BEARER),
    ]:
        error = rpc_error(lambda metadata=metadata: explanations.ListMethods(request, metadata=metadata, timeout=10))
        assert (error.code(), error.details()) == (grpc.StatusCode.UNAUTHENTICATED, message)

    methods = explanations.ListMethods(request, metadata=as_tenant(secured, "acme"), timeout=10)
    assert "logit_lens" in {info.name for info in methods.methods}
    with Client(secured.address, api_key=secured.keys["acme"], timeout=10) as client:
        assert "logit_lens" in {info.name for info in client.list_methods()}


def test_a_key_added_to_or_removed_from_the_file_applies_without_a_restart(
    secured: KeyedGateway, secured_channel: grpc.Channel
) -> None:
    explanations = explanations_pb2_grpc.ExplanationsServiceStub(secured_channel)

    def status_for(key: str) -> grpc.StatusCode:
        try:
            metadata = (("authorization", f"Bearer {key}"),)
            explanations.ListMethods(explanations_pb2.ListMethodsRequest(), metadata=metadata, timeout=10)
        except grpc.RpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    def replace_key_file(text: str) -> None:
        # As an operator should: write beside it, then rename over it, so no call sees half a file.
        staged = secured.key_file.with_suffix(".staged")
        staged.write_text(text)
        staged.replace(secured.key_file)

    def eventually(key: str, expected: grpc.StatusCode) -> None:
        deadline = time.monotonic() + 10
        while (status := status_for(key)) != expected and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status == expected

    original = secured.key_file.read_text()
    newcomer = new_key()
    document = json.loads(original)
    document["keys"].append({"id": "newcomer-1", "tenant": "newcomer", "sha256": hash_key(newcomer).hex()})
    assert status_for(newcomer) == grpc.StatusCode.UNAUTHENTICATED
    try:
        replace_key_file(json.dumps(document))
        eventually(newcomer, grpc.StatusCode.OK)
        replace_key_file(original)  # revoked
        eventually(newcomer, grpc.StatusCode.UNAUTHENTICATED)
    finally:
        replace_key_file(original)
    assert status_for(secured.keys["acme"]) == grpc.StatusCode.OK
    assert "reloaded" in secured.process.log()


def test_the_open_gateway_warns_and_the_keyed_one_does_not(stack: LocalStack, secured: KeyedGateway) -> None:
    open_log = next(child for child in stack.children if child.name == "gateway").log_path.read_text()
    assert "WARNING" in open_log and "AUTHENTICATION IS OFF" in open_log
    assert "AUTHENTICATION IS OFF" not in secured.process.log()
    assert "API keys required" in secured.process.log()


def test_a_key_file_holding_a_clear_key_stops_the_gateway(stack: LocalStack, tmp_path: Path) -> None:
    key_file = tmp_path / "keys.json"
    key_file.write_text(json.dumps({"keys": [{"id": "k", "tenant": "acme", "key": "sl_plain"}]}))
    refused = GatewayProcess(stack, "refused-gateway", {"SIGHTLINE_API_KEYS_FILE": str(key_file)})
    assert refused.exit_code() == 2
    assert f"cannot start: {key_file}: keys[0] holds a key in clear; store its sha256" in refused.log()


# --- tenant isolation ----------------------------------------------------------------------------------------


def test_another_tenants_explanation_is_not_found_exactly_like_an_unknown_one(
    secured: KeyedGateway, secured_channel: grpc.Channel, channel: grpc.Channel
) -> None:
    explanations = explanations_pb2_grpc.ExplanationsServiceStub(secured_channel)
    acme, globex = as_tenant(secured, "acme"), as_tenant(secured, "globex")
    created = explanations.Explain(explain_request(), metadata=acme, timeout=60)
    explanation_id = created.explanation_id
    unknown_id = "exp_" + "0" * 32

    def fetch(explanation_id: str, metadata: tuple[tuple[str, str]], wait: float = 0) -> grpc.RpcError:
        request = explanations_pb2.GetExplanationRequest(explanation_id=explanation_id, wait_seconds=wait)
        return rpc_error(lambda: explanations.GetExplanation(request, metadata=metadata, timeout=30))

    # Replaying acme's id as globex, also asking to wait for it, is indistinguishable from a made-up id.
    for error in (fetch(explanation_id, globex), fetch(explanation_id, globex, wait=5)):
        assert error.code() == grpc.StatusCode.NOT_FOUND
        unknown = fetch(unknown_id, globex)
        assert unknown.code() == grpc.StatusCode.NOT_FOUND
        assert error.details().replace(explanation_id, "ID") == unknown.details().replace(unknown_id, "ID")
    # The unauthenticated session gateway shares the store, and its open tenant cannot read it either.
    open_stub = explanations_pb2_grpc.ExplanationsServiceStub(channel)
    open_error = rpc_error(
        lambda: open_stub.GetExplanation(explanations_pb2.GetExplanationRequest(explanation_id=explanation_id))
    )
    assert open_error.code() == grpc.StatusCode.NOT_FOUND

    owned = explanations.GetExplanation(
        explanations_pb2.GetExplanationRequest(explanation_id=explanation_id, wait_seconds=120),
        metadata=acme,
        timeout=150,
    )
    assert owned.explanation.state == types_pb2.EXPLANATION_STATE_SUCCEEDED, owned.explanation.error


def test_list_explanations_shows_only_ones_own_newest_first_in_pages(
    secured: KeyedGateway, secured_channel: grpc.Channel
) -> None:
    explanations = explanations_pb2_grpc.ExplanationsServiceStub(secured_channel)
    auditor, globex = as_tenant(secured, "auditor"), as_tenant(secured, "globex")
    created = [explanations.Explain(explain_request(), metadata=auditor, timeout=60) for _ in range(3)]
    foreign = explanations.Explain(explain_request(), metadata=globex, timeout=60)
    for response in created:
        explanations.GetExplanation(
            explanations_pb2.GetExplanationRequest(explanation_id=response.explanation_id, wait_seconds=120),
            metadata=auditor,
            timeout=150,
        )

    first = explanations.ListExplanations(
        explanations_pb2.ListExplanationsRequest(page_size=2), metadata=auditor, timeout=10
    )
    assert first.next_page_token and first.request_id and first.trace_id
    second = explanations.ListExplanations(
        explanations_pb2.ListExplanationsRequest(page_size=2, page_token=first.next_page_token),
        metadata=auditor,
        timeout=10,
    )
    assert second.next_page_token == ""
    listed = [*first.explanations, *second.explanations]
    assert [s.explanation_id for s in listed] == [r.explanation_id for r in reversed(created)]
    for summary, response in zip(listed, reversed(created), strict=True):
        assert summary.state == types_pb2.EXPLANATION_STATE_SUCCEEDED
        assert (summary.model, list(summary.methods)) == ("smollm2-135m-instruct", ["logit_lens"])
        assert summary.trace_id == response.trace_id
        assert summary.created_at.seconds > 0
    globex_ids = [
        s.explanation_id
        for s in explanations.ListExplanations(
            explanations_pb2.ListExplanationsRequest(page_size=100), metadata=globex, timeout=10
        ).explanations
    ]
    assert foreign.explanation_id in globex_ids
    assert not {r.explanation_id for r in created} & set(globex_ids)

    for request, message in [
        (explanations_pb2.ListExplanationsRequest(page_token="bm90IGEgdG9rZW4="), "page_token is not one"),
        (explanations_pb2.ListExplanationsRequest(page_size=-1), "page_size must be >= 0"),
    ]:
        error = rpc_error(lambda request=request: explanations.ListExplanations(request, metadata=auditor, timeout=10))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.details()

    with Client(secured.address, api_key=secured.keys["auditor"], timeout=10) as client:
        page = client.list_explanations(page_size=3)
    assert [s.explanation_id for s in page.explanations] == [r.explanation_id for r in reversed(created)]


# --- limits --------------------------------------------------------------------------------------------------


def exhausted(call: object) -> str:
    error = rpc_error(call)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    details: str = error.details()
    return details


def test_request_rate_is_limited_per_tenant_with_a_retry_time(
    secured: KeyedGateway, secured_channel: grpc.Channel
) -> None:
    explanations = explanations_pb2_grpc.ExplanationsServiceStub(secured_channel)
    burst, request = as_tenant(secured, "burst"), explanations_pb2.ListMethodsRequest()
    for _ in range(3):
        explanations.ListMethods(request, metadata=burst, timeout=10)
    message = exhausted(lambda: explanations.ListMethods(request, metadata=burst, timeout=10))
    assert "over the requests_per_minute limit of 3 for tenant 'burst'" in message
    retry = re.search(r"retry in ([0-9.]+) s", message)
    assert retry and 0 < float(retry.group(1)) <= 20
    # Other tenants are not held back.
    explanations.ListMethods(request, metadata=as_tenant(secured, "acme"), timeout=10)


def test_concurrent_explanations_are_limited_until_one_finishes(
    secured: KeyedGateway, secured_channel: grpc.Channel
) -> None:
    explanations = explanations_pb2_grpc.ExplanationsServiceStub(secured_channel)
    serial = as_tenant(secured, "serial")
    # A job of seconds (16 integration steps), so that it is still unfinished when the next one is asked for.
    slow = types_pb2.MethodSpec(name="integrated_gradients")
    first = explanations.Explain(explain_request(method=slow), metadata=serial, timeout=60)
    message = exhausted(lambda: explanations.Explain(explain_request(), metadata=serial, timeout=60))
    assert "over the max_concurrent_explanations limit of 1 for tenant 'serial'" in message

    finished = explanations.GetExplanation(
        explanations_pb2.GetExplanationRequest(explanation_id=first.explanation_id, wait_seconds=120),
        metadata=serial,
        timeout=150,
    )
    assert finished.explanation.state == types_pb2.EXPLANATION_STATE_SUCCEEDED, finished.explanation.error
    # The worker gave the slot back with the final record.
    explanations.Explain(explain_request(types_pb2.EXPLAIN_MODE_SYNC), metadata=serial, timeout=120)


def test_prompt_tokens_max_tokens_and_cost_are_limited_per_tenant(
    secured: KeyedGateway, secured_channel: grpc.Channel
) -> None:
    inference = inference_pb2_grpc.InferenceServiceStub(secured_channel)
    explanations = explanations_pb2_grpc.ExplanationsServiceStub(secured_channel)
    small = as_tenant(secured, "small")

    def generate(**fields: object) -> inference_pb2.GenerateResponse:
        request = inference_pb2.GenerateRequest(**fields)  # type: ignore[arg-type]
        response: inference_pb2.GenerateResponse = inference.Generate(request, metadata=small, timeout=60)
        return response

    short = inference_pb2.GenerationInput(prompt_token_ids=types_pb2.TokenIds(ids=PROMPT_IDS))
    # Without max_tokens the deployment default (64) is cut to the tenant's limit rather than refused.
    assert len(generate(input=short, sampling=types_pb2.SamplingParams(temperature=0)).output_tokens) <= 4
    message = exhausted(lambda: generate(input=short, sampling=types_pb2.SamplingParams(max_tokens=5)))
    assert message.startswith("sampling.max_tokens is 5, over the max_tokens limit of 4 for tenant 'small'")

    long_ids = inference_pb2.GenerationInput(prompt_token_ids=types_pb2.TokenIds(ids=PROMPT_IDS * 2))
    message = exhausted(lambda: generate(input=long_ids))
    assert message.startswith("the prompt has 10 tokens, over the max_prompt_tokens limit of 8 for tenant 'small'")
    # A text prompt is counted in tokens too (about 13 here), not in characters.
    long_text = inference_pb2.GenerationInput(prompt="The quick brown fox jumps over the lazy dog again and again")
    assert "over the max_prompt_tokens limit of 8" in exhausted(lambda: generate(input=long_text))
    message = exhausted(
        lambda: explanations.Explain(
            explanations_pb2.ExplainRequest(prompt_token_ids=PROMPT_IDS * 2, output_token_ids=OUTPUT_IDS,
                                            explain=types_pb2.ExplainSpec(methods=[CHEAP_METHOD])),
            metadata=small,
            timeout=60,
        )
    )  # fmt: skip
    assert "over the max_prompt_tokens limit of 8" in message

    costly = types_pb2.MethodSpec(name="integrated_gradients")
    message = exhausted(lambda: explanations.Explain(explain_request(method=costly), metadata=small, timeout=60))
    assert "token-forward passes" in message and "over the max_explanation_cost limit of 500 for tenant" in message


def test_an_oversized_request_is_resource_exhausted(secured: KeyedGateway, secured_channel: grpc.Channel) -> None:
    explanations = explanations_pb2_grpc.ExplanationsServiceStub(secured_channel)
    oversized = explanations_pb2.ExplainRequest(
        prompt_token_ids=[40_000] * 8_000, explain=types_pb2.ExplainSpec(methods=[CHEAP_METHOD])
    )
    assert oversized.ByteSize() > MAX_REQUEST_BYTES
    error = rpc_error(lambda: explanations.Explain(oversized, metadata=as_tenant(secured, "acme"), timeout=30))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in error.details()
    # The gateway is unharmed.
    explanations.ListMethods(explanations_pb2.ListMethodsRequest(), metadata=as_tenant(secured, "acme"), timeout=10)


# --- TLS -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    server_ca: CertificateAuthority
    server: Pem
    client_ca: CertificateAuthority
    client: Pem
    stranger: Pem


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    directory = tmp_path_factory.mktemp("certs")
    server_ca = CertificateAuthority("server", directory)
    client_ca = CertificateAuthority("clients", directory)
    return Certificates(
        server_ca=server_ca,
        server=server_ca.issue_server("gateway"),
        client_ca=client_ca,
        client=client_ca.issue_client("acme-client"),
        # Signed by a CA the gateway does not trust for clients.
        stranger=CertificateAuthority("stranger", directory).issue_client("stranger-client"),
    )


def tls_channel(certs: Certificates, client: Pem | None = None) -> TLS:
    return TLS.from_files(
        ca=certs.server_ca.cert, cert=client.cert if client else None, key=client.key if client else None
    )


def secure_factory(tls: TLS) -> ChannelFactory:
    return lambda address: grpc.secure_channel(address, tls.credentials())


def list_methods_error(address: str, key: str, tls: TLS | bool) -> grpc.StatusCode:
    with Client(address, api_key=key, tls=tls, timeout=10) as client, pytest.raises(SightlineError) as refused:
        client.list_methods()
    return refused.value.code


def tls_env(certs: Certificates, key: str) -> dict[str, str]:
    return {
        "SIGHTLINE_TLS_CERT": str(certs.server.cert),
        "SIGHTLINE_TLS_KEY": str(certs.server.key),
        "SIGHTLINE_API_KEYS": f"acme:{hash_key(key).hex()}",
    }


def test_tls_serves_trusted_clients_and_refuses_plaintext(
    stack: LocalStack, certificates: Certificates, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    key = new_key()
    tls = tls_channel(certificates)
    with GatewayProcess(stack, "tls-gateway", tls_env(certificates, key), channel=secure_factory(tls)) as gateway:
        with Client(gateway.address, api_key=key, tls=tls, timeout=60) as client:
            assert "logit_lens" in {info.name for info in client.list_methods()}
            generation = client.generate(PROMPT_IDS, max_tokens=2)
            assert len(generation.output_tokens) == 2
        assert list_methods_error(gateway.address, "sl_wrong", tls) == grpc.StatusCode.UNAUTHENTICATED
        assert list_methods_error(gateway.address, key, False) == grpc.StatusCode.UNAVAILABLE  # plaintext
        assert list_methods_error(gateway.address, key, True) == grpc.StatusCode.UNAVAILABLE  # system CAs: not ours

        monkeypatch.setenv("SIGHTLINE_API_KEY", key)
        capsys.readouterr()
        cli_args = ["--target", gateway.address, "--tls-ca", str(certificates.server_ca.cert), "methods"]
        assert cli.main(cli_args) == 0
        assert "logit_lens" in capsys.readouterr().out
        assert "plaintext gRPC" not in gateway.log() and "(TLS;" in gateway.log()


def test_mutual_tls_needs_a_client_certificate_from_the_trusted_ca(
    stack: LocalStack, certificates: Certificates
) -> None:
    key = new_key()
    env = {**tls_env(certificates, key), "SIGHTLINE_TLS_CLIENT_CA": str(certificates.client_ca.cert)}
    mutual = tls_channel(certificates, certificates.client)
    with GatewayProcess(stack, "mtls-gateway", env, channel=secure_factory(mutual)) as gateway:
        with Client(gateway.address, api_key=key, tls=mutual, timeout=60) as client:
            assert "logit_lens" in {info.name for info in client.list_methods()}
        without_certificate = tls_channel(certificates)
        assert list_methods_error(gateway.address, key, without_certificate) == grpc.StatusCode.UNAVAILABLE
        untrusted_certificate = tls_channel(certificates, certificates.stranger)
        assert list_methods_error(gateway.address, key, untrusted_certificate) == grpc.StatusCode.UNAVAILABLE
        assert "mutual TLS, client certificates required" in gateway.log()
