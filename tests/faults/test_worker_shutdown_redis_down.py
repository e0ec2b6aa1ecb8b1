"""SIGTERM reaches a worker while Redis is down: it still exits once its grace has run, and the job in hand stays
pending for another worker (the hand-back needs Redis; the claim after the idle timeout does not need it)."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator

import pytest
from sightline.v1 import types_pb2

from tests.faults.cluster import FaultCluster, explain_request

pytestmark = pytest.mark.e2e

GRACE_SECONDS = 1.0
# Enough integration steps that the job is still in the worker's hands when Redis stops and its grace runs out.
STEPS = 128


@pytest.fixture(scope="module")
def cluster(vllm_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultCluster]:
    cluster = FaultCluster(
        tmp_path_factory.mktemp("worker-shutdown-redis-down"),
        vllm_port=vllm_port,
        env={"SIGHTLINE_WORKER_SHUTDOWN_GRACE_SECONDS": str(GRACE_SECONDS), "SIGHTLINE_CLAIM_IDLE_MS": "30000"},
    )
    try:
        cluster.start_serving()
        yield cluster
    finally:
        cluster.close()


def test_a_worker_told_to_stop_while_redis_is_down_exits_after_its_grace(cluster: FaultCluster) -> None:
    """Regression (issue 13): abandon_held_job() raised redis.ConnectionError in the shutdown thread, which died
    before os._exit(0), and the worker never exited."""
    (worker,) = cluster.ensure_workers(1)
    with cluster.stubs() as (_, explanations):
        job = explanations.Explain(explain_request(types_pb2.EXPLAIN_MODE_ASYNC, steps=STEPS), timeout=30)
    assert cluster.running(job.explanation_id, attempt=1) == worker
    cluster.stop_redis()

    process = cluster.workers[worker].process
    terminated = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(GRACE_SECONDS + 30)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"{worker} did not exit within {GRACE_SECONDS + 30:.0f} s of SIGTERM with Redis down:\n"
            f"{cluster.workers[worker].log_tail()}"
        ) from None
    exited_after = time.monotonic() - terminated
    log = cluster.workers[worker].log_path.read_text(errors="replace")

    assert code == 0, log[-3000:]
    assert GRACE_SECONDS <= exited_after < GRACE_SECONDS + 30
    assert "could not hand the job in hand back" in log

    # Redis back (AOF): the job was neither lost nor acknowledged; it waits, RUNNING in the exited worker's name,
    # for another worker to claim it after the idle timeout.
    cluster.start_redis()
    (entry,) = cluster.pending()
    assert entry.consumer == worker
    assert cluster.job_entries(job.explanation_id) == [entry.entry_id]
    record = cluster.record(job.explanation_id)
    assert (record.state, record.attempts) == (types_pb2.EXPLANATION_STATE_RUNNING, 1)
