"""The explainer's Prometheus metrics (served on ``SIGHTLINE_METRICS_LISTEN``; names in docs/observability.md).

Jobs finished by state, the hidden-state cache's hits and misses, each method's seconds and each job's fidelity
gap are counted as the worker computes. The job queue (what the group has not read, what workers hold) is read
from Redis when Prometheus scrapes, so every worker reports the same numbers: aggregate them with ``max``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sightline.v1 import types_pb2

from common.jobs import JOB_STREAM, worker_group_info
from common.metrics import LATENCY_BUCKETS, MetricsServer, start_metrics_server

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)

JOBS_FINISHED = Counter(
    "sightline_explainer_jobs_finished",
    "Explanation jobs this worker finished, by final state (succeeded, failed, cancelled) or left for a retry"
    " (retried)",
    ["state"],
    registry=REGISTRY,
)
JOB_SECONDS = Histogram(
    "sightline_explainer_job_seconds",
    "Time from picking a job up to its result, whatever the state",
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
HIDDEN_STATE_CACHE = Counter(
    "sightline_explainer_hidden_state_cache",
    "Hidden-state cache lookups of succeeded jobs, by result (hit, miss)",
    ["result"],
    registry=REGISTRY,
)
METHOD_SECONDS = Histogram(
    "sightline_explainer_method_seconds",
    "Seconds one method took on one job",
    ["method"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
FIDELITY = Histogram(
    "sightline_explainer_fidelity_max_abs_logprob_diff",
    "Largest gap between a job's served and recomputed log-probabilities (jobs with served log-probabilities)",
    buckets=(1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0),
    registry=REGISTRY,
)


def observe_success(explanation: types_pb2.Explanation, *, served_compared: bool) -> None:
    JOBS_FINISHED.labels("succeeded").inc()
    HIDDEN_STATE_CACHE.labels("hit" if explanation.cache_hit else "miss").inc()
    for result in explanation.results:
        METHOD_SECONDS.labels(result.method).observe(result.seconds)
    if served_compared:
        FIDELITY.observe(explanation.fidelity.max_abs_logprob_diff)


class JobQueueCollector(Collector):
    """Reads the job stream's consumer group at scrape time (XINFO GROUPS: one round trip)."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    def collect(self) -> Iterator[Metric]:
        try:
            groups = self._redis.xinfo_groups(JOB_STREAM)
        except redis.ResponseError:
            groups = []  # no stream yet: nothing was ever enqueued
        except redis.RedisError as exc:
            log.warning("cannot read the job queue for metrics: %s", exc)
            return
        group = worker_group_info(groups)
        if group is None:
            # No worker has created the group yet: everything in the stream (if any) is unread.
            pending, lag = 0, float(self._redis.xlen(JOB_STREAM))
        else:
            pending = int(group["pending"])
            # Redis leaves lag unknown (None) when entries were deleted past the last delivered one: reported NaN.
            lag = float("nan") if group.get("lag") is None else float(group["lag"])
        lag_metric = GaugeMetricFamily(
            "sightline_explanation_consumer_group_lag", "Jobs in the stream no worker has read yet"
        )
        lag_metric.add_metric([], lag)
        yield lag_metric
        jobs = GaugeMetricFamily("sightline_explanation_jobs", "Unfinished explanation jobs by state", labels=["state"])
        jobs.add_metric(["queued"], lag)
        jobs.add_metric(["in_progress"], float(pending))
        yield jobs
        queue = GaugeMetricFamily(
            "sightline_explanation_queue_length",
            "Jobs no worker has acknowledged (queued + in progress): what SIGHTLINE_MAX_QUEUED_EXPLANATIONS bounds",
        )
        queue.add_metric([], pending + lag)
        yield queue


# Where a worker serves /metrics unless SIGHTLINE_METRICS_LISTEN or --metrics-listen says otherwise ("off": nowhere).
DEFAULT_LISTEN = "127.0.0.1:9402"


def serve(listen: str, client: redis.Redis) -> MetricsServer | None:
    """Serve this worker's metrics, the job queue's included, on ``listen``."""
    REGISTRY.register(JobQueueCollector(client))
    return start_metrics_server(listen, REGISTRY, "explainer")
