"""The gateway's Prometheus metrics (served on ``SIGHTLINE_METRICS_LISTEN``; names in docs/observability.md).

Counted where the servicers already see each call: one observation per RPC (its status code and the tenant it
acted for), the time to the first streamed token, and how long SYNC calls waited for their explanation. The
explanation queue is measured by the explainer, which owns the job stream's consumer group.
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

from common.metrics import LATENCY_BUCKETS
from server.errors import GatewayError

REGISTRY = CollectorRegistry(auto_describe=True)
# The tenant label of a call refused before its key was checked (or with a key that is not valid).
UNAUTHENTICATED_TENANT = "-"

REQUESTS = Counter(
    "sightline_gateway_requests",
    "gRPC calls answered, by RPC, status code and tenant",
    ["rpc", "code", "tenant"],
    registry=REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "sightline_gateway_request_seconds",
    "End-to-end time of a gRPC call, from the servicer's start to its last message",
    ["rpc"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "sightline_gateway_time_to_first_token_seconds",
    "GenerateStream: time from the call's start to the first message carrying generated tokens",
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
EXPLANATION_WAIT = Histogram(
    "sightline_gateway_explanation_wait_seconds",
    "SYNC explanations: how long a call waited for the explainer after enqueueing the job",
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
VIEWER_REQUESTS = Counter(
    "sightline_viewer_requests",
    "Explanation viewer data requests, by endpoint and HTTP status",
    ["endpoint", "status"],
    registry=REGISTRY,
)
# Incremented by the audit log (server/audit/log.py) for each entry it commits; zero where no audit log runs.
AUDIT_APPENDS = Counter(
    "sightline_audit_appends",
    "Entries committed to the audit log, by tenant and kind (request, explanation, retention_purge)",
    ["tenant", "kind"],
    registry=REGISTRY,
)


def status_code_of(exc: BaseException) -> grpc.StatusCode:
    """The status a call that raised ``exc`` ends with (as servicers.py's abort maps it)."""
    if isinstance(exc, GatewayError):
        return exc.code
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.INTERNAL


class RpcObservation:
    """Counts one call when its block exits: status OK unless ``fail`` was called or the block was cancelled."""

    def __init__(self, rpc: str) -> None:
        self.rpc = rpc
        self.tenant = UNAUTHENTICATED_TENANT
        self.code = grpc.StatusCode.OK
        self._started = time.perf_counter()
        self._first_token_seen = False

    def __enter__(self) -> RpcObservation:
        return self

    def fail(self, exc: BaseException) -> None:
        self.code = status_code_of(exc)

    def first_token(self) -> None:
        if not self._first_token_seen:
            self._first_token_seen = True
            TIME_TO_FIRST_TOKEN.observe(time.perf_counter() - self._started)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if isinstance(exc, asyncio.CancelledError | GeneratorExit) and self.code == grpc.StatusCode.OK:
            self.code = grpc.StatusCode.CANCELLED
        REQUESTS.labels(self.rpc, self.code.name, self.tenant).inc()
        REQUEST_SECONDS.labels(self.rpc).observe(time.perf_counter() - self._started)
