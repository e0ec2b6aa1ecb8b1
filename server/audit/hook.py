"""The servicers' audit hook: one entry per served Generate, GenerateStream and Explain call.

``@audited`` goes under ``@unary_rpc``/``@stream_rpc`` (so it runs inside the call's span, after
authentication). A call that succeeds replies only once its entry has committed; when the entry cannot be
written the call fails UNAVAILABLE instead of answering without a trail. A call that fails is logged with its
status too, and its error goes out after that entry commits (if the entry cannot be written, the call's own error
still goes out; a cancelled call's entry is written after it ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import inspect
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from opentelemetry import trace
from sightline.v1 import explanations_pb2, inference_pb2, types_pb2

from common.telemetry import trace_id_hex
from server.audit.log import ENTRY_VERSION, AuditLog, finite, now_ms
from server.audit.store import NewEntry
from server.auth import Authenticator
from server.errors import GatewayError, unavailable
from server.explanations import ExplanationBroker
from server.limits import Tenant

log = logging.getLogger(__name__)

# How long the model's weights digest and the method catalogue's digest are reused before Redis is asked again.
MODEL_INFO_TTL_S = 30.0

Response = inference_pb2.GenerateResponse | inference_pb2.GenerateStreamResponse | explanations_pb2.ExplainResponse
Request = inference_pb2.GenerateRequest | explanations_pb2.ExplainRequest


class AuditRecorder:
    """Builds request entries and appends them to the log."""

    def __init__(
        self, audit_log: AuditLog, broker: ExplanationBroker, authenticator: Authenticator, *, record_inputs: bool
    ) -> None:
        self.log = audit_log
        self._broker = broker
        self._authenticator = authenticator
        self._record_inputs = record_inputs
        self._model_info: dict[str, tuple[float, str]] = {}
        self._catalog: tuple[float, str] = (-MODEL_INFO_TTL_S, "")

    async def _refresh(self, model: str) -> None:
        """Reread the weights digest of ``model`` and the catalogue digest when stale; failures keep what was known."""
        now = time.monotonic()
        if model and now - self._model_info.get(model, (-MODEL_INFO_TTL_S, ""))[0] >= MODEL_INFO_TTL_S:
            try:
                self._model_info[model] = (now, (await self._broker.model_record(model)).weights_digest)
            except GatewayError:
                self._model_info[model] = (now, "")  # no explainer holds it: generation-only deployments
        if now - self._catalog[0] >= MODEL_INFO_TTL_S:
            try:
                catalog = (await self._broker.catalog()).SerializeToString(deterministic=True)
                self._catalog = (now, hashlib.sha256(catalog).hexdigest())
            except GatewayError:
                self._catalog = (now, "")

    def entry(
        self,
        rpc: str,
        request: Request,
        context: grpc.aio.ServicerContext,
        tenant: Tenant,
        started_ms: int,
        outcome: dict[str, Any],
    ) -> NewEntry:
        key = self._authenticator.api_key(context.invocation_metadata() or ())
        fields: dict[str, Any] = {
            "v": ENTRY_VERSION,
            "kind": "request",
            "rpc": rpc,
            "tenant": tenant.name,
            "key_id": None if key is None else key.key_id,
            "started_at_ms": started_ms,
            "ended_at_ms": now_ms(),
            "request_id": request.request_id,
            "trace_id": trace_id_hex(trace.get_current_span()),
            "model": request.model,
            "weights_digest": "",
            "explanation_id": "",
            "explanation_state": None,
            "fidelity_max_abs_logprob_diff": None,
            "output_token_ids": [],
            **_request_fields(request, record_inputs=self._record_inputs),
            "method_catalog_sha256": self._catalog[1],
        }
        fields.update(outcome)
        if not fields["weights_digest"]:
            fields["weights_digest"] = self._model_info.get(fields["model"], (0.0, ""))[1]
        explanation_id = fields["explanation_id"] or None
        return NewEntry(
            tenant=tenant.name, recorded_at_ms=fields["ended_at_ms"], fields=fields, explanation_id=explanation_id
        )

    async def succeeded(
        self,
        rpc: str,
        request: Request,
        context: grpc.aio.ServicerContext,
        tenant: Tenant,
        started_ms: int,
        outcome: dict[str, Any],
    ) -> None:
        await self._refresh(str(outcome.get("model") or request.model))
        entry = self.entry(rpc, request, context, tenant, started_ms, {**outcome, "status": "OK"})
        try:
            await self.log.append(entry)
        except Exception as exc:
            raise unavailable(
                "the audit trail could not record this call, so its result is withheld; retry shortly "
                f"(audit database: {type(exc).__name__})"
            ) from exc

    def failed(
        self,
        rpc: str,
        request: Request,
        context: grpc.aio.ServicerContext,
        tenant: Tenant,
        started_ms: int,
        exc: BaseException,
        outcome: dict[str, Any] | None = None,
    ) -> asyncio.Future[int] | None:
        """Queue the entry of a failed call; the caller need not wait (a cancelled call cannot). Never raises: the
        call's own error is what its caller must see."""
        if isinstance(exc, GatewayError):
            status = exc.code.name
        elif isinstance(exc, asyncio.CancelledError | GeneratorExit):
            status = grpc.StatusCode.CANCELLED.name
        else:
            status = grpc.StatusCode.INTERNAL.name
        try:
            entry = self.entry(rpc, request, context, tenant, started_ms, {**(outcome or {}), "status": status})
            future = self.log.submit(entry)
        except Exception:
            log.exception("could not log a failed %s call in the audit trail", rpc)
            return None
        future.add_done_callback(_log_failure)
        return future


