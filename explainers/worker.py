"""The explainer worker: a Redis Streams consumer that computes explanations.

Each job is acknowledged only after its record reaches a final state, in the same
transaction, so a worker killed mid-job leaves the entry pending and another worker claims
it once it has been idle for ``claim_idle_ms``. While a worker computes, it renews its lease
on the entry (resets its idle time) several times per ``claim_idle_ms``, so only a dead or
stalled worker's job becomes claimable, however long the job takes. Records are written whole
and keyed by explanation id, so a job computed twice (a stalled worker and its claimant)
stores the same result twice, never a half-written one. A job that keeps failing, or keeps
killing the workers that take it, is marked FAILED with its reason after ``max_attempts``;
nothing is dropped silently. The transaction that writes a final record also gives the
explanation's slot back to its tenant's concurrency limit.

The stream's entries are turns, not jobs: a worker runs the job assigned to its turn when it
first takes it, the next one in the tenants' fair queue (see common/fair_queue.py), so a claimant
of a dead worker's turn runs the same job. Acknowledging a turn forgets its assignment in the same
transaction.

Each job's hidden states are cached under its own tenant (see explainers/hidden_cache.py).

While it computes, a worker publishes the job's progress into its record a few times a second and, in the same
round trip, learns whether someone cancelled it (explainers/progress.py); a cancelled job is stored CANCELLED, as far
as it got, in the same transaction that acknowledges its turn and frees its tenant's slot.

A worker asked to stop finishes the job in hand; one that cannot within its shutdown grace
hands the job back (immediately claimable, the attempt not counted) and exits.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

import redis
from opentelemetry import trace
from sightline.v1 import types_pb2

from common.fair_queue import TAKE_TURN_KEYS, TAKE_TURN_SCRIPT
from common.jobs import (
    CATALOG_KEY,
    DONE_CHANNEL,
    FINAL_STATES,
    JOB_ASSIGNED_KEY,
    JOB_STREAM,
    MODELS_KEY,
    PASS_SECONDS_KEY,
    RECORD_ATTEMPTS,
    RECORD_CANCEL,
    RECORD_EXPLANATION,
    RECORD_JOB,
    RECORD_PROGRESS,
    RECORD_STATE,
    WORKER_GROUP,
    ExplanationJob,
    ModelRecord,
    explanation_key,
    redis_text,
    tenant_inflight_key,
    worker_group_info,
)
from common.telemetry import context_from_traceparent
from explainers import metrics
from explainers.engine import explain
from explainers.hidden_cache import HiddenStateCache
from explainers.image_explain import explain_images
from explainers.image_methods.registry import image_catalog
from explainers.methods.registry import catalog as method_catalog
from explainers.model import LoadedModel
from explainers.progress import JobCancelled, Publisher, Tracking
from explainers.telemetry import record_evaluations, tracer
from explainers.vlm import LoadedVlm

log = logging.getLogger(__name__)

# Both scripts act only while ARGV[2] (this consumer) still owns entry ARGV[3] of stream KEYS[1] in
# group ARGV[1]: an entry another worker claimed, or one already acknowledged, is left alone.
# XCLAIM ... JUSTID resets the entry's idle time without counting a delivery.
RENEW_LEASE_SCRIPT = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2]) == 0 then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
"""
# Also backdates the entry's idle time to ARGV[4] ms, so the next XAUTOCLAIM takes it at once, and
# rewrites the record KEYS[2] as PENDING (ARGV[5]) with the attempt uncounted (ARGV[6]).
HAND_BACK_SCRIPT = f"""
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2]) == 0 then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'IDLE', ARGV[4], 'JUSTID')
redis.call('HSET', KEYS[2], '{RECORD_EXPLANATION}', ARGV[5], '{RECORD_ATTEMPTS}', ARGV[6], '{RECORD_STATE}', ARGV[7])
return 1
"""

# Marks record KEYS[1] RUNNING (ARGV[1], the serialized record; ARGV[2], its state) unless someone asked for the
# job to stop, atomically with the gateway's cancel (server/job_control.py); returns who asked, or nil.
MARK_RUNNING_SCRIPT = f"""
local cancelled_by = redis.call('HGET', KEYS[1], '{RECORD_CANCEL}')
if cancelled_by then return cancelled_by end
redis.call('HSET', KEYS[1], '{RECORD_EXPLANATION}', ARGV[1], '{RECORD_STATE}', ARGV[2])
return false
"""

