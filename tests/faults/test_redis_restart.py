"""Redis restarted under a running gateway and worker: nothing stored or queued is lost, nobody restarts.

While it is down, calls that need it fail fast with UNAVAILABLE and a retry hint; generation, which
does not need it, goes on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from sightline.v1 import explanations_pb2, inference_pb2, types_pb2

from common.jobs import JOB_STREAM
from tests.faults.cluster import (
    EXPLANATIONS_SERVICE,
    INFERENCE_SERVICE,
    NOT_SERVING,
    SERVING,
    FaultCluster,
    explain_request,
)

pytestmark = pytest.mark.e2e

SUCCEEDED = types_pb2.EXPLANATION_STATE_SUCCEEDED
# A refusal this much slower than a round trip would mean the gateway waited on Redis instead of failing fast.
FAIL_FAST_SECONDS = 1.0


@pytest.fixture
def cluster(vllm_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultCluster]:
    cluster = FaultCluster(
        tmp_path_factory.mktemp("redis-restart"),
        vllm_port=vllm_port,
        env={"SIGHTLINE_HEALTH_INTERVAL_SECONDS": "0.5"},
    )
    try:
        cluster.start_serving()
        yield cluster
    finally:
        cluster.close()


def _refused_fast(call: Callable[[], object]) -> grpc.RpcError:
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        call()
    elapsed = time.monotonic() - started
    assert elapsed < FAIL_FAST_SECONDS, f"took {elapsed:.2f} s to refuse"
    return caught.value


def test_redis_restart_loses_nothing_and_needs_no_other_restart(cluster: FaultCluster) -> None:
    gateway, (worker,) = cluster.gateway, cluster.workers.values()
    assert gateway is not None
    with cluster.stubs() as (inference, explanations), ThreadPoolExecutor(1) as pool:
        stored = explanations.Explain(explain_request(types_pb2.EXPLAIN_MODE_SYNC, "saliency"), timeout=120)
        assert stored.explanation.state == SUCCEEDED, stored.explanation.error

        # A SYNC call whose job is computing while Redis restarts, and a job queued behind it.
        jobs_before = cluster.redis.xlen(JOB_STREAM)
        computing_call = pool.submit(
            explanations.Explain, explain_request(types_pb2.EXPLAIN_MODE_SYNC, steps=8), timeout=240
        )
        computing_id = cluster.newest_job(jobs_before)
        cluster.running(computing_id, attempt=1)
        queued = explanations.Explain(explain_request(types_pb2.EXPLAIN_MODE_ASYNC, "saliency"), timeout=30)
        assert cluster.record(queued.explanation_id).state == types_pb2.EXPLANATION_STATE_PENDING

        cluster.stop_redis()
        outage = [
            _refused_fast(
                lambda: explanations.GetExplanation(
                    explanations_pb2.GetExplanationRequest(explanation_id=stored.explanation_id), timeout=30
                )
            ),
            _refused_fast(lambda: explanations.Explain(explain_request(types_pb2.EXPLAIN_MODE_ASYNC), timeout=30)),
            _refused_fast(lambda: explanations.ListMethods(explanations_pb2.ListMethodsRequest(), timeout=30)),
        ]
        for error in outage:
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert f"Redis at {cluster.config.redis_url}" in (error.details() or "")
            assert "retry in a few seconds" in (error.details() or "")
        # Generation does not need Redis.
        generated = inference.Generate(
            inference_pb2.GenerateRequest(
                input=inference_pb2.GenerationInput(prompt="Hello"), sampling=types_pb2.SamplingParams(max_tokens=2)
            ),
            timeout=60,
        )
        assert len(generated.output_tokens) == 2
        cluster.wait_for_health(EXPLANATIONS_SERVICE, NOT_SERVING, 10)
        assert cluster.health("") == NOT_SERVING
        assert cluster.health(INFERENCE_SERVICE) == SERVING

        # The worker finishes its job while Redis is down and keeps the result until it can store it.
        cluster.wait_for_log(worker, f"could not store explanation {computing_id}", timeout=240)
        assert worker.alive() and gateway.alive()
        cluster.start_redis()
        computing = computing_call.result(timeout=240)
        fetched_stored = explanations.GetExplanation(
            explanations_pb2.GetExplanationRequest(explanation_id=stored.explanation_id), timeout=30
        )
        fetched_queued = explanations.GetExplanation(
            explanations_pb2.GetExplanationRequest(explanation_id=queued.explanation_id, wait_seconds=120),
            timeout=130,
        )
        fresh = explanations.Explain(explain_request(types_pb2.EXPLAIN_MODE_SYNC, "saliency"), timeout=120)

    assert fetched_stored.explanation == stored.explanation
    # The job in hand across the outage was stored once Redis was back, not computed again.
    assert computing.explanation_id == computing_id
    assert computing.explanation.state == SUCCEEDED, computing.explanation.error
    assert computing.explanation.attempts == 1
    assert fetched_queued.explanation.state == SUCCEEDED, fetched_queued.explanation.error
    assert fetched_queued.explanation.attempts == 1
    assert fresh.explanation.state == SUCCEEDED, fresh.explanation.error
    assert cluster.pending() == []
    cluster.wait_for_health("", SERVING, 10)
    # The same gateway and worker processes throughout.
    assert gateway.alive() and worker.alive()
