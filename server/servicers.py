"""gRPC servicers: a thin protocol layer over the vLLM client and the explanation broker."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
from opentelemetry import propagate, trace
from sightline.v1 import (
    explanations_pb2,
    explanations_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    types_pb2,
)

from common.explain_spec import with_default_method
from common.jobs import ExplainOptions
from common.telemetry import trace_id_hex
from server.audit.hook import AuditRecorder, audited
from server.auth import Authenticator
from server.config import GatewaySettings
from server.costs import PlannedMethod, check_cost
from server.errors import GatewayError, invalid_argument, not_found, shown, unavailable
from server.explanations import ExplanationBroker, ExplanationSlot
from server.genai_spans import SPAN_KIND, describe_generation, describe_request, tracer
from server.image_explanations import check_image_plan, job_messages
from server.images import ImagePrompt, has_images, image_prompt
from server.job_control import JobControl
from server.limits import Tenant, TenantLimiter
from server.metrics import EXPLANATION_WAIT, RpcObservation
from server.validation import (
    CHAT_ROLES,
    chat_messages,
    check_options_fit,
    explain_mode,
    explain_options,
    sampling_from_proto,
    served_logprobs,
    token_ids,
)
from server.vllm_client import CompletionChunk, Prompt, Sampling, ServedModel
from server.vllm_pool import VLLMPool

log = logging.getLogger(__name__)

FINISH_REASONS = {
    "stop": types_pb2.FINISH_REASON_STOP,
    "length": types_pb2.FINISH_REASON_LENGTH,
    "abort": types_pb2.FINISH_REASON_ABORT,
}


def _finish_reason(
    reason: str | None, *, num_tokens: int, num_generated: int, sampling: Sampling, model: ServedModel
) -> types_pb2.FinishReason:
    """vLLM's finish reason as the API's. vLLM silently cuts max_tokens to what the context window leaves and then
    says "length" either way; a generation that stopped short of max_tokens with the window full is told apart."""
    window_full = num_tokens >= model.max_model_len and num_generated < sampling.max_tokens
    if reason == "length" and window_full:
        return types_pb2.FINISH_REASON_CONTEXT_LENGTH
    return FINISH_REASONS.get(reason or "", types_pb2.FINISH_REASON_UNSPECIFIED)


Request = TypeVar("Request")
Response = TypeVar("Response")

# ListExplanations page sizes: the default, and the largest served (larger requests get this many).
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100


class ModelSource(Protocol):
    """Where the servicers learn which model vLLM serves (refreshed by the health monitor)."""

    @property
    def served(self) -> ServedModel | None: ...


def _server_span(rpc: str, context: grpc.aio.ServicerContext) -> trace.Span:
    parent = propagate.extract({k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)})
    service, method = rpc.rsplit("/", 1)
    return tracer.start_span(
        rpc,
        context=parent,
        kind=trace.SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method, SPAN_KIND: "CHAIN"},
    )


async def _abort(context: grpc.aio.ServicerContext, span: trace.Span, exc: Exception) -> None:
    if isinstance(exc, GatewayError):
        code, message = exc.code, exc.message
    else:
        log.exception("unexpected error")
        code, message = grpc.StatusCode.INTERNAL, f"internal error (trace {trace_id_hex(span)}); see gateway logs"
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    span.set_status(trace.Status(trace.StatusCode.ERROR, message))
    await context.abort(code, message)


def unary_rpc(
    rpc: str,
) -> Callable[[Callable[[Any, Request, grpc.aio.ServicerContext, Tenant], Awaitable[Response]]], Any]:
    """Run a unary handler inside its server span for the caller's tenant, mapping errors to gRPC statuses.

    The handler's servicer has a ``gateway``, which authenticates the call and counts it against
    the tenant's request rate before the handler runs.
    """

    def decorate(handler: Callable[[Any, Request, grpc.aio.ServicerContext, Tenant], Awaitable[Response]]) -> Any:
        @functools.wraps(handler)
        async def wrapper(self: Any, request: Request, context: grpc.aio.ServicerContext) -> Response:
            span = _server_span(rpc, context)
            with trace.use_span(span, end_on_exit=True), RpcObservation(rpc) as call:
                try:
                    tenant = await self.gateway.admit(context)
                    call.tenant = tenant.name
                    response = await handler(self, request, context, tenant)
                    span.set_status(trace.Status(trace.StatusCode.OK))
                    return response
                except Exception as exc:
                    call.fail(exc)
                    await _abort(context, span, exc)
                    raise  # context.abort raises; this line satisfies the type checker

        return wrapper

    return decorate


def _carries_output_tokens(item: object) -> bool:
    """Whether a streamed message is a generation delta with tokens in it: the first one times time to first token."""
    return (
        isinstance(item, inference_pb2.GenerateStreamResponse)
        and item.WhichOneof("event") == "delta"
        and len(item.delta.output_tokens) > 0
    )


def stream_rpc(
    rpc: str,
) -> Callable[[Callable[[Any, Request, grpc.aio.ServicerContext, Tenant], AsyncIterator[Response]]], Any]:
    """Run a server-streaming handler like ``unary_rpc`` runs a unary one."""

    def decorate(
        handler: Callable[[Any, Request, grpc.aio.ServicerContext, Tenant], AsyncIterator[Response]],
    ) -> Any:
        @functools.wraps(handler)
        async def wrapper(self: Any, request: Request, context: grpc.aio.ServicerContext) -> AsyncIterator[Response]:
            span = _server_span(rpc, context)
            with trace.use_span(span, end_on_exit=True), RpcObservation(rpc) as call:
                try:
                    tenant = await self.gateway.admit(context)
                    call.tenant = tenant.name
                    async for item in handler(self, request, context, tenant):
                        if _carries_output_tokens(item):
                            call.first_token()
                        yield item
                    span.set_status(trace.Status(trace.StatusCode.OK))
                except Exception as exc:
                    call.fail(exc)
                    await _abort(context, span, exc)

        return wrapper

    return decorate


def _request_id(given: str) -> str:
    request_id = given or uuid.uuid4().hex
    trace.get_current_span().set_attribute("sightline.request_id", request_id)
    return request_id


def _timeout(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else max(remaining, 0.0)


@dataclass(frozen=True)
class ExplanationPlan:
    methods: list[PlannedMethod]
    options: ExplainOptions
    mode: types_pb2.ExplainMode
    # Whether a SYNC job goes on when its caller goes away (ExplainSpec.keep_on_disconnect).
    keep_on_disconnect: bool = False

    def check_cost(self, num_tokens: int, num_generated: int, tenant: Tenant) -> None:
        num_targets = len(self.options.output_indices) or num_generated
        check_cost(
            self.methods,
            num_tokens=num_tokens,
            num_targets=num_targets,
            faithfulness=self.options.faithfulness,
            tenant=tenant,
        )


@dataclass(frozen=True)
class PreparedGeneration:
    request_id: str
    model: ServedModel
    sampling: Sampling
    plan: ExplanationPlan | None
    prompt: Prompt | ImagePrompt
    # The chat messages the prompt was rendered from, when it is a chat (for the explanation's token roles).
    chat: list[dict[str, str]] | None = None


class Gateway:
    """State shared by both services: the vLLM client, the broker, the served model, who may call and how much."""

    def __init__(
        self,
        settings: GatewaySettings,
        vllm: VLLMPool,
        broker: ExplanationBroker,
        models: ModelSource,
        authenticator: Authenticator,
        limiter: TenantLimiter,
        jobs: JobControl,
        audit: AuditRecorder | None = None,
    ) -> None:
        self.settings = settings
        self.vllm = vllm
        self.broker = broker
        self.jobs = jobs
        self.models = models
        self.authenticator = authenticator
        self.limiter = limiter
        # Appends each Generate, GenerateStream and Explain call to the audit trail; None: audit off.
        self.audit = audit

    async def admit(self, context: grpc.aio.ServicerContext) -> Tenant:
        """The caller's tenant, once its key is checked and the call fits the tenant's request rate."""
        tenant = self.authenticator.authenticate(context.invocation_metadata() or ())
        trace.get_current_span().set_attribute("sightline.tenant", tenant.name)
        await self.limiter.admit_request(tenant)
        return tenant

    def resolve_model(self, requested: str) -> ServedModel:
        served = self.models.served
        if served is None:
            raise unavailable(f"the vLLM backend at {self.vllm.base_url} is not ready yet; retry shortly")
        if requested and requested != served.name:
            raise not_found(f"model {shown(requested)} is not served here; available: {served.name}")
        return served

    async def prompt(
        self, source: inference_pb2.GenerationInput, model: ServedModel, timeout: float | None
    ) -> Prompt | ImagePrompt:
        kind = source.WhichOneof("kind")
        if kind == "prompt":
            if not source.prompt.strip():
                raise invalid_argument("input.prompt is empty; send the text to complete")
            return source.prompt
        if kind == "chat" and has_images(source.chat):
            return image_prompt(source.chat, CHAT_ROLES, self.settings.image_limits)
        if kind == "chat":
            return await self.vllm.tokenize_chat(model.name, chat_messages(source.chat), timeout)
        if kind == "prompt_token_ids":
            return token_ids(
                list(source.prompt_token_ids.ids), field="input.prompt_token_ids", max_model_len=model.max_model_len
            )
        raise invalid_argument("input is missing; set one of input.prompt, input.chat or input.prompt_token_ids")

    async def plan_explanation(self, spec: types_pb2.ExplainSpec) -> ExplanationPlan | None:
        """Validate an explain spec before any generation; None when no explanation is asked for."""
        if not spec.methods:
            return None
        return await self.plan_requested_explanation(spec)

    async def plan_requested_explanation(self, spec: types_pb2.ExplainSpec) -> ExplanationPlan:
        """Validate the spec of a call that always explains (Explain, EstimateExplanation): with no method named,
        the server's default method for the workers' model (common.explain_spec.default_method)."""
        if not spec.methods:
            spec = with_default_method(spec, (await self.broker.catalog()).architecture)
        return ExplanationPlan(
            methods=await self.broker.validate_methods(spec),
            options=explain_options(spec),
            mode=explain_mode(spec),
            keep_on_disconnect=spec.keep_on_disconnect,
        )

    async def prepare_generation(
        self,
        request: inference_pb2.GenerateRequest,
        context: grpc.aio.ServicerContext,
        tenant: Tenant,
    ) -> PreparedGeneration:
        """Everything checked before generating, so a bad or over-limit request costs no generation."""
        request_id = _request_id(request.request_id)
        describe_request(request)
        model = self.resolve_model(request.model)
        sampling = sampling_from_proto(
            request.sampling,
            default_max_tokens=tenant.max_tokens_or(self.settings.default_max_tokens),
            max_model_len=model.max_model_len,
        )
        tenant.check_max_tokens(sampling.max_tokens, f"sampling.max_tokens is {sampling.max_tokens}")
        plan = await self.plan_explanation(request.explain)
        prompt = await self.prompt(request.input, model, _timeout(context))
        if isinstance(prompt, ImagePrompt):
            if plan is not None:
                await check_image_plan(plan.methods, plan.options, self.broker)
            if tenant.limits.max_prompt_tokens:
                tenant.check_prompt_tokens(
                    len(await self.vllm.tokenize_chat(model.name, prompt.messages, _timeout(context)))
                )
            if plan is not None:
                await self.broker.check_backlog()
            return PreparedGeneration(request_id, model, sampling, plan, prompt)
        if plan is not None or tenant.limits.max_prompt_tokens:
            # Counted in real tokens: a text prompt is tokenized here and sent on as the same ids.
            prompt_ids = (
                await self.vllm.tokenize_text(model.name, prompt, _timeout(context))
                if isinstance(prompt, str)
                else list(prompt)
            )
            tenant.check_prompt_tokens(len(prompt_ids))
            if plan is not None:
                # Refused before generating when even the longest allowed output would cost too much to explain.
                plan.check_cost(len(prompt_ids) + sampling.max_tokens, sampling.max_tokens, tenant)
            prompt = prompt_ids
        if plan is not None:
            await self.broker.check_backlog()
        chat = chat_messages(request.input.chat) if request.input.WhichOneof("kind") == "chat" else None
        return PreparedGeneration(request_id, model, sampling, plan, prompt, chat)

    def explanation_slot(
        self, plan: ExplanationPlan | None, tenant: Tenant
    ) -> AbstractAsyncContextManager[ExplanationSlot | None]:
        """For a generation to explain, one of the tenant's explanation slots, taken before generating (so a
        tenant at its limit is refused before any generation, as with every other limit) and given back if the
        block ends without enqueueing the job; nothing for a generation without an explanation."""
        return self.broker.reserve(tenant) if plan is not None else contextlib.nullcontext()

    async def explain(
        self,
        plan: ExplanationPlan,
        model: str,
        prompt_token_ids: Sequence[int],
        output_tokens: Sequence[types_pb2.Token],
        context: grpc.aio.ServicerContext,
        served_logprobs: list[float] | None,
        tenant: Tenant,
        slot: ExplanationSlot | None = None,
        chat: list[dict[str, str]] | None = None,
        pictures: ImagePrompt | None = None,
    ) -> types_pb2.Explanation:
        """Enqueue an explanation for the tenant, in ``slot`` if one was taken before generating, else in a slot
        taken now; in SYNC mode wait for it until just before the deadline. ``pictures``: the prompt's messages and
        pictures when it holds any, which the job carries."""
        if not output_tokens:
            raise invalid_argument("there are no generated tokens to explain")
        num_tokens = len(prompt_token_ids) + len(output_tokens)
        check_options_fit(plan.options, num_tokens, len(output_tokens))
        plan.check_cost(num_tokens, len(output_tokens), tenant)
        async with contextlib.nullcontext(slot) if slot is not None else self.broker.reserve(tenant) as taken:
            record = await self.broker.submit(
                slot=taken,
                tenant=tenant,
                model=model,
                prompt_token_ids=prompt_token_ids,
                output_tokens=output_tokens,
                served_logprobs=served_logprobs,
                methods=[m.request for m in plan.methods],
                options=plan.options,
                trace_id=trace_id_hex(trace.get_current_span()),
                chat=chat,
                image_messages=None if pictures is None else job_messages(pictures),
                images=[] if pictures is None else [image.data for image in pictures.images],
            )
        if plan.mode == types_pb2.EXPLAIN_MODE_ASYNC:
            return record
        remaining = context.time_remaining()
        budget = 3600.0 if remaining is None else remaining - self.settings.deadline_margin_seconds
        with EXPLANATION_WAIT.time():
            try:
                return await self.broker.wait(record.explanation_id, tenant.name, budget)
            except asyncio.CancelledError:
                # The caller went away (gRPC cancels the handler): nobody will read the result unless asked to keep it.
                if not plan.keep_on_disconnect:
                    self.jobs.cancel_in_background(
                        record.explanation_id, tenant.name, f"tenant {tenant.name} (its SYNC caller went away)"
                    )
                raise


def _output_tokens(chunk: CompletionChunk) -> list[types_pb2.Token]:
    return [
        types_pb2.Token(id=token_id, text=text, logprob=logprob)
        if logprob is not None
        else types_pb2.Token(id=token_id, text=text)
        for token_id, text, logprob in zip(chunk.token_ids, chunk.token_texts, chunk.logprobs, strict=True)
    ]


def _served_logprobs(tokens: Sequence[types_pb2.Token]) -> list[float] | None:
    if tokens and all(t.HasField("logprob") for t in tokens):
        return [t.logprob for t in tokens]
    return None


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    @unary_rpc("sightline.v1.InferenceService/Generate")
    @audited("Generate")
    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext, tenant: Tenant
    ) -> inference_pb2.GenerateResponse:
        prepared = await self.gateway.prepare_generation(request, context, tenant)
        async with self.gateway.explanation_slot(prepared.plan, tenant) as slot:
            return await self._generate(prepared, context, tenant, slot)

    async def _generate(
        self,
        prepared: PreparedGeneration,
        context: grpc.aio.ServicerContext,
        tenant: Tenant,
        slot: ExplanationSlot | None,
    ) -> inference_pb2.GenerateResponse:
        """Generate, then enqueue the explanation in ``slot``, taken before generating, if one is asked for."""
        gateway = self.gateway
        model, plan = prepared.model, prepared.plan
        if isinstance(prepared.prompt, ImagePrompt):
            completion = await gateway.vllm.chat_complete(
                model.name, prepared.prompt.messages, prepared.sampling, _timeout(context)
            )
        else:
            completion = await gateway.vllm.complete(model.name, prepared.prompt, prepared.sampling, _timeout(context))
        output_tokens = _output_tokens(completion)
        response = inference_pb2.GenerateResponse(
            request_id=prepared.request_id,
            trace_id=trace_id_hex(trace.get_current_span()),
            model=model.name,
            text=completion.text,
            prompt_token_ids=completion.prompt_token_ids or [],
            output_tokens=output_tokens,
            finish_reason=_finish_reason(
                completion.finish_reason,
                num_tokens=len(completion.prompt_token_ids or []) + len(output_tokens),
                num_generated=len(output_tokens),
                sampling=prepared.sampling,
                model=model,
            ),
            usage=types_pb2.Usage(
                input_tokens=completion.input_tokens or 0, output_tokens=completion.output_tokens or 0
            ),
        )
        if plan is not None:
            explanation = await gateway.explain(
                plan,
                model.name,
                response.prompt_token_ids,
                output_tokens,
                context,
                _served_logprobs(output_tokens),
                tenant,
                slot,
                prepared.chat,
                prepared.prompt if isinstance(prepared.prompt, ImagePrompt) else None,
            )
            response.explanation_id = explanation.explanation_id
            if plan.mode != types_pb2.EXPLAIN_MODE_ASYNC:
                response.explanation.CopyFrom(explanation)
        describe_generation(
            request_id=prepared.request_id,
            tenant=tenant.name,
            text=response.text,
            output_tokens=len(output_tokens),
            finish_reason=response.finish_reason,
            explanation=response.explanation,
            explanation_id=response.explanation_id,
        )
        return response

    @stream_rpc("sightline.v1.InferenceService/GenerateStream")
    @audited("GenerateStream")
    async def GenerateStream(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext, tenant: Tenant
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        prepared = await self.gateway.prepare_generation(request, context, tenant)
        async with (
            self.gateway.explanation_slot(prepared.plan, tenant) as slot,
            # Closed explicitly, so a cancelled call closes the vLLM stream (aborting it) before the slot goes back.
            contextlib.aclosing(self._generate_stream(prepared, context, tenant, slot)) as responses,
        ):
            async for response in responses:
                yield response

    async def _generate_stream(
        self,
        prepared: PreparedGeneration,
        context: grpc.aio.ServicerContext,
        tenant: Tenant,
        slot: ExplanationSlot | None,
    ) -> AsyncGenerator[inference_pb2.GenerateStreamResponse, None]:
        """Stream the generation (a start message, deltas, an end message), then enqueue the explanation in
        ``slot``, taken before generating, if asked."""
        gateway = self.gateway
        model, plan = prepared.model, prepared.plan
        trace_id = trace_id_hex(trace.get_current_span())
        prompt_token_ids: list[int] = []
        all_output: list[types_pb2.Token] = []
        vllm_finish_reason: str | None = None
        started = False
        final = inference_pb2.GenerateStreamResponse(request_id=prepared.request_id, trace_id=trace_id)
        end = final.end
        if isinstance(prepared.prompt, ImagePrompt):
            stream = gateway.vllm.chat_complete_stream(
                model.name, prepared.prompt.messages, prepared.sampling, _timeout(context)
            )
        else:
            stream = gateway.vllm.complete_stream(model.name, prepared.prompt, prepared.sampling, _timeout(context))
        try:
            async for chunk in stream:
                if chunk.prompt_token_ids is not None:
                    prompt_token_ids = chunk.prompt_token_ids
                if chunk.finish_reason:
                    vllm_finish_reason = chunk.finish_reason
                if chunk.input_tokens is not None:
                    end.usage.input_tokens = chunk.input_tokens
                    end.usage.output_tokens = chunk.output_tokens or 0
                if not started:
                    # vLLM's first chunk carries the prompt's token ids.
                    started = True
                    yield self._stream_start(prepared, trace_id, prompt_token_ids)
                tokens = _output_tokens(chunk)
                if not tokens and not chunk.text:
                    continue
                all_output.extend(tokens)
                yield inference_pb2.GenerateStreamResponse(
                    request_id=prepared.request_id,
                    trace_id=trace_id,
                    delta=inference_pb2.GenerateStreamDelta(output_tokens=tokens, text_delta=chunk.text),
                )
        finally:
            # Closing the upstream stream on cancellation is what makes vLLM abort the request.
            await stream.aclose()  # type: ignore[attr-defined]
        if not started:
            yield self._stream_start(prepared, trace_id, prompt_token_ids)
        if vllm_finish_reason is not None:
            end.finish_reason = _finish_reason(
                vllm_finish_reason,
                num_tokens=len(prompt_token_ids) + len(all_output),
                num_generated=len(all_output),
                sampling=prepared.sampling,
                model=model,
            )
        if plan is not None:
            explanation = await gateway.explain(
                plan,
                model.name,
                prompt_token_ids,
                all_output,
                context,
                _served_logprobs(all_output),
                tenant,
                slot,
                prepared.chat,
                prepared.prompt if isinstance(prepared.prompt, ImagePrompt) else None,
            )
            end.explanation_id = explanation.explanation_id
            if plan.mode != types_pb2.EXPLAIN_MODE_ASYNC:
                end.explanation.CopyFrom(explanation)
        describe_generation(
            request_id=prepared.request_id,
            tenant=tenant.name,
            text="".join(token.text for token in all_output),
            output_tokens=len(all_output),
            finish_reason=end.finish_reason,
            explanation=end.explanation,
            explanation_id=end.explanation_id,
        )
        yield final

    @staticmethod
    def _stream_start(
        prepared: PreparedGeneration, trace_id: str, prompt_token_ids: list[int]
    ) -> inference_pb2.GenerateStreamResponse:
        return inference_pb2.GenerateStreamResponse(
            request_id=prepared.request_id,
            trace_id=trace_id,
            start=inference_pb2.GenerateStreamStart(model=prepared.model.name, prompt_token_ids=prompt_token_ids),
        )


class ExplanationsServicer(explanations_pb2_grpc.ExplanationsServiceServicer):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    @unary_rpc("sightline.v1.ExplanationsService/Explain")
    @audited("Explain")
    async def Explain(
        self, request: explanations_pb2.ExplainRequest, context: grpc.aio.ServicerContext, tenant: Tenant
    ) -> explanations_pb2.ExplainResponse:
        gateway = self.gateway
        request_id = _request_id(request.request_id)
        model = gateway.resolve_model(request.model)
        plan = await gateway.plan_requested_explanation(request.explain)
        prompt_ids = token_ids(
            list(request.prompt_token_ids), field="prompt_token_ids", max_model_len=model.max_model_len
        )
        output_ids = token_ids(
            list(request.output_token_ids), field="output_token_ids", max_model_len=model.max_model_len
        )
        if len(prompt_ids) + len(output_ids) > model.max_model_len:
            raise invalid_argument(
                f"prompt and output together have {len(prompt_ids) + len(output_ids)} tokens; "
                f"the model's context window is {model.max_model_len}"
            )
        served = served_logprobs(list(request.output_logprobs), len(output_ids))
        tenant.check_prompt_tokens(len(prompt_ids))
        tenant.check_max_tokens(len(output_ids), f"output_token_ids has {len(output_ids)} tokens to explain")
        explanation = await gateway.explain(
            plan,
            model.name,
            prompt_ids,
            [types_pb2.Token(id=t) for t in output_ids],
            context,
            served or None,
            tenant,
        )
        response = explanations_pb2.ExplainResponse(
            request_id=request_id,
            trace_id=trace_id_hex(trace.get_current_span()),
            explanation_id=explanation.explanation_id,
        )
        if plan.mode != types_pb2.EXPLAIN_MODE_ASYNC:
            response.explanation.CopyFrom(explanation)
        return response

    @unary_rpc("sightline.v1.ExplanationsService/GetExplanation")
    async def GetExplanation(
        self, request: explanations_pb2.GetExplanationRequest, context: grpc.aio.ServicerContext, tenant: Tenant
    ) -> explanations_pb2.GetExplanationResponse:
        if not request.explanation_id:
            raise invalid_argument("explanation_id is empty; pass the id a Generate or Explain call returned")
        if not request.wait_seconds >= 0:
            raise invalid_argument(f"wait_seconds must be >= 0; got {request.wait_seconds}")
        remaining = context.time_remaining()
        budget = float(request.wait_seconds)
        if remaining is not None:
            budget = min(budget, remaining - self.gateway.settings.deadline_margin_seconds)
        explanation = await self.gateway.broker.wait(request.explanation_id, tenant.name, budget)
        return explanations_pb2.GetExplanationResponse(
            request_id=uuid.uuid4().hex, trace_id=trace_id_hex(trace.get_current_span()), explanation=explanation
        )

    @unary_rpc("sightline.v1.ExplanationsService/ListExplanations")
    async def ListExplanations(
        self, request: explanations_pb2.ListExplanationsRequest, context: grpc.aio.ServicerContext, tenant: Tenant
    ) -> explanations_pb2.ListExplanationsResponse:
        if request.page_size < 0:
            raise invalid_argument(
                f"page_size must be >= 0 (0 means {DEFAULT_PAGE_SIZE}, at most {MAX_PAGE_SIZE} are served); "
                f"got {request.page_size}"
            )
        page_size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        summaries, next_page_token = await self.gateway.broker.list_summaries(
            tenant.name, page_size, request.page_token
        )
        return explanations_pb2.ListExplanationsResponse(
            request_id=uuid.uuid4().hex,
            trace_id=trace_id_hex(trace.get_current_span()),
            explanations=summaries,
            next_page_token=next_page_token,
        )

    @unary_rpc("sightline.v1.ExplanationsService/ListMethods")
    async def ListMethods(
        self, request: explanations_pb2.ListMethodsRequest, context: grpc.aio.ServicerContext, tenant: Tenant
    ) -> explanations_pb2.ListMethodsResponse:
        return await self.gateway.broker.catalog()

    @unary_rpc("sightline.v1.ExplanationsService/CancelExplanation")
    async def CancelExplanation(
        self, request: explanations_pb2.CancelExplanationRequest, context: grpc.aio.ServicerContext, tenant: Tenant
    ) -> explanations_pb2.CancelExplanationResponse:
        if not request.explanation_id:
            raise invalid_argument("explanation_id is empty; pass the id a Generate or Explain call returned")
        budget = self._wait_budget(request.wait_seconds, context)
        explanation = await self.gateway.jobs.cancel(
            request.explanation_id, tenant.name, f"tenant {tenant.name} (CancelExplanation)", budget
        )
        return explanations_pb2.CancelExplanationResponse(
            request_id=uuid.uuid4().hex, trace_id=trace_id_hex(trace.get_current_span()), explanation=explanation
        )

    @stream_rpc("sightline.v1.ExplanationsService/WatchExplanation")
    async def WatchExplanation(
        self, request: explanations_pb2.WatchExplanationRequest, context: grpc.aio.ServicerContext, tenant: Tenant
    ) -> AsyncIterator[explanations_pb2.WatchExplanationResponse]:
        if not request.explanation_id:
            raise invalid_argument("explanation_id is empty; pass the id a Generate or Explain call returned")
        async for explanation in self.gateway.jobs.watch(request.explanation_id, tenant.name):
            yield explanations_pb2.WatchExplanationResponse(explanation=explanation)

    @unary_rpc("sightline.v1.ExplanationsService/EstimateExplanation")
    async def EstimateExplanation(
        self, request: explanations_pb2.EstimateExplanationRequest, context: grpc.aio.ServicerContext, tenant: Tenant
    ) -> explanations_pb2.EstimateExplanationResponse:
        model = self.gateway.resolve_model(request.model)
        plan = await self.gateway.plan_requested_explanation(request.explain)
        if request.prompt_tokens < 1 or request.output_tokens < 1:
            raise invalid_argument(
                f"prompt_tokens and output_tokens must be at least 1; got {request.prompt_tokens} and "
                f"{request.output_tokens}"
            )
        num_tokens = request.prompt_tokens + request.output_tokens
        if num_tokens > model.max_model_len:
            raise invalid_argument(
                f"prompt_tokens + output_tokens is {num_tokens}; the model's context window is {model.max_model_len}"
            )
        check_options_fit(plan.options, num_tokens, request.output_tokens)
        estimate = await self.gateway.jobs.estimate(
            model.name,
            plan.methods,
            num_tokens=num_tokens,
            num_targets=len(plan.options.output_indices) or request.output_tokens,
            faithfulness=plan.options.faithfulness,
        )
        return explanations_pb2.EstimateExplanationResponse(
            request_id=uuid.uuid4().hex,
            trace_id=trace_id_hex(trace.get_current_span()),
            passes=estimate.passes,
            seconds=estimate.seconds,
            methods=estimate.methods,
            seconds_per_token_pass=estimate.seconds_per_token_pass,
        )

    def _wait_budget(self, wait_seconds: float, context: grpc.aio.ServicerContext) -> float:
        """``wait_seconds``, checked, within the call's deadline less the gateway's margin."""
        if not wait_seconds >= 0:
            raise invalid_argument(f"wait_seconds must be >= 0; got {wait_seconds}")
        remaining = context.time_remaining()
        budget = float(wait_seconds)
        if remaining is not None:
            budget = min(budget, remaining - self.gateway.settings.deadline_margin_seconds)
        return budget
