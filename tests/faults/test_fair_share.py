"""Tenants share the explainer workers fairly, with real processes (Redis, `python -m explainers`, the gateway with
two tenants' API keys): one tenant's queued jobs do not hold another tenant's SYNC explanation back, and a SIGKILLed
worker's job of either tenant is claimed and finished exactly once.

The bound (common/fair_queue.py): a job of a tenant with nothing queued starts after at most one queued job of each
other tenant, besides the jobs already running when it was enqueued. With one worker and two tenants, at most 2 of the
flooding tenant's jobs finish between the quiet tenant's enqueue and its completion, however many are queued, so the
quiet tenant's SYNC call takes at most 3 jobs' time. A single FIFO queue made it wait for the whole flood.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from google.protobuf import timestamp_pb2
from sightline.v1 import explanations_pb2, explanations_pb2_grpc, types_pb2

from common.jobs import JOB_ASSIGNED_KEY, JOB_QUEUE_KEY, JOB_STREAM
from server.keys import hash_key, new_key
from tests.faults.cluster import FaultCluster, explain_request

pytestmark = pytest.mark.e2e

KEYS = {"flood": new_key(), "quiet": new_key()}
CLAIM_IDLE_MS = 2000
FLOOD_JOBS = 8
# Jobs of a few seconds each (integrated gradients over the long-job sequence): long enough that the flood stays
# queued while the quiet tenant's job waits, short enough that the test drains it in a minute or two.
STEPS = 8
SUCCEEDED = types_pb2.EXPLANATION_STATE_SUCCEEDED
DEADLINE = 240.0


def as_tenant(tenant: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {KEYS[tenant]}"),)


@pytest.fixture(scope="module")
def cluster(vllm_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultCluster]:
    cluster = FaultCluster(
        tmp_path_factory.mktemp("fair-share"),
        vllm_port=vllm_port,
        env={
            "SIGHTLINE_API_KEYS": ",".join(f"{tenant}:{hash_key(key).hex()}" for tenant, key in KEYS.items()),
            "SIGHTLINE_CLAIM_IDLE_MS": str(CLAIM_IDLE_MS),
            "SIGHTLINE_HEALTH_INTERVAL_SECONDS": "0.5",
        },
    )
    try:
        cluster.start_serving(workers=1)
        yield cluster
    finally:
        cluster.close()


def _nanoseconds(timestamp: timestamp_pb2.Timestamp) -> int:
    return int(timestamp.ToNanoseconds())


def _assert_each_finished_once(cluster: FaultCluster, fetched: dict[str, types_pb2.Explanation], turns: int) -> None:
    """Every job done and stored as fetched; every turn acknowledged once, with its result; nothing left queued."""
    for explanation_id, explanation in fetched.items():
        assert explanation.state == SUCCEEDED, explanation.error
        assert cluster.record(explanation_id) == explanation
    assert cluster.xack_calls() == len(fetched)
    assert cluster.redis.xlen(JOB_STREAM) - turns == len(fetched)  # one turn per job
    assert cluster.pending() == []
    assert cluster.redis.zcard(JOB_QUEUE_KEY) == 0 and cluster.redis.hlen(JOB_ASSIGNED_KEY) == 0


def _wait_for_all(
    explanations: explanations_pb2_grpc.ExplanationsServiceStub, ids: dict[str, str], timeout: float = DEADLINE
) -> dict[str, types_pb2.Explanation]:
    """Each explanation (id -> its tenant) once final, fetched with its own tenant's key."""
    fetched = {}
    for explanation_id, tenant in ids.items():
        response = explanations.GetExplanation(
            explanations_pb2.GetExplanationRequest(explanation_id=explanation_id, wait_seconds=timeout),
            timeout=timeout + 10,
            metadata=as_tenant(tenant),
        )
        fetched[explanation_id] = response.explanation
    return fetched


def test_a_flooding_tenant_cannot_hold_a_quiet_tenants_sync_explanation_back(cluster: FaultCluster) -> None:
    cluster.ensure_workers(1)
    cluster.redis.config_resetstat()
    turns = cluster.redis.xlen(JOB_STREAM)
    with cluster.stubs() as (_, explanations):
        flood = [
            explanations.Explain(
                explain_request(types_pb2.EXPLAIN_MODE_ASYNC, steps=STEPS), timeout=30, metadata=as_tenant("flood")
            ).explanation_id
            for _ in range(FLOOD_JOBS)
        ]
        cluster.running(flood[0], attempt=1)  # one flood job in the worker's hands, the rest queued
        started = time.monotonic()
        response = explanations.Explain(
            explain_request(types_pb2.EXPLAIN_MODE_SYNC, steps=STEPS), timeout=DEADLINE, metadata=as_tenant("quiet")
        )
        waited = time.monotonic() - started
        quiet = response.explanation
        assert quiet.state == SUCCEEDED, quiet.error
        at_quiet_completion = [cluster.record(i) for i in flood]
        fetched = _wait_for_all(explanations, {**dict.fromkeys(flood, "flood"), quiet.explanation_id: "quiet"})

    # The jobs the worker ran while the quiet tenant's job waited or ran: those that finished in between.
    enqueued, completed = _nanoseconds(quiet.created_at), _nanoseconds(quiet.completed_at)
    ahead = [r for r in map(fetched.get, flood) if r and enqueued < _nanoseconds(r.completed_at) < completed]
    done = sorted(_nanoseconds(explanation.completed_at) for explanation in fetched.values())
    per_job = (done[-1] - done[0]) / (len(done) - 1) / 1e9
    print(f"quiet SYNC explanation: {waited:.1f} s, {len(ahead)} flood jobs ahead; a job takes {per_job:.1f} s")
    assert len(ahead) <= 2
    # The flood was still queued: FIFO would have run all of it first.
    unfinished = [r for r in at_quiet_completion if r.state != SUCCEEDED]
    assert len(unfinished) >= FLOOD_JOBS - 2
    _assert_each_finished_once(cluster, fetched, turns)


@pytest.mark.parametrize("victim", ["flood", "quiet"])
def test_a_killed_workers_job_of_either_tenant_is_claimed_and_finished_exactly_once(
    cluster: FaultCluster, victim: str
) -> None:
    cluster.ensure_workers(2)
    cluster.redis.config_resetstat()
    turns = cluster.redis.xlen(JOB_STREAM)
    with cluster.stubs() as (_, explanations):
        ids = {}
        for tenant in ("flood", "flood", "flood", "quiet"):
            accepted = explanations.Explain(
                explain_request(types_pb2.EXPLAIN_MODE_ASYNC), timeout=30, metadata=as_tenant(tenant)
            )
            ids[accepted.explanation_id] = tenant
        victim_id = next(i for i, tenant in ids.items() if tenant == victim)
        killed = cluster.running(victim_id, attempt=1)
        cluster.kill_worker(killed)
        claimant = cluster.running(victim_id, attempt=2)
        fetched = _wait_for_all(explanations, ids)

    assert claimant != killed
    assert fetched[victim_id].attempts == 2
    assert all(explanation.attempts == 1 for i, explanation in fetched.items() if i != victim_id)
    _assert_each_finished_once(cluster, fetched, turns)
