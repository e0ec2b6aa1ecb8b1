"""A real OTLP/gRPC trace receiver for tests: components export to it over a socket."""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]


def _value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, collector: OTLPCollector) -> None:
        self._collector = collector

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self._collector.add(
                        ReceivedSpan(
                            service=str(resource.get("service.name", "")),
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in span.attributes},
                        )
                    )
        self._collector.relay(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class OTLPCollector:
    def __init__(self) -> None:
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._relay_channel: grpc.Channel | None = None
        self._relay: trace_service_pb2_grpc.TraceServiceStub | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop(grace=None)

    def relay_to(self, endpoint: str | None) -> None:
        """Also forward every export from now on, as received, to the OTLP/gRPC ``endpoint`` (None: stop), as an
        OpenTelemetry Collector does: a test reads the session stack's traces back from a real backend."""
        with self._lock:
            if self._relay_channel is not None:
                self._relay_channel.close()
            self._relay_channel = None if endpoint is None else grpc.insecure_channel(endpoint.split("://")[-1])
            self._relay = (
                None if self._relay_channel is None else trace_service_pb2_grpc.TraceServiceStub(self._relay_channel)
            )

    def relay(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self._lock:
            relay = self._relay
        if relay is not None:
            # A backend that fails to take the spans only loses them there; the collector keeps its copy.
            with contextlib.suppress(grpc.RpcError):
                relay.Export(request, timeout=10)

    def add(self, span: ReceivedSpan) -> None:
        with self._lock:
            self._spans.append(span)

    def spans(self, trace_id: str) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self._spans if s.trace_id == trace_id]

    def wait_for(self, trace_id: str, names: set[str], timeout: float = 30.0) -> list[ReceivedSpan]:
        """The trace's spans once every name in ``names`` has arrived (batch exporters lag)."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.spans(trace_id)
            if names <= {s.name for s in spans} or time.monotonic() > deadline:
                return spans
            time.sleep(0.2)
