"""A client cancels an explained stream mid-generation: vLLM stops generating and no explanation job is left.

Cancelling breaks nothing, so this runs on the session's stack.
"""

from __future__ import annotations

import grpc
import pytest
import redis
from sightline.v1 import inference_pb2, inference_pb2_grpc, types_pb2

from common.jobs import JOB_STREAM
from deploy.local_stack import LocalStack
from tests.faults.cluster import wait_until
from tests.vllm_metrics import generated_tokens, requests_running

pytestmark = pytest.mark.e2e

MAX_TOKENS = 1000


def test_cancelled_explained_stream_aborts_vllm_and_enqueues_nothing(
    inference: inference_pb2_grpc.InferenceServiceStub, stack: LocalStack, request: pytest.FixtureRequest
) -> None:
    vllm_url = stack.config.vllm_url
    store = redis.Redis.from_url(stack.config.redis_url)
    request.addfinalizer(store.close)
    jobs_before = store.xlen(JOB_STREAM)
    records_before = set(store.scan_iter("sl:exp:*"))
    tokens_before = generated_tokens(vllm_url)

    call = inference.GenerateStream(
        inference_pb2.GenerateRequest(
            input=inference_pb2.GenerationInput(prompt="Count from one to one thousand:"),
            sampling=types_pb2.SamplingParams(max_tokens=MAX_TOKENS),
            explain=types_pb2.ExplainSpec(
                methods=[types_pb2.MethodSpec(name="saliency")], mode=types_pb2.EXPLAIN_MODE_SYNC
            ),
        ),
        timeout=120,
    )
    streamed = 0
    for chunk in call:
        streamed += len(chunk.delta.output_tokens)
        if streamed >= 3:
            break
    call.cancel()
    with pytest.raises(grpc.RpcError) as caught:
        list(call)
    assert caught.value.code() == grpc.StatusCode.CANCELLED

    # vLLM drops the request within seconds; the 1,000 tokens would take it far longer.
    wait_until(lambda: requests_running(vllm_url) == 0, 10, "vLLM to abort the cancelled stream", interval=0.2)
    assert generated_tokens(vllm_url) - tokens_before < MAX_TOKENS
    # A call through the same gateway completes after the cancelled one's handler has ended...
    after = inference.Generate(
        inference_pb2.GenerateRequest(
            input=inference_pb2.GenerationInput(prompt="Hello"), sampling=types_pb2.SamplingParams(max_tokens=2)
        ),
        timeout=60,
    )
    assert len(after.output_tokens) == 2
    # ...and the cancelled stream left no job and no PENDING record behind.
    assert store.xlen(JOB_STREAM) == jobs_before
    assert set(store.scan_iter("sl:exp:*")) == records_before
