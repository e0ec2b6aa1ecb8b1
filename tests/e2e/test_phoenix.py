"""Explanations in a real LLM-observability dashboard: the stack's traces as Arize Phoenix stores and serves them.

Phoenix runs from its own virtualenv on free ports; the session's OTLP collector relays every export to it (as an
OpenTelemetry Collector in front of a backend would), so the session stack needs no restart. A second gateway,
opted in to message content, shows what a deployment that opts in gets.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from sightline.types import Explanation
from sightline.v1 import inference_pb2, inference_pb2_grpc, types_pb2

from common.telemetry import CAPTURE_CONTENT_ENV, DEFAULT_PROJECT
from deploy.local_stack import LocalStack
from tests.e2e.test_generation import FRANCE
from tests.gateway_process import GatewayProcess
from tests.otlp_collector import OTLPCollector
from tests.phoenix import Phoenix

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
GENERATE = "sightline.v1.InferenceService/Generate"
COMPLETION = f"text_completion {MODEL}"
METHODS = ["input_x_gradient", "logit_lens"]
EVALUATION = "gen_ai.evaluation.result"


@pytest.fixture(scope="module")
def phoenix(
    stack: LocalStack, otlp_collector: OTLPCollector, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Phoenix]:
    with Phoenix(tmp_path_factory.mktemp("phoenix")) as running:
        otlp_collector.relay_to(running.otlp_endpoint)
        try:
            yield running
        finally:
            otlp_collector.relay_to(None)


@pytest.fixture(scope="module")
def content_gateway(stack: LocalStack) -> Iterator[inference_pb2_grpc.InferenceServiceStub]:
    """A gateway of the session stack whose deployment opted in to prompt and answer text on spans."""
    env = {CAPTURE_CONTENT_ENV: "true", "OTEL_BSP_SCHEDULE_DELAY": "200"}
    with GatewayProcess(stack, "content-gateway", env) as process, grpc.insecure_channel(process.address) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


def _by_name(spans: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {span["name"]: span for span in spans}


def _parent(spans: list[dict[str, Any]], span: dict[str, Any]) -> dict[str, Any]:
    return next(s for s in spans if s["context"]["span_id"] == span["parent_id"])


def test_an_explained_request_is_one_trace_in_phoenix_with_genai_attributes_and_evaluations(
    phoenix: Phoenix, content_gateway: inference_pb2_grpc.InferenceServiceStub
) -> None:
    response = content_gateway.Generate(
        inference_pb2.GenerateRequest(
            input=inference_pb2.GenerationInput(chat=FRANCE),
            sampling=types_pb2.SamplingParams(max_tokens=8),
            explain=types_pb2.ExplainSpec(
                methods=[types_pb2.MethodSpec(name=name) for name in METHODS], faithfulness=True
            ),
        ),
        timeout=600,
    )
    assert response.explanation.state == types_pb2.EXPLANATION_STATE_SUCCEEDED, response.explanation.error
    expected = {GENERATE, COMPLETION, "llm_request", "send sl:jobs", "process sl:jobs", "fidelity"}
    expected |= {f"method {name}" for name in METHODS}
    spans = phoenix.wait_for_spans(DEFAULT_PROJECT, response.trace_id, expected)
    by_name = _by_name(spans)
    assert expected <= set(by_name), f"missing in Phoenix: {expected - set(by_name)}"

    # One trace across the three services, with the parent links of docs/architecture.md.
    root = by_name[GENERATE]
    assert root["parent_id"] is None
    assert _parent(spans, by_name[COMPLETION]) is root
    assert _parent(spans, by_name["llm_request"]) is by_name[COMPLETION]  # vLLM's own span
    assert _parent(spans, by_name["send sl:jobs"]) is root
    assert _parent(spans, by_name["process sl:jobs"]) is by_name["send sl:jobs"]  # the explainer's
    for name in METHODS:
        assert _parent(spans, by_name[f"method {name}"]) is by_name["process sl:jobs"]

    # The root is a CHAIN whose input and output Phoenix lists; this deployment opted in to message text.
    assert root["span_kind"] == "CHAIN" and root["status_code"] == "OK"
    attributes = root["attributes"]
    assert json.loads(attributes["input.value"])["messages"][0]["parts"][0]["content"] == FRANCE.messages[0].content
    assert attributes["output.value"] == response.text
    assert attributes["metadata.explanation_id"] == response.explanation_id
    assert attributes["metadata.request_id"] == response.request_id

    # The vLLM call is an LLM span with the GenAI conventions' attributes and messages.
    llm = by_name[COMPLETION]
    assert llm["span_kind"] == "LLM" and llm["status_code"] == "OK"
    llm_attributes = llm["attributes"]
    assert llm_attributes["gen_ai.operation.name"] == "text_completion"
    assert llm_attributes["gen_ai.request.model"] == MODEL
    assert llm_attributes["gen_ai.usage.input_tokens"] == response.usage.input_tokens
    assert llm_attributes["gen_ai.usage.output_tokens"] == response.usage.output_tokens
    assert FRANCE.messages[0].content in llm_attributes["gen_ai.input.messages"]
    output_messages = json.loads(llm_attributes["gen_ai.output.messages"])
    assert output_messages[0]["role"] == "assistant"
    assert output_messages[0]["parts"][0]["content"] == response.text

    explanation = Explanation.from_proto(response.explanation)
    # Method spans are EVALUATORs whose output is each explained token's strongest sources, as the SDK ranks them
    # (the explainer was not opted in to content, so sources are named by position).
    evaluator = by_name["method input_x_gradient"]
    assert evaluator["span_kind"] == "EVALUATOR"
    described = json.loads(evaluator["attributes"]["output.value"])
    assert [t["position"] for t in described] == list(explanation.target_positions)
    for index, target in enumerate(described):
        top = explanation.top_sources(index, k=3, method="input_x_gradient")
        assert [s["position"] for s in target["sources"]] == [s.position for s in top]
        assert [s["score"] for s in target["sources"]] == pytest.approx([s.score for s in top], abs=1e-5)
    faithfulness = response.explanation.results[0].faithfulness
    faithfulness_span = by_name["faithfulness input_x_gradient"]["attributes"]
    assert faithfulness_span["sightline.faithfulness.aopc_comprehensiveness"] == pytest.approx(
        faithfulness.aopc_comprehensiveness, rel=1e-6
    )

    # One evaluation per requested method, carrying the explanation's values, and one for the fidelity check.
    events = [e for e in by_name["process sl:jobs"]["events"] if e["name"] == EVALUATION]
    evaluations = {e["attributes"]["gen_ai.evaluation.name"]: e["attributes"] for e in events}
    assert sorted(evaluations) == sorted([*METHODS, "fidelity"]) and len(events) == len(METHODS) + 1
    gradient = evaluations["input_x_gradient"]
    assert gradient["gen_ai.evaluation.score.value"] == pytest.approx(faithfulness.aopc_comprehensiveness, rel=1e-6)
    beats = faithfulness.aopc_comprehensiveness > faithfulness.random_aopc_comprehensiveness
    assert gradient["gen_ai.evaluation.score.label"] == ("beats random" if beats else "no better than random")
    matrix = explanation.attributions("input_x_gradient")
    totals = np.abs(np.array(matrix.values, dtype=np.float64).reshape(matrix.shape)).sum(axis=0)
    strongest = [int(p) for p in np.argsort(-totals, kind="stable")[:3]]
    assert gradient["gen_ai.evaluation.explanation"].startswith(
        f"strongest sources over {len(explanation.target_positions)} explained tokens: "
        + ", ".join(f"position {p}" for p in strongest)
    )
    assert evaluations["logit_lens"]["gen_ai.evaluation.score.label"] == "faithfulness not measured"
    fidelity = evaluations["fidelity"]
    assert fidelity["gen_ai.evaluation.score.value"] == pytest.approx(
        response.explanation.fidelity.max_abs_logprob_diff, rel=1e-6
    )
    assert fidelity["gen_ai.evaluation.score.label"] == "reproduced"


def test_without_the_opt_in_no_message_text_reaches_phoenix(
    phoenix: Phoenix, inference: inference_pb2_grpc.InferenceServiceStub
) -> None:
    response = inference.Generate(
        inference_pb2.GenerateRequest(
            input=inference_pb2.GenerationInput(chat=FRANCE), sampling=types_pb2.SamplingParams(max_tokens=8)
        ),
        timeout=120,
    )
    spans = _by_name(phoenix.wait_for_spans(DEFAULT_PROJECT, response.trace_id, {GENERATE, COMPLETION}))
    root, llm = spans[GENERATE]["attributes"], spans[COMPLETION]["attributes"]
    assert json.loads(root["input.value"]) == {"model": "", "input": "chat", "explain": []}
    assert json.loads(root["output.value"]) == {
        "output_tokens": len(response.output_tokens),
        "finish_reason": types_pb2.FinishReason.Name(response.finish_reason),
    }
    assert "gen_ai.input.messages" not in llm and "gen_ai.output.messages" not in llm
    everything = json.dumps([root, llm])
    assert "France" not in everything and response.text not in everything
