"""The explainer's job-queue gauges, read from a real Redis stream and consumer group."""

from __future__ import annotations

import redis
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from common.jobs import JOB_STREAM, WORKER_GROUP
from explainers.metrics import JobQueueCollector


def collected(client: redis.Redis) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(JobQueueCollector(client))
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_an_empty_redis_reports_an_empty_queue(redis_client: redis.Redis) -> None:
    samples = collected(redis_client)
    assert samples[("sightline_explanation_queue_length", ())] == 0
    assert samples[("sightline_explanation_jobs", (("state", "queued"),))] == 0


def test_unread_jobs_are_lag_and_taken_ones_in_progress(redis_client: redis.Redis) -> None:
    redis_client.xgroup_create(JOB_STREAM, WORKER_GROUP, id="0", mkstream=True)
    for index in range(5):
        redis_client.xadd(JOB_STREAM, {"job": str(index)})
    taken = redis_client.xreadgroup(WORKER_GROUP, "worker-1", {JOB_STREAM: ">"}, count=2)
    first_entry_id: bytes = taken[0][1][0][0]  # type: ignore[index,assignment]
    redis_client.xack(JOB_STREAM, WORKER_GROUP, first_entry_id)  # one of the two finished

    samples = collected(redis_client)
    assert samples[("sightline_explanation_consumer_group_lag", ())] == 3
    assert samples[("sightline_explanation_jobs", (("state", "queued"),))] == 3
    assert samples[("sightline_explanation_jobs", (("state", "in_progress"),))] == 1
    assert samples[("sightline_explanation_queue_length", ())] == 4