async def _settled(exc: BaseException, logged: asyncio.Future[int] | None) -> None:
    """Let an error reply wait for its entry's commit, like a result does; a cancelled call cannot wait (its entry
    is written after it ends). A failed write is logged and the call's own error still goes out."""
    if logged is None or isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return
    with contextlib.suppress(Exception):
        await asyncio.shield(logged)


def _log_failure(future: asyncio.Future[int]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("could not log a failed call in the audit trail: %s", future.exception())


def _request_fields(request: Request, *, record_inputs: bool) -> dict[str, Any]:
    """What the request asked for: a digest of the input (the input itself when opted in), sampling, methods."""
    if isinstance(request, explanations_pb2.ExplainRequest):
        given: Message = explanations_pb2.ExplainRequest(
            prompt_token_ids=request.prompt_token_ids, output_token_ids=request.output_token_ids
        )
        fields: dict[str, Any] = {"output_token_ids": list(request.output_token_ids), "sampling": None}
    else:
        given = request.input
        fields = {"sampling": _as_dict(request.sampling)}
    fields["input_sha256"] = hashlib.sha256(given.SerializeToString(deterministic=True)).hexdigest()
    if record_inputs:
        fields["input"] = _as_dict(given)
    fields["methods"] = [
        {"name": m.name, "params": {key: _param_value(item) for key, item in m.params.items()}}
        for m in request.explain.methods
    ]
    fields["explain_mode"] = (
        _enum_name(types_pb2.ExplainMode, request.explain.mode) if request.explain.methods else None
    )
    return fields


def _as_dict(message: Message) -> Any:
    """A message in protobuf's JSON mapping, with what JSON cannot hold (NaN, infinities) as text: a refused
    request is logged with what it sent."""
    return _json_safe(json_format.MessageToDict(message, preserving_proto_field_name=True))


def _param_value(value: types_pb2.ParamValue) -> Any:
    """A parameter's value as JSON; unlike json_format, a NaN or infinite number does not fail (it is logged as
    text)."""
    kind = value.WhichOneof("kind")
    return None if kind is None else _json_safe(getattr(value, kind))


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        # Spelt as protobuf's JSON mapping spells them.
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


def _enum_name(enum: Any, value: int) -> str:
    """The value's name; a number the enum does not define (proto3 keeps unknown values) as its digits."""
    try:
        return str(enum.Name(value))
    except ValueError:
        return str(value)


def _explanation_fields(explanation_id: str, explanation: types_pb2.Explanation | None) -> dict[str, Any]:
    if not explanation_id:
        return {}
    fields: dict[str, Any] = {"explanation_id": explanation_id, "explanation_state": "EXPLANATION_STATE_PENDING"}
    if explanation is not None and explanation.explanation_id:
        fields["explanation_state"] = _enum_name(types_pb2.ExplanationState, explanation.state)
        if explanation.weights_digest:
            fields["weights_digest"] = explanation.weights_digest
        if explanation.HasField("fidelity"):
            fields["fidelity_max_abs_logprob_diff"] = finite(explanation.fidelity.max_abs_logprob_diff)
    return fields


def _outcome(response: Response) -> dict[str, Any]:
    # A stream's outcome is on its last message, the end.
    result = response.end if isinstance(response, inference_pb2.GenerateStreamResponse) else response
    explanation = result.explanation if result.HasField("explanation") else None
    outcome = _explanation_fields(result.explanation_id, explanation)
    if response.request_id:  # the id the gateway made up when the caller sent none
        outcome["request_id"] = response.request_id
    if isinstance(response, inference_pb2.GenerateResponse):
        outcome["model"] = response.model
        outcome["output_token_ids"] = [token.id for token in response.output_tokens]
        outcome["finish_reason"] = _enum_name(types_pb2.FinishReason, response.finish_reason)
    return outcome


Handler = Callable[..., Any]


def _served_model(servicer: Any, request: Request) -> str:
    """The model that served the call: the one requested, or the one vLLM serves when none was named."""
    served = servicer.gateway.models.served
    return request.model or (served.name if served is not None else "")


def audited(rpc: str) -> Callable[[Handler], Handler]:
    """Log every call of a Generate, GenerateStream or Explain handler (``self.gateway.audit`` None: off)."""

    def decorate(handler: Handler) -> Handler:
        if inspect.isasyncgenfunction(handler):
            return _audited_stream(rpc, handler)
        return _audited_unary(rpc, handler)

    return decorate


def _audited_unary(rpc: str, handler: Callable[..., Awaitable[Response]]) -> Handler:
    @functools.wraps(handler)
    async def wrapper(self: Any, request: Request, context: grpc.aio.ServicerContext, tenant: Tenant) -> Response:
        recorder: AuditRecorder | None = self.gateway.audit
        if recorder is None:
            return await handler(self, request, context, tenant)
        started = now_ms()
        try:
            response = await handler(self, request, context, tenant)
        except BaseException as exc:
            await _settled(exc, recorder.failed(rpc, request, context, tenant, started, exc))
            raise
        outcome = {"model": _served_model(self, request), **_outcome(response)}
        await recorder.succeeded(rpc, request, context, tenant, started, outcome)
        return response

    return wrapper


def _audited_stream(rpc: str, handler: Callable[..., AsyncIterator[inference_pb2.GenerateStreamResponse]]) -> Handler:
    @functools.wraps(handler)
    async def wrapper(
        self: Any, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext, tenant: Tenant
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        recorder: AuditRecorder | None = self.gateway.audit
        if recorder is None:
            async for item in handler(self, request, context, tenant):
                yield item
            return
        started = now_ms()
        output: list[int] = []
        last = inference_pb2.GenerateStreamResponse()
        try:
            async for item in handler(self, request, context, tenant):
                output.extend(token.id for token in item.delta.output_tokens)
                last = item
                yield item
        except BaseException as exc:
            # A stream cut short (cancelled, failed) is logged with the tokens it had sent.
            await _settled(
                exc, recorder.failed(rpc, request, context, tenant, started, exc, {"output_token_ids": output})
            )
            raise
        # The stream's status (its acknowledgement) goes out once this returns: after the entry commits.
        outcome = {"model": _served_model(self, request), **_outcome(last)}
        finish_reason = _enum_name(types_pb2.FinishReason, last.end.finish_reason)
        outcome.update(output_token_ids=output, finish_reason=finish_reason)
        await recorder.succeeded(rpc, request, context, tenant, started, outcome)

    return wrapper
