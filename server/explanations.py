"""The gateway's side of explanation jobs: validate, enqueue, wait, fetch.

Redis holds the whole state (see common/jobs.py), so gateway replicas stay stateless: any
replica can answer GetExplanation for a job another one enqueued.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import cast

import redis.asyncio as aioredis
import redis.exceptions
from google.protobuf import json_format
from opentelemetry import trace
from sightline.v1 import explanations_pb2, types_pb2

from common.jobs import (
    CATALOG_KEY,
    DONE_CHANNEL,
    JOB_STREAM,
    MODELS_KEY,
    RECORD_ATTEMPTS,
    RECORD_EXPLANATION,
    RECORD_TENANT,
    ExplainOptions,
    ExplanationJob,
    MethodRequest,
    ModelRecord,
    explanation_key,
    new_explanation_id,
)
from common.telemetry import current_traceparent
from server.costs import PlannedMethod
from server.errors import invalid_argument, not_found, unavailable

log = logging.getLogger(__name__)
tracer = trace.get_tracer("sightline.gateway")

FINAL_STATES = (types_pb2.EXPLANATION_STATE_SUCCEEDED, types_pb2.EXPLANATION_STATE_FAILED)


# Redis failures that a later retry can get past (a restart, a network blip), as opposed to bad commands.
REDIS_UNREACHABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


@contextlib.contextmanager
def redis_errors_as_unavailable(redis_url: str) -> Iterator[None]:
    try:
        yield
    except REDIS_UNREACHABLE as exc:
        raise unavailable(
            f"the explanation store (Redis at {redis_url}) is unreachable ({exc}); retry in a few seconds: "
            "explanations already stored and jobs already queued are kept"
        ) from exc


class ExplanationBroker:
    """Creates explanation jobs and waits for their records to reach a final state."""

    def __init__(self, client: aioredis.Redis, redis_url: str, *, record_ttl_seconds: int) -> None:
        self._redis = client
        self._redis_url = redis_url
        self._record_ttl_seconds = record_ttl_seconds
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
        catalog = {info.name: info for info in (await self.catalog()).methods}
        planned = []
        for method in spec.methods:
            info = catalog.get(method.name)
            if info is None:
                known = ", ".join(sorted(catalog))
                raise invalid_argument(f"unknown explain method {method.name!r}; available methods: {known}")
            params = json_format.MessageToDict(method.params) if method.HasField("params") else {}
            planned.append(PlannedMethod(MethodRequest(method.name, _typed_params(info, params)), info))
        names = [m.request.name for m in planned]
        if len(set(names)) != len(names):
            raise invalid_argument(f"explain methods must be distinct; got {names}")
        return planned

    async def model_record(self, model: str) -> ModelRecord:
        with redis_errors_as_unavailable(self._redis_url):
            record = await self._redis.hget(MODELS_KEY, model)
        if record is None:
            raise unavailable(f"no explainer worker holds the weights of model {model!r}; start one for it")
        return ModelRecord.from_json(cast(bytes, record))

    async def submit(
        self,
        *,
        tenant: str,
        model: str,
        prompt_token_ids: Sequence[int],
        output_tokens: Sequence[types_pb2.Token],
        served_logprobs: list[float] | None,
        methods: list[MethodRequest],
        options: ExplainOptions,
        trace_id: str,
    ) -> types_pb2.Explanation:
        """Write a PENDING record and enqueue its job atomically; return the record."""
        model_record = await self.model_record(model)
        digest = model_record.weights_digest
        out_of_vocabulary = sorted(
            {
                t
                for t in [*prompt_token_ids, *(t.id for t in output_tokens), *options.foil_token_ids]
                if t >= model_record.vocab_size
            }
        )
        if out_of_vocabulary:
            raise invalid_argument(
                f"token ids {out_of_vocabulary[:5]} are outside the model's vocabulary "
                f"(ids 0 to {model_record.vocab_size - 1})"
            )
        explanation_id = new_explanation_id()
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
                tenant=tenant,
                model=model,
                weights_digest=digest,
                prompt_token_ids=list(prompt_token_ids),
                output_token_ids=[t.id for t in output_tokens],
                served_logprobs=served_logprobs,
                methods=methods,
                traceparent=current_traceparent(),
                options=options,
            )
            key = explanation_key(explanation_id)
            with redis_errors_as_unavailable(self._redis_url):
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.hset(
                        key,
                        mapping={
                            RECORD_TENANT: tenant,
                            RECORD_ATTEMPTS: 0,
                            RECORD_EXPLANATION: pending.SerializeToString(),
                        },
                    )
                    pipe.expire(key, self._record_ttl_seconds)
                    pipe.xadd(JOB_STREAM, job.to_fields())  # type: ignore[arg-type]
                    await pipe.execute()
        return pending

    async def get(self, explanation_id: str, tenant: str) -> types_pb2.Explanation:
        with redis_errors_as_unavailable(self._redis_url):
            return await self._read(explanation_id, tenant)

    async def _read(self, explanation_id: str, tenant: str) -> types_pb2.Explanation:
        key = explanation_key(explanation_id)
        tenant_value, blob = await self._redis.hmget(key, [RECORD_TENANT, RECORD_EXPLANATION])
        # Another tenant's explanation is reported exactly like a missing one: no existence leak.
        if blob is None or tenant_value is None or cast(bytes, tenant_value).decode() != tenant:
            raise not_found(
                f"no explanation with id {explanation_id!r}; ids come from Generate or Explain responses "
                f"and expire {self._record_ttl_seconds} s after creation"
            )
        return types_pb2.Explanation.FromString(cast(bytes, blob))

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


def _typed_params(info: explanations_pb2.MethodInfo, params: dict[str, object]) -> dict[str, object]:
    declared = {p.name: p for p in info.params}
    typed: dict[str, object] = {}
    for name, value in params.items():
        param = declared.get(name)
        if param is None:
            known = ", ".join(sorted(declared)) or "none"
            raise invalid_argument(f"method {info.name!r} has no parameter {name!r}; its parameters: {known}")
        typed[name] = _coerce(info.name, param, value)
    return typed


def _coerce(method: str, param: explanations_pb2.MethodParam, value: object) -> object:
    where = f"parameter {param.name!r} of method {method!r}"
    if param.type == explanations_pb2.PARAM_TYPE_BOOL:
        if isinstance(value, bool):
            return value
        raise invalid_argument(f"{where} must be a boolean; got {value!r}")
    if param.type == explanations_pb2.PARAM_TYPE_STRING:
        if not isinstance(value, str):
            raise invalid_argument(f"{where} must be a string; got {value!r}")
        if param.choices and value not in param.choices:
            raise invalid_argument(f"{where} must be one of {', '.join(param.choices)}; got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise invalid_argument(f"{where} must be a finite number; got {value!r}")
    if param.type == explanations_pb2.PARAM_TYPE_INT and not float(value).is_integer():
        raise invalid_argument(f"{where} must be an integer; got {value!r}")
    too_low = param.HasField("minimum") and value < param.minimum
    too_high = param.HasField("maximum") and value > param.maximum
    if too_low or too_high:
        low = _number(param.minimum) if param.HasField("minimum") else ""
        high = _number(param.maximum) if param.HasField("maximum") else ""
        raise invalid_argument(f"{where} must be in {low}..{high}; got {value!r}")
    return int(value) if param.type == explanations_pb2.PARAM_TYPE_INT else float(value)


def _number(value: float) -> str:
    return str(int(value)) if value.is_integer() else str(value)