# A first guess at the seconds of one forward pass per token, until a worker has measured one.
DEFAULT_SECONDS_PER_TOKEN_PASS = 1e-3
# Weight of the newest measurement in the published seconds per token-pass (an exponential average).
PASS_SECONDS_SMOOTHING = 0.5

# How often a worker deletes the job stream's finished entries past their retention.
TRIM_INTERVAL_S = 60.0


@dataclass(frozen=True)
class WorkerSettings:
    consumer: str
    max_attempts: int = 3
    # A pending job idle this long is assumed abandoned by a dead worker and claimed.
    claim_idle_ms: int = 60_000
    block_ms: int = 1_000
    # How long hidden states stay cached.
    cache_ttl_seconds: int = 3600
    # How long an acknowledged job stays in the stream (for inspection with XRANGE) before a worker deletes it.
    job_retention_seconds: int = 3600

    @property
    def lease_renewal_seconds(self) -> float:
        # Four renewals per idle timeout: a live worker's job stays unclaimable even if one or two are late.
        return self.claim_idle_ms / 4000


@dataclass(frozen=True)
class HeldJob:
    """The job a worker is computing: its stream entry and its record as marked RUNNING."""

    entry_id: bytes
    record: types_pb2.Explanation


class ExplainerWorker:
    def __init__(self, client: redis.Redis, loaded: LoadedModel | LoadedVlm, settings: WorkerSettings) -> None:
        self._redis = client
        self._loaded = loaded
        self._settings = settings
        self._renew_lease = client.register_script(RENEW_LEASE_SCRIPT)
        self._hand_back = client.register_script(HAND_BACK_SCRIPT)
        self._take_turn = client.register_script(TAKE_TURN_SCRIPT)
        self._mark_running = client.register_script(MARK_RUNNING_SCRIPT)
        self._held: HeldJob | None = None
        self._next_trim = time.monotonic()

    def register(self) -> None:
        """Create the consumer group and publish this worker's methods and weights digest."""
        try:
            self._redis.xgroup_create(JOB_STREAM, WORKER_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        catalog = (
            image_catalog(self._loaded.model_name, self._loaded.architecture)
            if isinstance(self._loaded, LoadedVlm)
            else method_catalog(self._loaded)
        )
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(CATALOG_KEY, catalog.SerializeToString())
            pipe.hset(
                MODELS_KEY,
                self._loaded.model_name,
                ModelRecord(self._loaded.weights_digest, self._loaded.vocab_size).to_json(),
            )
            pipe.execute()

    def run(self, stop: threading.Event) -> None:
        """Process jobs until ``stop`` is set; the job in hand is finished first (see ``abandon_held_job``)."""
        while not stop.is_set():
            try:
                for entry_id, fields in self._next_entries():
                    if stop.is_set():
                        # Delivered while stopping: give it straight back rather than start it.
                        self._redis.xclaim(
                            JOB_STREAM,
                            WORKER_GROUP,
                            self._settings.consumer,
                            0,
                            [entry_id],
                            idle=self._settings.claim_idle_ms,
                            justid=True,
                        )
                        continue
                    self.process(entry_id, fields)
                if time.monotonic() >= self._next_trim:
                    self._next_trim = time.monotonic() + TRIM_INTERVAL_S
                    self.trim_acknowledged()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("lost Redis (%s); retrying in 1 s", exc)
                time.sleep(1.0)

    def trim_acknowledged(self) -> int:
        """Delete the job stream's entries that every worker is done with and that are older than the retention, so
        the stream does not grow forever; returns how many went. Done with: the entries before both the group's
        oldest pending entry (in a worker's hands, or abandoned and waiting to be claimed) and its first undelivered
        one, which were all delivered and acknowledged. Entry ids start with their enqueue time in milliseconds, so
        the retention is one more bound. No race: later deliveries and claims only concern entries above the
        bound, so workers need no lock to trim side by side."""
        groups = self._redis.xinfo_groups(JOB_STREAM)
        group = worker_group_info(groups)
        if group is None:
            return 0
        last_delivered = _stream_id(group["last-delivered-id"])
        retention_start = int(time.time() * 1000) - self._settings.job_retention_seconds * 1000
        bound = min((last_delivered[0], last_delivered[1] + 1), (retention_start, 0))
        oldest_pending = self._redis.xpending(JOB_STREAM, WORKER_GROUP)["min"]
        if oldest_pending is not None:
            bound = min(bound, _stream_id(oldest_pending))
        return int(self._redis.xtrim(JOB_STREAM, minid=f"{bound[0]}-{bound[1]}", approximate=False))

    def abandon_held_job(self) -> HeldJob | None:
        """Hand the job being computed back to the group, for a worker that must exit before finishing it.

        Called from another thread while ``run`` computes. The entry becomes claimable at once and the
        record reads PENDING with this attempt uncounted, unless the job was finished (or claimed by
        another worker) meanwhile, which the script checks atomically. Returns the job, if one was held.
        """
        held = self._held
        if held is None:
            return None
        pending = types_pb2.Explanation()
        pending.CopyFrom(held.record)
        pending.state = types_pb2.EXPLANATION_STATE_PENDING
        pending.attempts -= 1
        self._hand_back(
            keys=[JOB_STREAM, explanation_key(pending.explanation_id)],
            args=[
                WORKER_GROUP,
                self._settings.consumer,
                held.entry_id,
                self._settings.claim_idle_ms,
                pending.SerializeToString(),
                pending.attempts,
                pending.state,
            ],
        )
        return held

    def _next_entries(self) -> list[tuple[bytes, dict[bytes, bytes]]]:
        # Abandoned jobs first: they are the oldest work in the system.
        _, claimed, _ = self._redis.xautoclaim(
            JOB_STREAM, WORKER_GROUP, self._settings.consumer, self._settings.claim_idle_ms, "0-0", count=1
        )
        if claimed:
            log.info("claimed job %s: idle past the claim timeout, its worker died or handed it back", claimed[0][0])
            return [(entry_id, fields) for entry_id, fields in claimed if fields]
        response = self._redis.xreadgroup(
            WORKER_GROUP, self._settings.consumer, {JOB_STREAM: ">"}, count=1, block=self._settings.block_ms
        )
        return [entry for _, entries in cast(list, response or []) for entry in entries]  # type: ignore[type-arg]

    def process(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        """Run the job of turn ``entry_id``: the one assigned to it, or the next in the fair queue."""
        assigned = self._take_turn(keys=list(TAKE_TURN_KEYS), args=[entry_id])
        if assigned is None:
            log.warning("dropping turn %s (%s): no job is queued for it", entry_id, fields)
            self._drop_turn(entry_id)
            return
        explanation_id = redis_text(assigned)
        key = explanation_key(explanation_id)
        blob, job_json = self._redis.hmget(key, [RECORD_EXPLANATION, RECORD_JOB])
        if blob is None:
            # Its tenant's slot is freed when the slot's lease ends.
            log.warning("explanation %s has no record (expired?); acknowledging its turn", explanation_id)
            self._drop_turn(entry_id)
            return
        record = types_pb2.Explanation.FromString(cast(bytes, blob))
        if record.state in FINAL_STATES:
            self._drop_turn(entry_id)
            return
        try:
            job = ExplanationJob.from_json(cast(bytes, job_json or b""))
        except ValueError:
            log.exception("dropping the malformed job of explanation %s", explanation_id)
            self._drop_turn(entry_id)
            return
        record.attempts = int(self._redis.hincrby(key, RECORD_ATTEMPTS, 1))
        if record.attempts > self._settings.max_attempts:
            # This delivery only finds the attempts used up; the record counts the ones actually made.
            record.attempts = self._settings.max_attempts
            self._fail(
                entry_id,
                job,
                record,
                types_pb2.EXPLANATION_ERROR_CODE_ATTEMPTS_EXHAUSTED,
                f"gave up after {self._settings.max_attempts} attempts: every worker that took this job stopped "
                "before finishing it (killed, crashed or out of memory); see the explainer workers' logs",
            )
            return
        record.state = types_pb2.EXPLANATION_STATE_RUNNING
        cancelled_by = self._mark_running(keys=[key], args=[record.SerializeToString(), record.state])
        if cancelled_by is not None:
            # Asked to stop before it started (a job handed back or claimed after a cancel): nothing to compute.
            self._cancel(entry_id, job, record, redis_text(cancelled_by))
            return
        # A copy: computing mutates ``record`` into its final state, and a hand-back must not store that.
        running = types_pb2.Explanation()
        running.CopyFrom(record)
        with self._holding(HeldJob(entry_id, running)):
            self._compute(entry_id, job, record)

    def _drop_turn(self, entry_id: bytes) -> None:
        """Acknowledge a turn whose job is done, gone or unreadable."""
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(JOB_STREAM, WORKER_GROUP, entry_id)
            pipe.hdel(JOB_ASSIGNED_KEY, entry_id)
            pipe.execute()

    @contextlib.contextmanager
    def _holding(self, held: HeldJob) -> Iterator[None]:
        """Mark ``held`` as the job in hand and renew its lease until the block exits."""
        released = threading.Event()

        def renew() -> None:
            while not released.wait(self._settings.lease_renewal_seconds):
                try:
                    owned = self._renew_lease(
                        keys=[JOB_STREAM], args=[WORKER_GROUP, self._settings.consumer, held.entry_id]
                    )
                except redis.RedisError as exc:
                    log.warning("could not renew the lease on %s: %s", held.entry_id, exc)
                    continue
                if not owned:
                    # Claimed by another worker after this one stalled: both results are whole, the last one stays.
                    log.warning("explanation %s was claimed by another worker", held.record.explanation_id)
                    return

        renewer = threading.Thread(target=renew, name="lease-renewal", daemon=True)
        self._held = held
        renewer.start()
        try:
            yield
        finally:
            self._held = None
            released.set()
            renewer.join()

    def _compute(self, entry_id: bytes, job: ExplanationJob, record: types_pb2.Explanation) -> None:
        parent = context_from_traceparent(job.traceparent)
        with (
            tracer.start_as_current_span(
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
            ) as span,
            metrics.JOB_SECONDS.time(),
        ):
            try:
                if job.weights_digest != self._loaded.weights_digest:
                    raise ValueError(
                        f"job wants weights {job.weights_digest[:12]}… but this worker holds "
                        f"{self._loaded.weights_digest[:12]}…"
                    )
                num_tokens = len(job.prompt_token_ids) + len(job.output_token_ids)
                tracking = Tracking(
                    progress_publisher(self._redis, record), self._seconds_per_token_pass() * num_tokens
                )
                cache = HiddenStateCache(self._redis, self._settings.cache_ttl_seconds, job.tenant)
                result = self._explain(job, cache, tracking)
                record_evaluations(span, result, served_compared=job.served_logprobs is not None)
                span.set_status(trace.Status(trace.StatusCode.OK))
            except JobCancelled as exc:
                span.set_attribute("sightline.cancelled_by", exc.cancelled_by)
                self._cancel(entry_id, job, record, exc.cancelled_by)
                return
            except ValueError as exc:
                # Invalid input fails the same way on every worker: no point retrying.
                span.record_exception(exc)
                self._fail(entry_id, job, record, types_pb2.EXPLANATION_ERROR_CODE_INVALID_INPUT, str(exc))
                return
            except Exception as exc:
                log.exception("explanation %s failed (attempt %d)", job.explanation_id, record.attempts)
                span.record_exception(exc)
                if record.attempts >= self._settings.max_attempts:
                    self._fail(
                        entry_id,
                        job,
                        record,
                        types_pb2.EXPLANATION_ERROR_CODE_INTERNAL,
                        f"{type(exc).__name__}: {exc}",
                        exception=type(exc).__name__,
                    )
                else:
                    metrics.JOBS_FINISHED.labels("retried").inc()
                # Otherwise the entry stays pending and is retried once claimable.
                return
        self._succeed(entry_id, job, record, result)
        metrics.observe_success(result, served_compared=job.served_logprobs is not None)
        self._publish_pass_seconds(tracking.seconds_per_pass / num_tokens)

    def _explain(self, job: ExplanationJob, cache: HiddenStateCache, tracking: Tracking) -> types_pb2.Explanation:
        """The job's explanation by the path the model held takes: the image methods for an image-text model, the
        text methods (explainers.engine) for a causal LM. Each refuses the other's jobs (ValueError: not retried)."""
        if isinstance(self._loaded, LoadedVlm):
            return explain_images(self._loaded, cache, job, tracking)
        if job.images:
            raise ValueError(
                f"this worker's model {self._loaded.model_name} is a text model: it does not explain requests with "
                "pictures"
            )
        return explain(
            self._loaded,
            cache,
            job.prompt_token_ids,
            job.output_token_ids,
            [(m.name, m.params) for m in job.methods],
            job.served_logprobs,
            job.options,
            tracking,
            job.chat,
        )

    def _seconds_per_token_pass(self) -> float:
        """The seconds of one forward pass per token, as the workers last measured it for this model."""
        try:
            measured = self._redis.hget(PASS_SECONDS_KEY, self._loaded.model_name)
        except (redis.ConnectionError, redis.TimeoutError):
            measured = None
        return DEFAULT_SECONDS_PER_TOKEN_PASS if measured is None else float(cast(bytes, measured))

    def _publish_pass_seconds(self, measured: float) -> None:
        """Fold this job's seconds per token-pass into the published average that EstimateExplanation reads."""
        previous = self._seconds_per_token_pass()
        smoothed = PASS_SECONDS_SMOOTHING * measured + (1 - PASS_SECONDS_SMOOTHING) * previous
        with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
            self._redis.hset(PASS_SECONDS_KEY, self._loaded.model_name, repr(smoothed))

    def _cancel(self, entry_id: bytes, job: ExplanationJob, record: types_pb2.Explanation, cancelled_by: str) -> None:
        """Record the job as CANCELLED by ``cancelled_by``, as far as it got, and acknowledge its turn."""
        log.info("explanation %s cancelled by %s", record.explanation_id, cancelled_by)
        record.state = types_pb2.EXPLANATION_STATE_CANCELLED
        record.cancelled_by = cancelled_by
        self._finish(entry_id, job, record)
        metrics.JOBS_FINISHED.labels("cancelled").inc()

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
        final.progress.CopyFrom(types_pb2.ExplanationProgress(fraction=1.0, seconds_left=0.0))
        final.progress.methods.extend(
            types_pb2.MethodProgress(method=method.method, fraction=1.0) for method in record.progress.methods
        )
        self._finish(entry_id, job, final)
        log.info("explanation %s succeeded (attempt %d)", final.explanation_id, final.attempts)

    def _fail(
        self,
        entry_id: bytes,
        job: ExplanationJob,
        record: types_pb2.Explanation,
        code: types_pb2.ExplanationErrorCode,
        reason: str,
        **details: str,
    ) -> None:
        log.warning("explanation %s failed: %s", record.explanation_id, reason)
        record.state = types_pb2.EXPLANATION_STATE_FAILED
        record.error.CopyFrom(
            types_pb2.ExplanationError(code=code, message=reason, details={"attempts": str(record.attempts), **details})
        )
        self._finish(entry_id, job, record)
        metrics.JOBS_FINISHED.labels("failed").inc()

    def _finish(self, entry_id: bytes, job: ExplanationJob, record: types_pb2.Explanation) -> None:
        record.completed_at.GetCurrentTime()
        delay = 0.1
        while True:
            try:
                with self._redis.pipeline(transaction=True) as pipe:
                    pipe.hset(
                        explanation_key(record.explanation_id),
                        mapping={RECORD_EXPLANATION: record.SerializeToString(), RECORD_STATE: record.state},
                    )
                    pipe.hdel(explanation_key(record.explanation_id), RECORD_JOB, RECORD_PROGRESS)
                    pipe.zrem(tenant_inflight_key(job.tenant), record.explanation_id)
                    pipe.xack(JOB_STREAM, WORKER_GROUP, entry_id)
                    pipe.hdel(JOB_ASSIGNED_KEY, entry_id)
                    pipe.publish(DONE_CHANNEL, record.explanation_id)
                    pipe.execute()
                return
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                # The result is in hand: keep it until Redis is back rather than recompute it later. Writing
                # again after a lost reply is harmless: the same whole record, an XACK that acks nothing.
                log.warning(
                    "could not store explanation %s (%s); retrying in %.1f s", record.explanation_id, exc, delay
                )
                time.sleep(delay)
                delay = min(delay * 2, 2.0)


def progress_publisher(client: redis.Redis, record: types_pb2.Explanation) -> Publisher:
    """Writes a job's progress into its record's progress field (and ``record``, so a cancelled or failed record
    keeps how far it got) and reads back who cancelled the job, if anyone: one round trip, made at most a few
    times a second (see explainers/progress.py)."""
    key = explanation_key(record.explanation_id)

    def publish(progress: types_pb2.ExplanationProgress) -> str | None:
        record.progress.CopyFrom(progress)
        try:
            with client.pipeline(transaction=False) as pipe:
                pipe.hset(key, RECORD_PROGRESS, progress.SerializeToString())
                pipe.hget(key, RECORD_CANCEL)
                _, cancelled_by = pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            # Progress is advisory: the job goes on, and the next checkpoint asks again.
            log.warning("could not publish the progress of %s: %s", record.explanation_id, exc)
            return None
        return None if cancelled_by is None else redis_text(cancelled_by)

    return publish


def _stream_id(value: bytes | str) -> tuple[int, int]:
    """A stream entry id "milliseconds-sequence" as a pair that orders as the ids do."""
    milliseconds, sequence = redis_text(value).split("-")
    return int(milliseconds), int(sequence)
