"""SIGTERM: workers finish or hand back the job in hand; the gateway drains its calls, up to a grace period."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import pytest
from sightline.v1 import explanations_pb2, inference_pb2, types_pb2

from common.jobs import JOB_STREAM
from deploy.local_stack import Child
from tests.faults.cluster import (
    EXPLANATIONS_SERVICE,
    INFERENCE_SERVICE,
    NOT_SERVING,
    SERVING,
    FaultCluster,
    explain_request,
    wait_until,
)
from tests.vllm_metrics import generated_tokens, requests_running, requests_waiting

pytestmark = pytest.mark.e2e

CLAIM_IDLE_MS = 30_000
# Long enough for any job or call of these tests to finish on a loaded machine.
LONG_GRACE = "120"
SHORT_GRACE = 1.0
FAIL_FAST_SECONDS = 1.0
COUNT = inference_pb2.GenerationInput(prompt="Count from one to one thousand:")


@pytest.fixture(scope="module")
def cluster(vllm_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultCluster]:
    cluster = FaultCluster(
        tmp_path_factory.mktemp("graceful-shutdown"),
        vllm_port=vllm_port,
        env={
            "SIGHTLINE_CLAIM_IDLE_MS": str(CLAIM_IDLE_MS),
            "SIGHTLINE_WORKER_SHUTDOWN_GRACE_SECONDS": LONG_GRACE,
            "SIGHTLINE_SHUTDOWN_GRACE_SECONDS": LONG_GRACE,
            "SIGHTLINE_HEALTH_INTERVAL_SECONDS": "0.5",
        },
    )
    try:
        cluster.start_serving()
        yield cluster
    finally:
        cluster.close()


def _terminate(child: Child) -> None:
    child.process.send_signal(signal.SIGTERM)


def _wait_until_vllm_runs(generation: Future[object], vllm_url: str, gateway: Child) -> None:
    """Until vLLM runs the generation; fail with what became of the call if it ended first or never ran."""

    def running_or_ended() -> bool:
        return requests_running(vllm_url) > 0 or generation.done()

    try:
        wait_until(running_or_ended, 60, "vLLM to run the generation")
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}; vLLM has {requests_waiting(vllm_url):.0f} waiting. {gateway.name}'s log:\n{gateway.log_tail()}"
        ) from None
    if generation.done():
        outcome = generation.exception() or generation.result()
        raise AssertionError(
            f"the generation ended before vLLM was seen running it: {outcome!r}\n"
            f"{gateway.name}'s log:\n{gateway.log_tail()}"
        )


def test_worker_finishes_the_job_in_hand_takes_no_other_and_exits_0(cluster: FaultCluster) -> None:
    (worker,) = cluster.ensure_workers(1)
    cluster.redis.config_resetstat()
    with cluster.stubs() as (_, explanations):
        in_hand = explanations.Explain(explain_request(types_pb2.EXPLAIN_MODE_ASYNC, steps=8), timeout=30)
        assert cluster.running(in_hand.explanation_id, attempt=1) == worker
        _terminate(cluster.workers[worker])
        after = explanations.Explain(explain_request(types_pb2.EXPLAIN_MODE_ASYNC, "saliency"), timeout=30)
        assert cluster.workers[worker].process.wait(float(LONG_GRACE)) == 0

    finished = cluster.record(in_hand.explanation_id)
    assert finished.state == types_pb2.EXPLANATION_STATE_SUCCEEDED, finished.error
    assert finished.attempts == 1
    assert cluster.xack_calls() == 1
    # The job sent after SIGTERM was never taken: still queued, undelivered, for the next worker.
    assert cluster.pending() == []
    waiting = cluster.record(after.explanation_id)
    assert waiting.state == types_pb2.EXPLANATION_STATE_PENDING
    assert waiting.attempts == 0


def test_worker_out_of_grace_hands_its_job_back_and_exits_0(cluster: FaultCluster) -> None:
    cluster.stop_workers()
    (hurried,) = cluster.ensure_workers(1, env={"SIGHTLINE_WORKER_SHUTDOWN_GRACE_SECONDS": str(SHORT_GRACE)})
    cluster.redis.config_resetstat()
    with cluster.stubs() as (_, explanations):
        # The long job takes seconds, more than the grace.
        job = explanations.Explain(explain_request(types_pb2.EXPLAIN_MODE_ASYNC), timeout=30)
        assert cluster.running(job.explanation_id, attempt=1) == hurried
        terminated = time.monotonic()
        _terminate(cluster.workers[hurried])
        assert cluster.workers[hurried].process.wait(30) == 0
        exited_after = time.monotonic() - terminated

        # Handed back whole: PENDING with the attempt uncounted, and claimable without the idle timeout.
        handed_back = cluster.record(job.explanation_id)
        assert handed_back.state == types_pb2.EXPLANATION_STATE_PENDING
        assert handed_back.attempts == 0
        assert not handed_back.results
        (entry,) = cluster.pending()
        assert entry.consumer == hurried and entry.idle_ms >= CLAIM_IDLE_MS
        # A new worker takes it on its first poll.
        successor = cluster.start_worker()
        assert cluster.running(job.explanation_id, attempt=1) == successor
        fetched = explanations.GetExplanation(
            explanations_pb2.GetExplanationRequest(explanation_id=job.explanation_id, wait_seconds=240), timeout=250
        ).explanation

    assert SHORT_GRACE <= exited_after < SHORT_GRACE + 10
    assert fetched.state == types_pb2.EXPLANATION_STATE_SUCCEEDED, fetched.error
    assert fetched.attempts == 1
    assert cluster.pending() == []


def test_gateway_drains_in_flight_calls_and_refuses_new_ones(cluster: FaultCluster) -> None:
    cluster.ensure_workers(1)
    gateway = cluster.gateway
    assert gateway is not None and gateway.alive()
    vllm_url = cluster.config.vllm_url
    jobs_before = cluster.redis.xlen(JOB_STREAM)
    with cluster.stubs() as (inference, explanations), ThreadPoolExecutor(2) as pool:
        # The explanation (the long job, about twice the generation) goes first and the generation only once the
        # job runs, so the time a worker takes to start the job no longer runs down the generation's.
        explanation = pool.submit(explanations.Explain, explain_request(types_pb2.EXPLAIN_MODE_SYNC), timeout=240)
        cluster.running(cluster.newest_job(jobs_before), attempt=1)
        generation = pool.submit(
            inference.Generate,
            inference_pb2.GenerateRequest(input=COUNT, sampling=types_pb2.SamplingParams(max_tokens=96)),
            timeout=240,
        )
        _wait_until_vllm_runs(generation, vllm_url, gateway)

        _terminate(gateway)
        terminated = time.monotonic()
        assert cluster.health("") == NOT_SERVING
        assert cluster.health(INFERENCE_SERVICE) == NOT_SERVING
        assert cluster.health(EXPLANATIONS_SERVICE) == NOT_SERVING
        assert time.monotonic() - terminated < FAIL_FAST_SECONDS
        with pytest.raises(grpc.RpcError) as refused:
            inference.Generate(inference_pb2.GenerateRequest(input=COUNT), timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (refused.value.details() or "")
        assert time.monotonic() - terminated < 2 * FAIL_FAST_SECONDS
        assert not generation.done() and not explanation.done(), "both calls should still be in flight"

        generated = generation.result()
        explained = explanation.result()
    assert generated.finish_reason == types_pb2.FINISH_REASON_LENGTH
    assert len(generated.output_tokens) == 96
    assert explained.explanation.state == types_pb2.EXPLANATION_STATE_SUCCEEDED, explained.explanation.error
    assert gateway.process.wait(30) == 0


def test_gateway_cancels_what_is_still_running_when_its_grace_ends(cluster: FaultCluster) -> None:
    gateway = cluster.start_gateway(env={"SIGHTLINE_SHUTDOWN_GRACE_SECONDS": str(SHORT_GRACE)})
    vllm_url = cluster.config.vllm_url
    tokens_before = generated_tokens(vllm_url)
    with cluster.stubs() as (inference, _), ThreadPoolExecutor(1) as pool:
        cluster.wait_for_health(INFERENCE_SERVICE, SERVING, 30)
        # 1,000 tokens take vLLM far longer than the grace. The call waits for this channel's connection to
        # the new gateway instead of failing fast while it is still being made.
        generation = pool.submit(
            inference.Generate,
            inference_pb2.GenerateRequest(input=COUNT, sampling=types_pb2.SamplingParams(max_tokens=1000)),
            timeout=240,
            wait_for_ready=True,
        )
        _wait_until_vllm_runs(generation, vllm_url, gateway)
        _terminate(gateway)
        terminated = time.monotonic()
        assert gateway.process.wait(30) == 0
        exited_after = time.monotonic() - terminated
        with pytest.raises(grpc.RpcError) as cut_off:
            generation.result()

    assert SHORT_GRACE <= exited_after < SHORT_GRACE + 10
    assert cut_off.value.code() == grpc.StatusCode.UNAVAILABLE, cut_off.value
    # The generation the gateway gave up on does not go on in vLLM: aborted well short of its 1,000 tokens.
    wait_until(lambda: requests_running(vllm_url) == 0, 10, "vLLM to abort the cut-off generation", interval=0.2)
    generated = generated_tokens(vllm_url) - tokens_before
    assert 0 < generated < 1000
