"""OpenTelemetry setup shared by the gateway and the explainer workers.

Exporters follow the standard ``OTEL_*`` environment variables: spans are exported over
OTLP/gRPC when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``) is set, unless
``OTEL_TRACES_EXPORTER=none`` or ``OTEL_SDK_DISABLED=true``. Without an endpoint nothing is
exported, so a local stack with no collector does not log connection errors.
"""

from __future__ import annotations

import os

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

PROJECT_ATTRIBUTE = "openinference.project.name"
PROJECT_ENV = "SIGHTLINE_TRACE_PROJECT"
DEFAULT_PROJECT = "sightline"
# The OpenTelemetry GenAI conventions' opt-in for recording prompt and answer text on spans.
CAPTURE_CONTENT_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"


def capture_message_content() -> bool:
    """Whether this deployment opted in to message text on spans (off by default: prompts may be confidential)."""
    return os.environ.get(CAPTURE_CONTENT_ENV, "").strip().lower() in {"true", "1", "yes"}


def otlp_endpoint() -> str | None:
    """The OTLP traces endpoint configured in the environment, if any."""
    return os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")


def configure_tracing(default_service_name: str) -> TracerProvider:
    """Install a global tracer provider for this process and return it."""
    resource = Resource.create(
        {
            "service.name": os.environ.get("OTEL_SERVICE_NAME", default_service_name),
            # Phoenix files spans by project: request traces stay apart from others' (docs/observability.md).
            PROJECT_ATTRIBUTE: os.environ.get(PROJECT_ENV, DEFAULT_PROJECT),
        }
    )
    provider = TracerProvider(resource=resource)
    disabled = os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true"
    exporter_choice = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").lower()
    if not disabled and exporter_choice == "otlp" and otlp_endpoint():
        # Imported lazily: the exporter pulls in grpc channel machinery we do not need otherwise.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider


def current_traceparent() -> str:
    """The W3C ``traceparent`` of the current span, for carrying a trace across a queue."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")


def context_from_traceparent(traceparent: str) -> Context:
    """The context a consumer continues when it picks up work carrying ``traceparent``."""
    return propagate.extract({"traceparent": traceparent} if traceparent else {})


def trace_id_hex(span: trace.Span) -> str:
    """The 32-hex-digit trace id of ``span``, or '' when it is not recording a valid trace."""
    span_context = span.get_span_context()
    return trace.format_trace_id(span_context.trace_id) if span_context.is_valid else ""
