"""What the explainer's spans say about an explanation: sources ranked like the SDK, evaluation events per method."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from opentelemetry import trace
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sightline.types import Explanation
from sightline.v1 import types_pb2

from common.telemetry import CAPTURE_CONTENT_ENV
from explainers.methods.base import tensor_proto
from explainers.telemetry import (
    EVALUATION_EVENT,
    describe_method,
    record_evaluations,
    strongest_sources,
)


def explanation_with(matrix: np.ndarray, *, faithfulness: types_pb2.Faithfulness | None) -> types_pb2.Explanation:
    """Five tokens, the last two generated and explained, one attributing method and logit lens."""
    tokens = [types_pb2.Token(id=i, text=text) for i, text in enumerate(["A", " b", " c", " D", " e"])]
    result = types_pb2.MethodResult(method="saliency", attributions=tensor_proto(torch.from_numpy(matrix)))
    if faithfulness is not None:
        result.faithfulness.CopyFrom(faithfulness)
    explanation = types_pb2.Explanation(
        tokens=tokens,
        prompt_length=3,
        target_positions=[3, 4],
        results=[result, types_pb2.MethodResult(method="logit_lens")],
    )
    explanation.fidelity.max_abs_logprob_diff = 2e-5
    explanation.fidelity.recomputed_logprobs.extend([-0.1, -0.2])
    return explanation


MATRIX = np.array([[0.1, -0.5, 0.5, 0.0], [0.2, 0.0, -0.3, 0.9]], dtype=np.float32)


def attributes(item: ReadableSpan | Event) -> dict[str, Any]:
    return dict(item.attributes or {})


def evaluations(span: ReadableSpan) -> dict[str, dict[str, Any]]:
    found = [attributes(e) for e in span.events if e.name == EVALUATION_EVENT]
    return {a["gen_ai.evaluation.name"]: a for a in found}


def spans_of(run: Callable[[trace.Span], None]) -> list[ReadableSpan]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("test").start_as_current_span("job") as span:
        run(span)
    return list(exporter.get_finished_spans())


def test_strongest_sources_rank_like_the_sdk_ties_to_the_earlier_position() -> None:
    sdk = Explanation.from_proto(explanation_with(MATRIX, faithfulness=None))
    for index, position in enumerate(sdk.target_positions):
        expected = [s.position for s in sdk.top_sources(index, k=3, method="saliency")]
        assert strongest_sources(MATRIX[index], position, 3) == expected
    assert strongest_sources(MATRIX[0], 3, 2) == [1, 2]  # |-0.5| == |0.5|: the earlier first


def test_method_span_names_sources_by_position_unless_content_is_opted_in(monkeypatch: pytest.MonkeyPatch) -> None:
    explanation = explanation_with(MATRIX, faithfulness=None)
    monkeypatch.delenv(CAPTURE_CONTENT_ENV, raising=False)
    (span,) = spans_of(lambda s: describe_method(s, explanation, explanation.results[0]))
    described = json.loads(attributes(span)["output.value"])
    assert described[1] == {
        "position": 4,
        "sources": [
            {"position": 3, "score": pytest.approx(0.9)},
            {"position": 2, "score": pytest.approx(-0.3)},
            {"position": 0, "score": pytest.approx(0.2)},
        ],
    }
    monkeypatch.setenv(CAPTURE_CONTENT_ENV, "true")
    (span,) = spans_of(lambda s: describe_method(s, explanation, explanation.results[0]))
    assert json.loads(attributes(span)["output.value"])[1]["sources"][0]["text"] == " D"


def test_one_evaluation_per_method_and_one_for_fidelity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CAPTURE_CONTENT_ENV, raising=False)
    faithfulness = types_pb2.Faithfulness(
        fractions=[0.5], aopc_comprehensiveness=0.25, random_aopc_comprehensiveness=0.5
    )
    explanation = explanation_with(MATRIX, faithfulness=faithfulness)
    (span,) = spans_of(lambda s: record_evaluations(s, explanation, served_compared=True))
    events = evaluations(span)
    assert set(events) == {"saliency", "logit_lens", "fidelity"}
    saliency = events["saliency"]
    assert saliency["gen_ai.evaluation.score.value"] == 0.25
    assert saliency["gen_ai.evaluation.score.label"] == "no better than random"
    # Summed |score| per source: position 1: 0.5, 2: 0.8, 3: 0.9, 0: 0.3.
    assert saliency["gen_ai.evaluation.explanation"].startswith(
        "strongest sources over 2 explained tokens: position 3, position 2, position 1"
    )
    assert "gen_ai.evaluation.score.value" not in events["logit_lens"]
    assert events["fidelity"]["gen_ai.evaluation.score.value"] == pytest.approx(2e-5)
    assert events["fidelity"]["gen_ai.evaluation.score.label"] == "reproduced"

    (span,) = spans_of(lambda s: record_evaluations(s, explanation, served_compared=False))
    assert set(evaluations(span)) == {"saliency", "logit_lens"}
