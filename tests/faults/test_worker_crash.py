"""An explainer worker SIGKILLed mid-job: another worker claims the job and completes it, exactly once.

A job that keeps killing the workers that take it is marked FAILED after SIGHTLINE_MAX_ATTEMPTS.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from sightline.v1 import explanations_pb2, types_pb2

from common.jobs import JOB_STREAM
from tests.faults.cluster import (
    LONG_JOB_OUTPUT,
    LONG_JOB_PROMPT,
    FaultCluster,
    explain_request,
)

pytestmark = pytest.mark.e2e

CLAIM_IDLE_MS = 2000
MAX_ATTEMPTS = 2
# Room for a claim after the idle timeout and a full computation on a loaded machine.
SYNC_DEADLINE = 240.0


@pytest.fixture(scope="module")
def cluster(vllm_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultCluster]:
    cluster = FaultCluster(
        tmp_path_factory.mktemp("worker-crash"),
        vllm_port=vllm_port,
        env={
            "SIGHTLINE_CLAIM_IDLE_MS": str(CLAIM_IDLE_MS),
            "SIGHTLINE_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
            "SIGHTLINE_HEALTH_INTERVAL_SECONDS": "0.5",
        },
    )
    try:
        cluster.start_serving(workers=3)
        yield cluster
    finally:
        cluster.close()


def _assert_stored_once(cluster: FaultCluster, explanation: types_pb2.Explanation) -> None:
    """One job, one record equal to what the client got, the job acknowledged exactly once, nothing pending."""
    assert len(cluster.job_entries(explanation.explanation_id)) == 1
    assert cluster.redis.xlen(JOB_STREAM) == len(cluster.redis.keys("sl:exp:*"))
    assert cluster.record(explanation.explanation_id) == explanation
    assert cluster.pending() == []
    assert cluster.xack_calls() == 1


def test_sync_client_gets_the_explanation_a_killed_worker_was_computing(cluster: FaultCluster) -> None:
    cluster.ensure_workers(3)
    cluster.redis.config_resetstat()
    jobs_before = cluster.redis.xlen(JOB_STREAM)
    with cluster.stubs() as (_, explanations), ThreadPoolExecutor(1) as pool:
        call = pool.submit(explanations.Explain, explain_request(types_pb2.EXPLAIN_MODE_SYNC), timeout=SYNC_DEADLINE)
        explanation_id = cluster.newest_job(jobs_before)
        victim = cluster.running(explanation_id, attempt=1)
        cluster.kill_worker(victim)
        killed_at = time.monotonic()
        claimant = cluster.running(explanation_id, attempt=2)
        claimed_after = time.monotonic() - killed_at
        # While the claimant computes, its lease keeps the entry younger than the idle timeout, so the
        # third worker, idle and polling, never claims it too.
        idle_seen = []
        while not call.done():
            idle_seen += [p.idle_ms for p in cluster.pending()]
            time.sleep(0.1)
        response = call.result()

    assert claimant != victim
    assert claimed_after >= CLAIM_IDLE_MS / 1000 - 0.5, "claimed before the dead worker's entry was idle long enough"
    assert idle_seen and max(idle_seen) < CLAIM_IDLE_MS
    explanation = response.explanation
    assert response.explanation_id == explanation_id == explanation.explanation_id
    assert explanation.state == types_pb2.EXPLANATION_STATE_SUCCEEDED, explanation.error
    assert explanation.attempts == 2
    (result,) = explanation.results
    attributions = np.array(result.attributions.float_values, dtype=np.float32).reshape(
        tuple(result.attributions.shape)
    )
    assert attributions.shape == (len(LONG_JOB_OUTPUT), len(LONG_JOB_PROMPT) + len(LONG_JOB_OUTPUT) - 1)
    assert np.all(np.isfinite(attributions)) and np.any(attributions != 0)
    _assert_stored_once(cluster, explanation)


def test_async_client_finds_completed_the_job_a_killed_worker_held(cluster: FaultCluster) -> None:
    cluster.ensure_workers(2)
    cluster.redis.config_resetstat()
    with cluster.stubs() as (_, explanations):
        accepted = explanations.Explain(explain_request(types_pb2.EXPLAIN_MODE_ASYNC), timeout=30)
        assert not accepted.HasField("explanation")
        victim = cluster.running(accepted.explanation_id, attempt=1)
        cluster.kill_worker(victim)
        fetched = explanations.GetExplanation(
            explanations_pb2.GetExplanationRequest(explanation_id=accepted.explanation_id, wait_seconds=SYNC_DEADLINE),
            timeout=SYNC_DEADLINE + 10,
        ).explanation

    assert fetched.state == types_pb2.EXPLANATION_STATE_SUCCEEDED, fetched.error
    assert fetched.attempts == 2
    assert len(fetched.results) == 1
    _assert_stored_once(cluster, fetched)


def test_a_job_that_keeps_killing_its_workers_is_failed_with_its_reason(cluster: FaultCluster) -> None:
    # A worker to kill on each attempt, and one more to find the attempts used up.
    cluster.ensure_workers(MAX_ATTEMPTS + 1)
    cluster.redis.config_resetstat()
    with cluster.stubs() as (_, explanations):
        accepted = explanations.Explain(explain_request(types_pb2.EXPLAIN_MODE_ASYNC), timeout=30)
        victims = []
        for attempt in range(1, MAX_ATTEMPTS + 1):
            victims.append(cluster.running(accepted.explanation_id, attempt=attempt))
            cluster.kill_worker(victims[-1])
        fetched = explanations.GetExplanation(
            explanations_pb2.GetExplanationRequest(explanation_id=accepted.explanation_id, wait_seconds=60),
            timeout=70,
        ).explanation

    assert len(set(victims)) == MAX_ATTEMPTS
    assert fetched.state == types_pb2.EXPLANATION_STATE_FAILED
    assert fetched.attempts == MAX_ATTEMPTS
    assert f"gave up after {MAX_ATTEMPTS} attempts" in fetched.error.message
    assert "killed, crashed or out of memory" in fetched.error.message
    assert fetched.error.code == types_pb2.EXPLANATION_ERROR_CODE_ATTEMPTS_EXHAUSTED
    assert fetched.error.details["attempts"] == str(MAX_ATTEMPTS)
    assert not fetched.results
    _assert_stored_once(cluster, fetched)
    # The worker that gave up is still serving.
    assert len(cluster.live_workers()) == 1
