"""One trace per request, spanning the gateway, vLLM and the explainer worker."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sightline.v1 import inference_pb2, inference_pb2_grpc, types_pb2

from deploy.local_stack import LocalStack, free_port
from server.app import serve
from server.config import GatewaySettings
from tests.e2e.test_generation import FRANCE
from tests.otlp_collector import OTLPCollector, ReceivedSpan

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
GENERATE = "sightline.v1.InferenceService/Generate"
COMPLETION = f"text_completion {MODEL}"


def test_one_trace_spans_gateway_vllm_and_explainer(
    inference: inference_pb2_grpc.InferenceServiceStub, otlp_collector: OTLPCollector
) -> None:
    response = inference.Generate(
        inference_pb2.GenerateRequest(
            input=inference_pb2.GenerationInput(chat=FRANCE),
            sampling=types_pb2.SamplingParams(max_tokens=8),
            explain=types_pb2.ExplainSpec(methods=[types_pb2.MethodSpec(name="input_x_gradient")]),
        ),
        timeout=300,
    )
    assert response.explanation.state == types_pb2.EXPLANATION_STATE_SUCCEEDED
    expected = {GENERATE, COMPLETION, "llm_request", "send sl:jobs", "process sl:jobs", "cache lookup",
                "method input_x_gradient", "fidelity"}  # fmt: skip
    spans = otlp_collector.wait_for(response.trace_id, expected)
    by_name = {s.name: s for s in spans}
    assert expected <= set(by_name), f"missing spans: {expected - set(by_name)}"

    def parent(span: ReceivedSpan) -> ReceivedSpan:
        return next(s for s in spans if s.span_id == span.parent_span_id)

    def ancestors(span: ReceivedSpan) -> list[str]:
        names = []
        while span.parent_span_id:
            span = parent(span)
            names.append(span.name)
        return names

    root = by_name[GENERATE]
    assert root.service == "sightline-gateway" and root.parent_span_id == ""
    client = by_name[COMPLETION]
    assert parent(client) is root
    assert client.attributes["gen_ai.operation.name"] == "text_completion"
    assert client.attributes["gen_ai.request.model"] == MODEL
    assert client.attributes["gen_ai.usage.input_tokens"] == len(response.prompt_token_ids)
    assert client.attributes["gen_ai.usage.output_tokens"] == len(response.output_tokens)
    assert client.attributes["gen_ai.response.finish_reasons"] in (["stop"], ["length"])
    # vLLM's own span joins through the injected traceparent.
    assert parent(by_name["llm_request"]) is client
    assert by_name["send sl:jobs"].attributes["sightline.explanation_id"] == response.explanation_id
    assert parent(by_name["send sl:jobs"]) is root
    consumer = by_name["process sl:jobs"]
    assert consumer.service == "sightline-explainer"
    assert parent(consumer).name == "send sl:jobs"
    for name in ("cache lookup", "method input_x_gradient", "fidelity"):
        assert "process sl:jobs" in ancestors(by_name[name])
    assert isinstance(by_name["cache lookup"].attributes["sightline.cache.hit"], bool)


@pytest.fixture(scope="module")
def memory_spans() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


@pytest.fixture(scope="module")
def in_process_gateway(stack: LocalStack, memory_spans: InMemorySpanExporter) -> Iterator[str]:
    """A second gateway in this process, on the stack's vLLM and Redis, so spans land in memory."""
    address = f"127.0.0.1:{free_port()}"
    settings = GatewaySettings(listen=address, vllm_url=stack.config.vllm_url, redis_url=stack.config.redis_url)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = asyncio.Event()

    async def run() -> None:
        started = asyncio.Event()
        serving = asyncio.create_task(serve(settings, ready=started, stop=stop))
        await started.wait()
        ready.set()
        await serving

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    assert ready.wait(60), "in-process gateway did not start"
    yield address
    loop.call_soon_threadsafe(stop.set)
    thread.join(30)


def _finished(exporter: InMemorySpanExporter, trace_id: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.context and f"{s.context.trace_id:032x}" == trace_id]


def test_gateway_span_tree_in_memory(in_process_gateway: str, memory_spans: InMemorySpanExporter) -> None:
    incoming_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    incoming_parent = "00f067aa0ba902b7"
    with grpc.insecure_channel(in_process_gateway) as channel:
        response = inference_pb2_grpc.InferenceServiceStub(channel).Generate(
            inference_pb2.GenerateRequest(
                input=inference_pb2.GenerationInput(prompt="The capital of France is"),
                sampling=types_pb2.SamplingParams(max_tokens=4),
                explain=types_pb2.ExplainSpec(
                    methods=[types_pb2.MethodSpec(name="logit_lens")], mode=types_pb2.EXPLAIN_MODE_ASYNC
                ),
            ),
            metadata=[("traceparent", f"00-{incoming_trace}-{incoming_parent}-01")],
            timeout=60,
        )
    # The caller's traceparent is honoured: the whole request joins the caller's trace.
    assert response.trace_id == incoming_trace
    spans = {s.name: s for s in _finished(memory_spans, incoming_trace)}
    assert {GENERATE, COMPLETION, "send sl:jobs"} <= set(spans)
    server_span = spans[GENERATE]
    assert server_span.kind == trace.SpanKind.SERVER
    assert server_span.parent is not None and f"{server_span.parent.span_id:016x}" == incoming_parent
    assert server_span.attributes is not None and server_span.attributes["rpc.method"] == "Generate"
    assert server_span.context is not None
    for child in (COMPLETION, "send sl:jobs"):
        child_parent = spans[child].parent
        assert child_parent is not None and child_parent.span_id == server_span.context.span_id
    client = spans[COMPLETION]
    assert client.kind == trace.SpanKind.CLIENT
    assert client.attributes is not None
    assert client.attributes["gen_ai.usage.output_tokens"] == 4
    assert client.attributes["gen_ai.response.finish_reasons"] == ("length",)
    assert spans["send sl:jobs"].kind == trace.SpanKind.PRODUCER


def test_failed_call_marks_its_span(in_process_gateway: str, memory_spans: InMemorySpanExporter) -> None:
    with grpc.insecure_channel(in_process_gateway) as channel, pytest.raises(grpc.RpcError) as caught:
        inference_pb2_grpc.InferenceServiceStub(channel).Generate(
            inference_pb2.GenerateRequest(input=inference_pb2.GenerationInput(prompt="")), timeout=10
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The status reaches the client a moment before the server's span ends.
    deadline = time.monotonic() + 10
    while not (failed := [s for s in memory_spans.get_finished_spans() if s.name == GENERATE and not s.status.is_ok]):
        assert time.monotonic() < deadline, "no failed Generate span was recorded"
        time.sleep(0.05)
    assert failed[-1].attributes is not None
    assert failed[-1].attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
