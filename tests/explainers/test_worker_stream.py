"""The job stream's housekeeping: finished entries are deleted, nothing a worker still needs is."""

from __future__ import annotations

import time
from typing import cast

import redis

from common.jobs import JOB_STREAM, WORKER_GROUP
from explainers.model import LoadedModel
from explainers.worker import ExplainerWorker, WorkerSettings


def entry_ids(client: redis.Redis) -> list[bytes]:
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(JOB_STREAM))
    return [entry_id for entry_id, _ in entries]


def read_new(client: redis.Redis, count: int) -> list[bytes]:
    """Deliver up to `count` new entries to worker-a; their ids."""
    response = cast(
        list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]],
        client.xreadgroup(WORKER_GROUP, "worker-a", {JOB_STREAM: ">"}, count=count),
    )
    return [entry_id for _, entries in response for entry_id, _ in entries]


def test_trimming_deletes_only_acknowledged_entries_below_pending_and_undelivered_ones(
    tiny_model_float32: LoadedModel, redis_client: redis.Redis
) -> None:
    settings = WorkerSettings(consumer="worker-a", job_retention_seconds=0)
    worker = ExplainerWorker(redis_client, tiny_model_float32, settings)
    worker.register()
    assert worker.trim_acknowledged() == 0  # an empty stream

    enqueued = [redis_client.xadd(JOB_STREAM, {"job": str(index)}) for index in range(6)]
    # Four delivered; the second stays pending (in a worker's hands), the last two are never read.
    assert read_new(redis_client, 4) == enqueued[:4]
    redis_client.xack(JOB_STREAM, WORKER_GROUP, enqueued[0], enqueued[2], enqueued[3])

    assert worker.trim_acknowledged() == 1
    # Entries after the oldest pending one stay even when acknowledged: the bound is one id.
    assert entry_ids(redis_client) == enqueued[1:]

    redis_client.xack(JOB_STREAM, WORKER_GROUP, enqueued[1])
    assert worker.trim_acknowledged() == 3
    assert entry_ids(redis_client) == enqueued[4:]  # undelivered: kept
    assert read_new(redis_client, 10) == enqueued[4:]

    redis_client.xack(JOB_STREAM, WORKER_GROUP, *enqueued[4:])
    assert worker.trim_acknowledged() == 2
    assert redis_client.xlen(JOB_STREAM) == 0


def test_acknowledged_entries_stay_for_the_retention(
    tiny_model_float32: LoadedModel, redis_client: redis.Redis
) -> None:
    worker = ExplainerWorker(redis_client, tiny_model_float32, WorkerSettings(consumer="worker-a"))
    worker.register()
    old = redis_client.xadd(JOB_STREAM, {"job": "old"}, id=f"{int(time.time() * 1000) - 3_601_000}-0")
    recent = redis_client.xadd(JOB_STREAM, {"job": "recent"})
    assert read_new(redis_client, 2) == [old, recent]
    redis_client.xack(JOB_STREAM, WORKER_GROUP, old, recent)

    assert worker.trim_acknowledged() == 1  # the default retention is an hour
    assert entry_ids(redis_client) == [recent]
