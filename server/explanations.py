"""The gateway's side of explanation jobs: validate, enqueue, wait, fetch.

Redis holds the whole state (see common/jobs.py), so gateway replicas stay stateless: any
replica can answer GetExplanation for a job another one enqueued.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
import redis.exceptions
from opentelemetry import trace
from sightline.v1 import explanations_pb2, types_pb2

from common.explain_spec import check_contrastive_support, check_distinct_methods, method_named
from common.fair_queue import ENQUEUE_KEYS, ENQUEUE_SCRIPT
from common.jobs import (
    CATALOG_KEY,
    DONE_CHANNEL,
    FINAL_STATES,
    JOB_STREAM,
    MODELS_KEY,
    RECORD_ATTEMPTS,
    RECORD_EXPLANATION,
    RECORD_JOB,
    RECORD_PROGRESS,
    RECORD_STATE,
    RECORD_SUMMARY,
    RECORD_TENANT,
    ExplainOptions,
    ExplanationJob,
    MethodRequest,
    ModelRecord,
    explanation_key,
    new_explanation_id,
    redis_text,
    tenant_explanations_key,
    worker_group_info,
)
from common.telemetry import current_traceparent
from server.costs import PlannedMethod
from server.errors import (
    REDIS_UNREACHABLE,
    GatewayError,
    invalid_argument,
    not_found,
    redis_errors_as_unavailable,
    resource_exhausted,
    shown,
    spec_errors_as_invalid_argument,
    unavailable,
)
from server.genai_spans import tracer
from server.limits import Tenant, TenantLimiter
from server.validation import check_within_vocabulary, method_request

log = logging.getLogger(__name__)


@dataclass
class ExplanationSlot:
    """One of a tenant's concurrent-explanation slots, taken before generating, for the explanation to come.

    Until its job is enqueued the slot is the gateway's to give back; from then on, the worker that writes the
    job's final record gives it back.
    """

    explanation_id: str
    enqueued: bool = False


class ExplanationBroker:
    """Creates explanation jobs and waits for their records to reach a final state."""

    def __init__(
        self,
        client: aioredis.Redis,
        redis_url: str,
        *,
        record_ttl_seconds: int,
        limiter: TenantLimiter,
        max_unfinished_jobs: int,
    ) -> None:
        self._redis = client
        self._redis_url = redis_url
        self._record_ttl_seconds = record_ttl_seconds
        self._limiter = limiter
        self._max_unfinished_jobs = max_unfinished_jobs
        self._enqueue_lock = asyncio.Lock()
        self._waiters: dict[str, list[asyncio.Future[None]]] = defaultdict(list)
        self._listener: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._listener = asyncio.create_task(self._listen_for_completions())

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except redis.exceptions.RedisError:
            return False

    async def catalog(self) -> explanations_pb2.ListMethodsResponse:
        with redis_errors_as_unavailable(self._redis_url):
            blob = await self._redis.get(CATALOG_KEY)
        if blob is None:
            raise unavailable("no explainer worker has registered its methods yet; start one (python -m explainers)")
        return explanations_pb2.ListMethodsResponse.FromString(cast(bytes, blob))

    async def validate_methods(self, spec: types_pb2.ExplainSpec) -> list[PlannedMethod]:
        """Check method names and parameter types against the workers' registry."""
        if not spec.methods:
            return []
        with spec_errors_as_invalid_argument():
            check_distinct_methods([method.name for method in spec.methods])
        catalog = {info.name: info for info in (await self.catalog()).methods}
        with spec_errors_as_invalid_argument():
            infos = [method_named(method.name, catalog) for method in spec.methods]
            check_contrastive_support(
                list(spec.targets.foil_token_ids), {info.name: info.supports_contrastive_targets for info in infos}
            )
        return [
            PlannedMethod(method_request(method, index, info), info)
            for index, (method, info) in enumerate(zip(spec.methods, infos, strict=True))
        ]

    async def check_backlog(self) -> None:
        """Refuse a new explanation with RESOURCE_EXHAUSTED while the workers are at the bound behind."""
        with redis_errors_as_unavailable(self._redis_url):
            unfinished = await self.unfinished_jobs()
        if unfinished >= self._max_unfinished_jobs:
            raise resource_exhausted(
                f"the explanation queue holds {unfinished} unfinished jobs, at this deployment's bound of "
                f"{self._max_unfinished_jobs} (SIGHTLINE_MAX_QUEUED_EXPLANATIONS); the explainer workers are behind: "
                "retry later, or add workers"
            )

    async def unfinished_jobs(self) -> int:
        """Jobs in the stream that no worker has acknowledged: the ones in a worker's hands and those not yet read."""
        try:
            groups = await self._redis.xinfo_groups(JOB_STREAM)
        except redis.exceptions.ResponseError:
            return 0  # no stream: nothing was ever enqueued
        group = worker_group_info(groups)
        if group is None:
            # No worker has created its group yet, so nothing in the stream was read.
            return int(await self._redis.xlen(JOB_STREAM))
        undelivered = group.get("lag")
        if undelivered is None:
            # Redis cannot tell the lag when entries were deleted after the last delivered one; count them,
            # up to the bound (all that matters here).
            after = f"({redis_text(group['last-delivered-id'])}"
            entries = await self._redis.xrange(JOB_STREAM, min=after, count=self._max_unfinished_jobs)
            undelivered = len(entries or [])
        return int(group["pending"]) + int(undelivered)

    async def model_record(self, model: str) -> ModelRecord:
        with redis_errors_as_unavailable(self._redis_url):
            record = await self._redis.hget(MODELS_KEY, model)
        if record is None:
            raise unavailable(f"no explainer worker holds the weights of model {model!r}; start one for it")
        return ModelRecord.from_json(cast(bytes, record))

    @contextlib.asynccontextmanager
    async def reserve(self, tenant: Tenant) -> AsyncIterator[ExplanationSlot]:
        """Take one of the tenant's explanation slots (RESOURCE_EXHAUSTED when it has none free) for the block;
        given back when the block ends without having enqueued its job, however it ends."""
        slot = ExplanationSlot(new_explanation_id())
        await self._limiter.acquire_explanation(tenant, slot.explanation_id)
        try:
            yield slot
        finally:
            if not slot.enqueued:
                # If Redis is gone, the slot's lease frees it.
                with contextlib.suppress(GatewayError):
                    await self._limiter.release_explanation(tenant, slot.explanation_id)

    async def submit(
        self,
        *,
        slot: ExplanationSlot,
        tenant: Tenant,
        model: str,
        prompt_token_ids: Sequence[int],
        output_tokens: Sequence[types_pb2.Token],
        served_logprobs: list[float] | None,
        methods: list[MethodRequest],
        options: ExplainOptions,
        trace_id: str,
        chat: list[dict[str, str]] | None = None,
        image_messages: list[dict[str, Any]] | None = None,
        images: Sequence[bytes] = (),
    ) -> types_pb2.Explanation:
        """Write a PENDING record under the slot's explanation id, index it under the tenant and enqueue its job
        atomically; return the record. The slot then belongs to the job. ``chat``: the messages a chat prompt was
        rendered from, for the worker to mark each token's role."""
        model_record = await self.model_record(model)
        digest = model_record.weights_digest
        check_within_vocabulary(prompt_token_ids, [t.id for t in output_tokens], options, model_record.vocab_size)
        explanation_id = slot.explanation_id
        pending = types_pb2.Explanation(
            explanation_id=explanation_id,
            state=types_pb2.EXPLANATION_STATE_PENDING,
            model=model,
            weights_digest=digest,
            tokens=[types_pb2.Token(id=t) for t in prompt_token_ids] + list(output_tokens),
            prompt_length=len(prompt_token_ids),
            target_positions=range(len(prompt_token_ids), len(prompt_token_ids) + len(output_tokens)),
            trace_id=trace_id,
        )
        pending.created_at.GetCurrentTime()
        with tracer.start_as_current_span(
            f"send {JOB_STREAM}",
            kind=trace.SpanKind.PRODUCER,
            attributes={
                "messaging.system": "redis",
                "messaging.operation.type": "send",
                "messaging.destination.name": JOB_STREAM,
                "sightline.explanation_id": explanation_id,
                "sightline.methods": [m.name for m in methods],
            },
        ):
            job = ExplanationJob(
                explanation_id=explanation_id,
                tenant=tenant.name,
                model=model,
                weights_digest=digest,
                prompt_token_ids=list(prompt_token_ids),
                output_token_ids=[t.id for t in output_tokens],
                served_logprobs=served_logprobs,
                methods=methods,
                traceparent=current_traceparent(),
                options=options,
                chat=chat,
                image_messages=image_messages,
                images=list(images),
            )
            summary = explanations_pb2.ExplanationSummary(
                explanation_id=explanation_id,
                model=model,
                methods=[m.name for m in methods],
                created_at=pending.created_at,
                trace_id=trace_id,
            )
            await self._store(pending, summary, tenant, job)
            slot.enqueued = True
        return pending

    async def _store(
        self,
        pending: types_pb2.Explanation,
        summary: explanations_pb2.ExplanationSummary,
        tenant: Tenant,
        job: ExplanationJob,
    ) -> None:
        key = explanation_key(pending.explanation_id)
        index = tenant_explanations_key(tenant.name)
        created_ms = pending.created_at.ToMilliseconds()
        with redis_errors_as_unavailable(self._redis_url):
            async with self._enqueue_lock, self._redis.pipeline(transaction=True) as pipe:
                # Counted again (first before generating) with one enqueue at a time, so concurrent requests
                # cannot pass the bound together; gateway replicas may each pass it by one.
                await self.check_backlog()
                pipe.hset(
                    key,
                    mapping={
                        RECORD_TENANT: tenant.name,
                        RECORD_ATTEMPTS: 0,
                        RECORD_EXPLANATION: pending.SerializeToString(),
                        RECORD_SUMMARY: summary.SerializeToString(),
                        RECORD_STATE: pending.state,
                        RECORD_JOB: job.to_json(),
                    },
                )
                pipe.expire(key, self._record_ttl_seconds)
                # The index lives as long as its newest record; entries of expired records are trimmed here.
                pipe.zadd(index, {pending.explanation_id: created_ms})
                pipe.zremrangebyscore(index, "-inf", created_ms - self._record_ttl_seconds * 1000)
                pipe.expire(index, self._record_ttl_seconds)
                # Queued for its tenant's fair share of the workers, with one turn on the job stream.
                pipe.eval(
                    ENQUEUE_SCRIPT,
                    len(ENQUEUE_KEYS),
                    *ENQUEUE_KEYS,
                    tenant.name,
                    pending.explanation_id,
                    tenant.limits.worker_share,
                )
                await pipe.execute()

    async def list_summaries(
        self, tenant: str, page_size: int, page_token: str
    ) -> tuple[list[explanations_pb2.ExplanationSummary], str]:
        """One page of the tenant's explanations, newest first, and the token of the next page ("" if last)."""
        cursor = _decode_page_token(page_token) if page_token else None
        with redis_errors_as_unavailable(self._redis_url):
            entries = await self._index_entries(tenant_explanations_key(tenant), page_size + 1, cursor)
            page = entries[:page_size]
            async with self._redis.pipeline(transaction=False) as pipe:
                for explanation_id, _ in page:
                    pipe.hmget(explanation_key(explanation_id), [RECORD_TENANT, RECORD_SUMMARY, RECORD_STATE])
                records = await pipe.execute()
        summaries = []
        for owner, blob, state in records:
            # A record that expired since it was indexed is left out, as is (defensively) anyone else's.
            if blob is None or owner is None or cast(bytes, owner).decode() != tenant:
                continue
            summary = explanations_pb2.ExplanationSummary.FromString(cast(bytes, blob))
            summary.state = int(cast(bytes, state))  # type: ignore[assignment]
            summaries.append(summary)
        next_token = _encode_page_token(*page[-1]) if len(entries) > page_size else ""
        return summaries, next_token

    async def _index_entries(self, index: str, count: int, cursor: tuple[str, float] | None) -> list[tuple[str, float]]:
        """Up to ``count`` (id, created ms) of a tenant index, newest first, after ``cursor`` when given."""
        await self._redis.zremrangebyscore(index, "-inf", time.time() * 1000 - self._record_ttl_seconds * 1000)
        if cursor is None:
            raw = await self._redis.zrevrangebyscore(index, "+inf", "-inf", start=0, num=count, withscores=True)
            return _decoded(raw)
        # Resume after the cursor: older entries, and those created in the same millisecond that sort after
        # it (ties come in descending id order), of which there are at most as many as share its score.
        last_id, last_ms = cursor
        ties = int(await self._redis.zcount(index, last_ms, last_ms))
        raw = await self._redis.zrevrangebyscore(index, last_ms, "-inf", start=0, num=count + ties, withscores=True)
        return [(i, ms) for i, ms in _decoded(raw) if not (ms == last_ms and i >= last_id)][:count]

    async def get(self, explanation_id: str, tenant: str) -> types_pb2.Explanation:
        with redis_errors_as_unavailable(self._redis_url):
            return await self._read(explanation_id, tenant)

    async def _read(self, explanation_id: str, tenant: str) -> types_pb2.Explanation:
        key = explanation_key(explanation_id)
        tenant_value, blob, progress = await self._redis.hmget(
            key, [RECORD_TENANT, RECORD_EXPLANATION, RECORD_PROGRESS]
        )
        # Another tenant's explanation is reported exactly like a missing one: no existence leak.
        if blob is None or tenant_value is None or cast(bytes, tenant_value).decode() != tenant:
            raise not_found(
                f"no explanation with id {shown(explanation_id)}; ids come from Generate or Explain responses "
                f"and expire {self._record_ttl_seconds} s after creation"
            )
        record = types_pb2.Explanation.FromString(cast(bytes, blob))
        if progress is not None and record.state not in FINAL_STATES:
            # Published by the worker beside the record, a few times a second (a final record carries its own).
            record.progress.ParseFromString(cast(bytes, progress))
        return record

    async def wait(self, explanation_id: str, tenant: str, timeout: float) -> types_pb2.Explanation:
        """The record once final, or its latest readable state when ``timeout`` seconds pass first.

        Only the first read fails fast with UNAVAILABLE when Redis is down; a waiter that already holds
        the record rides out a Redis restart and re-reads once the completion listener is back.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        completion = self._add_waiter(explanation_id)
        try:
            # Registered before reading, so a completion published in between is not missed.
            record = await self.get(explanation_id, tenant)
            while record.state not in FINAL_STATES and (remaining := deadline - loop.time()) > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(completion, remaining)
                self._remove_waiter(explanation_id, completion)
                completion = self._add_waiter(explanation_id)
                with contextlib.suppress(*REDIS_UNREACHABLE):
                    record = await self._read(explanation_id, tenant)
            return record
        finally:
            self._remove_waiter(explanation_id, completion)

    def _add_waiter(self, explanation_id: str) -> asyncio.Future[None]:
        completion: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[explanation_id].append(completion)
        return completion

    def _remove_waiter(self, explanation_id: str, completion: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(explanation_id, [])
        if completion in waiters:
            waiters.remove(completion)
        if not waiters:
            self._waiters.pop(explanation_id, None)

    async def _listen_for_completions(self) -> None:
        backoff = 0.1
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(DONE_CHANNEL)
                    backoff = 0.1
                    # Wake every waiter: each re-reads its record, so nothing that finished while this
                    # listener was not subscribed (a Redis restart) is missed.
                    for explanation_id in list(self._waiters):
                        self._wake(explanation_id)
                    async for message in pubsub.listen():
                        if message.get("type") != "message":
                            continue
                        data = message["data"]
                        self._wake(data.decode() if isinstance(data, bytes) else str(data))
            except REDIS_UNREACHABLE as exc:
                log.warning("completion listener lost Redis (%s); reconnecting in %.1f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def _wake(self, explanation_id: str) -> None:
        for future in self._waiters.get(explanation_id, []):
            if not future.done():
                future.set_result(None)


def _decoded(entries: object) -> list[tuple[str, float]]:
    """(member, score) pairs of a sorted-set reply with scores."""
    return [(member.decode(), float(score)) for member, score in cast(list[tuple[bytes, float]], entries)]


def _encode_page_token(explanation_id: str, created_ms: float) -> str:
    return base64.urlsafe_b64encode(json.dumps([created_ms, explanation_id]).encode()).decode()


def _decode_page_token(token: str) -> tuple[str, float]:
    try:
        created_ms, explanation_id = json.loads(base64.urlsafe_b64decode(token.encode()))
        number = isinstance(created_ms, int | float) and not isinstance(created_ms, bool)
        # Issued tokens hold a finite millisecond time; NaN would reach Redis as a score it refuses.
        if number and math.isfinite(created := float(created_ms)) and isinstance(explanation_id, str):
            return explanation_id, created
    except (ValueError, TypeError, OverflowError, binascii.Error):
        pass
    raise invalid_argument(
        "page_token is not one this server issued; pass next_page_token from the previous ListExplanations "
        "response unchanged, or leave it empty for the first page"
    )
