"""What the gateway's spans say about a generation, for LLM-observability backends (docs/observability.md).

The root span of each RPC is an OpenInference CHAIN; the vLLM call's span is an LLM span that also
carries the OpenTelemetry GenAI conventions' ``gen_ai.*`` attributes. Prompt and answer text go on
spans only when the deployment opts in (``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``):
otherwise the spans say what was asked for and what came back (model, methods, lengths, ids), never
the text.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

import orjson
from opentelemetry import trace
from sightline.v1 import inference_pb2, types_pb2

from common.telemetry import capture_message_content

# The gateway's one tracer: its own spans (servicers, explanations, vLLM calls) all come from this scope.
tracer = trace.get_tracer("sightline.gateway")

SPAN_KIND = "openinference.span.kind"
JSON_MIME = "application/json"
TEXT_MIME = "text/plain"

# The prompt as GenAI input messages, for the LLM span of the call that is generating it (set by
# ``describe_request`` only when content capture is on).
_input_messages: ContextVar[list[dict[str, Any]] | None] = ContextVar("sightline_input_messages", default=None)


def _json(value: object) -> str:
    return orjson.dumps(value).decode()


def _text_message(role: str, content: str) -> dict[str, Any]:
    return {"role": role, "parts": [{"type": "text", "content": content}]}


def _messages(source: inference_pb2.GenerationInput) -> list[dict[str, Any]]:
    kind = source.WhichOneof("kind")
    if kind == "chat":
        return [_text_message(m.role, m.content) for m in source.chat.messages]
    if kind == "prompt":
        return [_text_message("user", source.prompt)]
    if kind == "prompt_token_ids":
        return [{"role": "user", "parts": [{"type": "token_ids", "content": list(source.prompt_token_ids.ids)}]}]
    return []


def describe_request(request: inference_pb2.GenerateRequest) -> None:
    """Put the request on the current (root) span as its OpenInference input."""
    span = trace.get_current_span()
    if capture_message_content():
        messages = _messages(request.input)
        _input_messages.set(messages)
        span.set_attribute("input.value", _json({"messages": messages}))
    else:
        # What was asked, without the prompt's text.
        span.set_attribute(
            "input.value",
            _json(
                {
                    "model": request.model,
                    "input": request.input.WhichOneof("kind"),
                    "explain": [m.name for m in request.explain.methods],
                }
            ),
        )
    span.set_attribute("input.mime_type", JSON_MIME)


def describe_generation(
    *,
    request_id: str,
    tenant: str,
    text: str,
    output_tokens: int,
    finish_reason: types_pb2.FinishReason,
    explanation: types_pb2.Explanation | None,
    explanation_id: str,
) -> None:
    """Put what the call returned on the current (root) span as its OpenInference output and metadata."""
    span = trace.get_current_span()
    finish = types_pb2.FinishReason.Name(finish_reason)
    if capture_message_content():
        span.set_attribute("output.value", text)
        span.set_attribute("output.mime_type", TEXT_MIME)
    else:
        span.set_attribute("output.value", _json({"output_tokens": output_tokens, "finish_reason": finish}))
        span.set_attribute("output.mime_type", JSON_MIME)
    metadata: dict[str, Any] = {"request_id": request_id, "tenant": tenant}
    if explanation_id:
        metadata["explanation_id"] = explanation_id
        span.set_attribute("sightline.explanation_id", explanation_id)
    if explanation is not None and explanation.state:
        metadata["explanation_state"] = types_pb2.ExplanationState.Name(explanation.state)
    span.set_attribute("metadata", _json(metadata))


def llm_span_attributes() -> dict[str, Any]:
    """Attributes of a vLLM call's span beside its gen_ai.* ones: the OpenInference kind, and the input messages
    when content capture is on."""
    attributes: dict[str, Any] = {SPAN_KIND: "LLM"}
    messages = _input_messages.get()
    if messages is not None:
        attributes["gen_ai.input.messages"] = _json(messages)
    return attributes


def record_llm_output(span: trace.Span, text: str, finish_reason: str | None) -> None:
    """The answer as GenAI output messages on the LLM span, when content capture is on."""
    if _input_messages.get() is None:
        return
    message = _text_message("assistant", text)
    if finish_reason:
        message["finish_reason"] = finish_reason
    span.set_attribute("gen_ai.output.messages", _json([message]))
