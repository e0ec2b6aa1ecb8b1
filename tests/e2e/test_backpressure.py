"""Backpressure: past SIGHTLINE_MAX_QUEUED_EXPLANATIONS unfinished jobs, new explanations get RESOURCE_EXHAUSTED.

Runs against a gateway of its own with a bound of 3 and a Redis no worker reads (tests/e2e/isolated_gateway.py),
so the queue fills on purpose. Finishing a job is done here the way a worker finishes one: XREADGROUP, then XACK.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import cast

import grpc
import httpx
import pytest
from sightline.v1 import explanations_pb2, explanations_pb2_grpc, inference_pb2, inference_pb2_grpc, types_pb2

from common.jobs import JOB_STREAM, WORKER_GROUP
from deploy.local_stack import LocalStack
from tests.e2e.isolated_gateway import IsolatedGateway, isolated_gateway

pytestmark = pytest.mark.e2e

BOUND = 3
LOGIT_LENS_ASYNC = types_pb2.ExplainSpec(
    methods=[types_pb2.MethodSpec(name="logit_lens")], mode=types_pb2.EXPLAIN_MODE_ASYNC
)


@pytest.fixture(scope="module")
def bounded(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[IsolatedGateway]:
    env = {"SIGHTLINE_MAX_QUEUED_EXPLANATIONS": str(BOUND)}
    with isolated_gateway(stack, "bounded-gateway", tmp_path_factory.mktemp("bounded-gateway"), env) as gateway:
        yield gateway


def _explain(channel: grpc.Channel) -> explanations_pb2.ExplainResponse:
    response: explanations_pb2.ExplainResponse = explanations_pb2_grpc.ExplanationsServiceStub(channel).Explain(
        explanations_pb2.ExplainRequest(prompt_token_ids=[1, 2, 3], output_token_ids=[4], explain=LOGIT_LENS_ASYNC),
        timeout=30,
    )
    return response


def _refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
    return caught.value


def _prompt_tokens_served(stack: LocalStack) -> float:
    """vLLM's count of prompt tokens it has processed: it moves with every generation."""
    metrics = httpx.get(f"{stack.config.vllm_url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith("vllm:prompt_tokens_total")
    )


def test_explanations_past_the_bound_are_refused_until_a_job_finishes(
    bounded: IsolatedGateway, stack: LocalStack
) -> None:
    with grpc.insecure_channel(bounded.address) as channel:
        inference = inference_pb2_grpc.InferenceServiceStub(channel)
        for _ in range(BOUND):
            _explain(channel)
        assert bounded.redis.xlen(JOB_STREAM) == BOUND

        error = _refused(lambda: _explain(channel))
        assert error.details().startswith(
            f"the explanation queue holds {BOUND} unfinished jobs, at this deployment's bound of {BOUND} "
            "(SIGHTLINE_MAX_QUEUED_EXPLANATIONS)"
        )
        assert bounded.redis.xlen(JOB_STREAM) == BOUND, "the refused request queued nothing"

        # An explained generation is refused before generating: vLLM sees no request.
        served = _prompt_tokens_served(stack)
        explained = inference_pb2.GenerateRequest(
            input=inference_pb2.GenerationInput(prompt="Hello"),
            sampling=types_pb2.SamplingParams(max_tokens=2),
            explain=LOGIT_LENS_ASYNC,
        )
        _refused(lambda: inference.Generate(explained, timeout=30))
        streamed = inference_pb2.GenerateRequest(
            input=explained.input, sampling=explained.sampling, explain=explained.explain
        )
        _refused(lambda: list(inference.GenerateStream(streamed, timeout=30)))
        assert _prompt_tokens_served(stack) == served

        # Generation without an explanation is not held back.
        plain = inference.Generate(
            inference_pb2.GenerateRequest(input=explained.input, sampling=explained.sampling), timeout=60
        )
        assert len(plain.output_tokens) == 2

        # A job a worker has read but not finished still counts.
        read = bounded.redis.xreadgroup(WORKER_GROUP, "test-worker", {JOB_STREAM: ">"}, count=1)
        entry_id = cast(list[tuple[bytes, list[tuple[bytes, object]]]], read)[0][1][0][0]
        _refused(lambda: _explain(channel))

        # Finishing it makes room for exactly one more.
        bounded.redis.xack(JOB_STREAM, WORKER_GROUP, entry_id)
        assert _explain(channel).explanation_id.startswith("exp_")
        _refused(lambda: _explain(channel))
        assert bounded.serving()


def test_concurrent_requests_do_not_pass_the_bound_together(bounded: IsolatedGateway) -> None:
    """48 requests at once for 3 places: without one enqueue at a time, several saw room and all took it."""
    # Finish every job so far, as workers would: read what is unread, acknowledge everything.
    bounded.redis.xreadgroup(WORKER_GROUP, "test-worker", {JOB_STREAM: ">"}, count=1000)
    pending = cast(list[dict[str, bytes]], bounded.redis.xpending_range(JOB_STREAM, WORKER_GROUP, "-", "+", 1000))
    if pending:
        bounded.redis.xack(JOB_STREAM, WORKER_GROUP, *(entry["message_id"] for entry in pending))
    queued = bounded.redis.xlen(JOB_STREAM)
    request = explanations_pb2.ExplainRequest(
        prompt_token_ids=[1, 2, 3], output_token_ids=[4], explain=LOGIT_LENS_ASYNC
    )
    with grpc.insecure_channel(bounded.address) as channel:
        explain = explanations_pb2_grpc.ExplanationsServiceStub(channel).Explain
        calls = [explain.future(request, timeout=30) for _ in range(16 * BOUND)]
        codes = Counter(call.code().name for call in calls)
    assert codes == {"OK": BOUND, "RESOURCE_EXHAUSTED": 15 * BOUND}
    assert bounded.redis.xlen(JOB_STREAM) == queued + BOUND
