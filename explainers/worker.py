"""The explainer worker: a Redis Streams consumer that computes explanations.

Each job is acknowledged only after its record reaches a final state, in the same
transaction, so a worker killed mid-job leaves the entry pending and another worker claims
it once it has been idle for ``claim_idle_ms``. Records are written whole and keyed by
explanation id, so a job computed twice (a slow worker and its claimant) stores the same
result twice, never a half-written one. A job that keeps failing is marked FAILED with its
reason after ``max_attempts``; nothing is dropped silently. The transaction that writes a
final record also gives the explanation's slot back to its tenant's concurrency limit.

Each job's hidden states are cached under its own tenant (see explainers/hidden_cache.py).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import cast

import redis
from opentelemetry import trace
from sightline.v1 import explanations_pb2, types_pb2

from common.jobs import (
    CATALOG_KEY,
    DONE_CHANNEL,
    JOB_STREAM,
    MODELS_KEY,
    RECORD_ATTEMPTS,
    RECORD_EXPLANATION,
    RECORD_STATE,
    WORKER_GROUP,
    ExplanationJob,
    ModelRecord,
    explanation_key,
    tenant_inflight_key,
)
from common.telemetry import context_from_traceparent
from explainers.engine import explain
from explainers.hidden_cache import HiddenStateCache
from explainers.methods.registry import method_infos
from explainers.model import LoadedModel

log = logging.getLogger(__name__)
tracer = trace.get_tracer("sightline.explainer")

FINAL_STATES = (types_pb2.EXPLANATION_STATE_SUCCEEDED, types_pb2.EXPLANATION_STATE_FAILED)


@dataclass(frozen=True)
class WorkerSettings:
    consumer: str
    max_attempts: int = 3
    # A pending job idle this long is assumed abandoned by a dead worker and claimed.
    claim_idle_ms: int = 60_000
    block_ms: int = 1_000
    # How long hidden states stay cached.
    cache_ttl_seconds: int = 3600


class ExplainerWorker:
    def __init__(self, client: redis.Redis, loaded: LoadedModel, settings: WorkerSettings) -> None:
        self._redis = client
        self._loaded = loaded
        self._settings = settings

    def register(self) -> None:
        """Create the consumer group and publish this worker's methods and weights digest."""
        try:
            self._redis.xgroup_create(JOB_STREAM, WORKER_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        catalog = explanations_pb2.ListMethodsResponse(methods=method_infos())
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(CATALOG_KEY, catalog.SerializeToString())
            pipe.hset(
                MODELS_KEY,
                self._loaded.model_name,
                ModelRecord(self._loaded.weights_digest, self._loaded.vocab_size).to_json(),
            )
            pipe.execute()

    def run(self, stop: threading.Event) -> None:
        """Process jobs until ``stop`` is set; a job in hand is always finished first."""
        while not stop.is_set():
            try:
                for entry_id, fields in self._next_entries():
                    self.process(entry_id, fields)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("lost Redis (%s); retrying in 1 s", exc)
                time.sleep(1.0)

    def _next_entries(self) -> list[tuple[bytes, dict[bytes, bytes]]]:
        # Abandoned jobs first: they are the oldest work in the system.
        _, claimed, _ = self._redis.xautoclaim(
            JOB_STREAM, WORKER_GROUP, self._settings.consumer, self._settings.claim_idle_ms, "0-0", count=1
        )
        if claimed:
            return [(entry_id, fields) for entry_id, fields in claimed if fields]
        response = self._redis.xreadgroup(
            WORKER_GROUP, self._settings.consumer, {JOB_STREAM: ">"}, count=1, block=self._settings.block_ms
        )
        return [entry for _, entries in cast(list, response or []) for entry in entries]  # type: ignore[type-arg]

    def process(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        try:
            job = ExplanationJob.from_fields(fields)
        except ValueError:
            log.exception("dropping malformed stream entry %s", entry_id)
            self._redis.xack(JOB_STREAM, WORKER_GROUP, entry_id)
            return
        key = explanation_key(job.explanation_id)
        blob = self._redis.hget(key, RECORD_EXPLANATION)
        if blob is None:
            log.warning("explanation %s has no record (expired?); acknowledging its job", job.explanation_id)
            with self._redis.pipeline(transaction=True) as pipe:
                pipe.xack(JOB_STREAM, WORKER_GROUP, entry_id)
                pipe.zrem(tenant_inflight_key(job.tenant), job.explanation_id)
                pipe.execute()
            return
        record = types_pb2.Explanation.FromString(cast(bytes, blob))
        if record.state in FINAL_STATES:
            self._redis.xack(JOB_STREAM, WORKER_GROUP, entry_id)
            return
        record.attempts = int(self._redis.hincrby(key, RECORD_ATTEMPTS, 1))
        if record.attempts > self._settings.max_attempts:
            self._fail(
                entry_id, job, record, f"gave up after {self._settings.max_attempts} attempts that did not finish"
            )
            return
        record.state = types_pb2.EXPLANATION_STATE_RUNNING
        self._redis.hset(key, mapping={RECORD_EXPLANATION: record.SerializeToString(), RECORD_STATE: record.state})

        parent = context_from_traceparent(job.traceparent)
        with tracer.start_as_current_span(
            f"process {JOB_STREAM}",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "messaging.system": "redis",
                "messaging.operation.type": "process",
                "messaging.destination.name": JOB_STREAM,
                "sightline.explanation_id": job.explanation_id,
                "sightline.attempt": record.attempts,
            },
        ) as span:
            try:
                if job.weights_digest != self._loaded.weights_digest:
                    raise ValueError(
                        f"job wants weights {job.weights_digest[:12]}… but this worker holds "
                        f"{self._loaded.weights_digest[:12]}…"
                    )
                result = explain(
                    self._loaded,
                    HiddenStateCache(self._redis, self._settings.cache_ttl_seconds, job.tenant),
                    job.prompt_token_ids,
                    job.output_token_ids,
                    [(m.name, m.params) for m in job.methods],
                    job.served_logprobs,
                    job.options,
                )
            except ValueError as exc:
                # Invalid input fails the same way on every worker: no point retrying.
                span.record_exception(exc)
                self._fail(entry_id, job, record, str(exc))
                return
            except Exception as exc:
                log.exception("explanation %s failed (attempt %d)", job.explanation_id, record.attempts)
                span.record_exception(exc)
                if record.attempts >= self._settings.max_attempts:
                    self._fail(entry_id, job, record, f"{type(exc).__name__}: {exc}")
                # Otherwise the entry stays pending and is retried once claimable.
                return
        self._succeed(entry_id, job, record, result)

    def _succeed(
        self, entry_id: bytes, job: ExplanationJob, record: types_pb2.Explanation, result: types_pb2.Explanation
    ) -> None:
        final = types_pb2.Explanation()
        final.CopyFrom(result)
        final.explanation_id = record.explanation_id
        final.model = record.model
        final.created_at.CopyFrom(record.created_at)
        final.trace_id = record.trace_id
        final.attempts = record.attempts
        # The engine renders token texts; the served logprobs only the gateway's record knows.
        for token, served in zip(final.tokens, record.tokens, strict=True):
            if served.HasField("logprob"):
                token.logprob = served.logprob
        final.state = types_pb2.EXPLANATION_STATE_SUCCEEDED
        self._finish(entry_id, job, final)

    def _fail(self, entry_id: bytes, job: ExplanationJob, record: types_pb2.Explanation, reason: str) -> None:
        log.warning("explanation %s failed: %s", record.explanation_id, reason)
        record.state = types_pb2.EXPLANATION_STATE_FAILED
        record.error = reason
        self._finish(entry_id, job, record)

    def _finish(self, entry_id: bytes, job: ExplanationJob, record: types_pb2.Explanation) -> None:
        record.completed_at.GetCurrentTime()
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                explanation_key(record.explanation_id),
                mapping={RECORD_EXPLANATION: record.SerializeToString(), RECORD_STATE: record.state},
            )
            pipe.zrem(tenant_inflight_key(job.tenant), record.explanation_id)
            pipe.xack(JOB_STREAM, WORKER_GROUP, entry_id)
            pipe.publish(DONE_CHANNEL, record.explanation_id)
            pipe.execute()
