"""Limits checked before anything is generated, and what a rate-limited tenant gets while Redis is down.

Runs against a gateway of its own with API keys and a Redis no worker reads (tests/e2e/isolated_gateway.py), in
front of the session stack's vLLM: its explanation jobs stay unfinished, so a tenant's slots stay taken.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import cast

import grpc
import pytest
from sightline.v1 import explanations_pb2, explanations_pb2_grpc, inference_pb2, inference_pb2_grpc, types_pb2

from common.jobs import tenant_inflight_key
from deploy.local_stack import LocalStack
from server.keys import hash_key, new_key
from tests.e2e.isolated_gateway import IsolatedGateway, isolated_gateway
from tests.vllm_metrics import generated_tokens

pytestmark = pytest.mark.e2e

TENANT_LIMITS = {"serial": {"max_concurrent_explanations": 1}, "burst": {"requests_per_minute": 3}}
ASYNC_LOGIT_LENS = types_pb2.ExplainSpec(
    methods=[types_pb2.MethodSpec(name="logit_lens")], mode=types_pb2.EXPLAIN_MODE_ASYNC
)
HELLO = inference_pb2.GenerationInput(prompt="Hello")


@pytest.fixture(scope="module")
def keys() -> dict[str, str]:
    return {tenant: new_key() for tenant in TENANT_LIMITS}


@pytest.fixture(scope="module")
def gateway(
    stack: LocalStack, keys: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[IsolatedGateway]:
    state_dir = tmp_path_factory.mktemp("admission")
    key_file = state_dir / "keys.json"
    key_file.write_text(
        json.dumps(
            {
                "keys": [{"id": t, "tenant": t, "sha256": hash_key(k).hex()} for t, k in keys.items()],
                "tenants": TENANT_LIMITS,
            }
        )
    )
    with isolated_gateway(stack, "admission-gateway", state_dir, {"SIGHTLINE_API_KEYS_FILE": str(key_file)}) as gw:
        yield gw


@pytest.fixture(scope="module")
def channel(gateway: IsolatedGateway) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(gateway.address) as opened:
        yield opened


def _as(keys: dict[str, str], tenant: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {keys[tenant]}"),)


def _error(call: object) -> grpc.RpcError:
    assert callable(call)
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def _in_flight(gateway: IsolatedGateway, tenant: str) -> set[str]:
    members = cast(list[bytes], gateway.redis.zrange(tenant_inflight_key(tenant), 0, -1))
    return {member.decode() for member in members}


def test_a_tenant_at_its_explanation_limit_is_refused_before_anything_is_generated(
    stack: LocalStack, gateway: IsolatedGateway, channel: grpc.Channel, keys: dict[str, str]
) -> None:
    """Regression (issue 13): Generate and GenerateStream with an explanation generated first, then answered
    RESOURCE_EXHAUSTED, and the generation was lost."""
    inference = inference_pb2_grpc.InferenceServiceStub(channel)
    explanations = explanations_pb2_grpc.ExplanationsServiceStub(channel)
    serial = _as(keys, "serial")
    held = explanations.Explain(
        explanations_pb2.ExplainRequest(prompt_token_ids=[1, 2, 3], output_token_ids=[4], explain=ASYNC_LOGIT_LENS),
        metadata=serial,
        timeout=30,
    )
    assert _in_flight(gateway, "serial") == {held.explanation_id}
    generated_before = generated_tokens(stack.config.vllm_url)

    request = inference_pb2.GenerateRequest(
        input=HELLO, sampling=types_pb2.SamplingParams(max_tokens=8), explain=ASYNC_LOGIT_LENS
    )
    stream_request = inference_pb2.GenerateRequest(
        input=HELLO, sampling=types_pb2.SamplingParams(max_tokens=8), explain=ASYNC_LOGIT_LENS
    )
    unary = _error(lambda: inference.Generate(request, metadata=serial, timeout=60))
    streamed: list[inference_pb2.GenerateStreamResponse] = []
    stream = _error(lambda: streamed.extend(inference.GenerateStream(stream_request, metadata=serial, timeout=60)))

    for error in (unary, stream):
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert "over the max_concurrent_explanations limit of 1 for tenant 'serial'" in error.details()
    assert streamed == []  # refused before the first chunk
    assert generated_tokens(stack.config.vllm_url) == generated_before
    assert _in_flight(gateway, "serial") == {held.explanation_id}


def test_the_slot_taken_before_generating_is_given_back_on_every_failure_and_kept_by_the_job(
    gateway: IsolatedGateway, channel: grpc.Channel, keys: dict[str, str]
) -> None:
    inference = inference_pb2_grpc.InferenceServiceStub(channel)
    serial = _as(keys, "serial")
    gateway.redis.delete(tenant_inflight_key("serial"))

    # vLLM refuses the generation (a token id past the vocabulary): the slot goes back.
    rejected = inference_pb2.GenerateRequest(
        input=inference_pb2.GenerationInput(prompt_token_ids=types_pb2.TokenIds(ids=[1, 10**9])),
        explain=ASYNC_LOGIT_LENS,
    )
    error = _error(lambda: inference.Generate(rejected, metadata=serial, timeout=60))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert _in_flight(gateway, "serial") == set()

    # A stream cancelled part-way: the slot goes back.
    long_stream = inference.GenerateStream(
        inference_pb2.GenerateRequest(
            input=inference_pb2.GenerationInput(prompt="Count from one to one thousand:"),
            sampling=types_pb2.SamplingParams(max_tokens=500),
            explain=ASYNC_LOGIT_LENS,
        ),
        metadata=serial,
        timeout=120,
    )
    next(long_stream)
    long_stream.cancel()
    deadline = time.monotonic() + 30
    while _in_flight(gateway, "serial") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _in_flight(gateway, "serial") == set()

    # A generation whose job is enqueued: the job holds the slot, exactly one, under its own id.
    done = inference.Generate(
        inference_pb2.GenerateRequest(
            input=HELLO, sampling=types_pb2.SamplingParams(max_tokens=2), explain=ASYNC_LOGIT_LENS
        ),
        metadata=serial,
        timeout=60,
    )
    assert done.text and done.explanation_id
    assert _in_flight(gateway, "serial") == {done.explanation_id}
    again = inference_pb2.GenerateRequest(input=HELLO, explain=ASYNC_LOGIT_LENS)
    refused = _error(lambda: inference.Generate(again, metadata=serial, timeout=60))
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_while_redis_is_down_a_rate_limited_tenant_still_generates_within_its_rate(
    gateway: IsolatedGateway, channel: grpc.Channel, keys: dict[str, str]
) -> None:
    """Regression (issue 13): generation without an explanation failed UNAVAILABLE naming "the explanation store"
    for a tenant with requests_per_minute. Runs last: it stops this module's Redis."""
    inference = inference_pb2_grpc.InferenceServiceStub(channel)
    explanations = explanations_pb2_grpc.ExplanationsServiceStub(channel)
    burst = _as(keys, "burst")
    gateway.redis_server.stop()

    plain = inference_pb2.GenerateRequest(input=HELLO, sampling=types_pb2.SamplingParams(max_tokens=2))
    for _ in range(3):
        assert inference.Generate(plain, metadata=burst, timeout=60).text
    over = _error(lambda: inference.Generate(plain, metadata=burst, timeout=60))
    assert over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, over.details()
    assert over.details().startswith(
        "too many requests (counted by this gateway alone while Redis is unreachable), over the requests_per_minute "
        "limit of 3 for tenant 'burst'"
    )
    # What needs Redis itself still says so.
    listing = explanations_pb2.ListMethodsRequest()
    store = _error(lambda: explanations.ListMethods(listing, metadata=_as(keys, "serial"), timeout=30))
    assert store.code() == grpc.StatusCode.UNAVAILABLE
    assert "the explanation store (Redis at" in store.details()
