"""What the explainer's spans say about an explanation, for LLM-observability backends (docs/observability.md).

Each ``method <name>`` span is an OpenInference EVALUATOR whose input is the explained tokens and whose output is
their strongest sources; each ``faithfulness <name>`` span carries the ERASER scores beside the random baseline;
the job's span gets one OpenTelemetry GenAI ``gen_ai.evaluation.result`` event per method and one for the fidelity
check. Sources are ranked as the SDK's ``Explanation.top_sources`` ranks them: by absolute score, ties to the
earlier position. Token texts are the model's tokens, so they are on spans only when the deployment opts in to
content (``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT``); otherwise sources are named by position.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
from opentelemetry import trace
from sightline.v1 import types_pb2

from common.telemetry import capture_message_content
from explainers.methods.base import tensor_array

# The explainer's one tracer: the worker, the engine and the image path open their spans on it.
tracer = trace.get_tracer("sightline.explainer")

SPAN_KIND = "openinference.span.kind"
EVALUATION_EVENT = "gen_ai.evaluation.result"
FIDELITY_EVALUATION = "fidelity"
# Largest served-vs-recomputed log-probability gap still called "reproduced" (float32 on both sides gives ~1e-5;
# the bfloat16 cache's fallback readout ~1e-2).
FIDELITY_TOLERANCE = 1e-3
# How many sources a span or event names per explained token, and how many explained tokens a span lists.
TOP_SOURCES = 3
MAX_TARGETS_ON_SPAN = 32


def _json(value: object) -> str:
    return orjson.dumps(value).decode()


def _token(explanation: types_pb2.Explanation, position: int, content: bool) -> dict[str, Any]:
    token: dict[str, Any] = {"position": position}
    if content:
        token["text"] = explanation.tokens[position].text
    return token


def strongest_sources(row: np.ndarray, target_position: int, k: int) -> list[int]:
    """Positions before ``target_position`` with the largest |score| in ``row``, strongest first, ties earlier."""
    prefix = np.abs(row[:target_position])
    return [int(p) for p in np.argsort(-prefix, kind="stable")[:k]]


def describe_method(span: trace.Span, explanation: types_pb2.Explanation, result: types_pb2.MethodResult) -> None:
    """The explained tokens and each one's strongest sources on a ``method <name>`` span."""
    content = capture_message_content()
    positions = list(explanation.target_positions)[:MAX_TARGETS_ON_SPAN]
    span.set_attribute("input.value", _json([_token(explanation, p, content) for p in positions]))
    span.set_attribute("input.mime_type", "application/json")
    span.set_attribute("sightline.method.seconds", result.seconds)
    if not result.HasField("attributions"):
        return
    matrix = tensor_array(result.attributions)
    described = []
    for index, position in enumerate(positions):
        sources = [
            {**_token(explanation, source, content), "score": round(float(matrix[index, source]), 6)}
            for source in strongest_sources(matrix[index], position, TOP_SOURCES)
        ]
        described.append({**_token(explanation, position, content), "sources": sources})
    span.set_attribute("output.value", _json(described))
    span.set_attribute("output.mime_type", "application/json")


def describe_faithfulness(span: trace.Span, faithfulness: types_pb2.Faithfulness) -> None:
    span.set_attributes(
        {
            "sightline.faithfulness.aopc_comprehensiveness": faithfulness.aopc_comprehensiveness,
            "sightline.faithfulness.random_aopc_comprehensiveness": faithfulness.random_aopc_comprehensiveness,
            "sightline.faithfulness.aopc_sufficiency": faithfulness.aopc_sufficiency,
            "sightline.faithfulness.random_aopc_sufficiency": faithfulness.random_aopc_sufficiency,
        }
    )


def overall_sources(explanation: types_pb2.Explanation, result: types_pb2.MethodResult, k: int) -> list[int]:
    """The ``k`` positions with the largest |score| summed over every explained token, strongest first."""
    matrix = np.abs(tensor_array(result.attributions).astype(np.float64))
    for index, position in enumerate(explanation.target_positions):
        matrix[index, position:] = 0.0  # outside the causal prefix (already 0; made sure)
    totals = matrix.sum(axis=0)
    return [int(p) for p in np.argsort(-totals, kind="stable")[:k]]


def _sources_text(explanation: types_pb2.Explanation, positions: Sequence[int], content: bool) -> str:
    if content:
        return ", ".join(f"{explanation.tokens[p].text!r} (position {p})" for p in positions)
    return ", ".join(f"position {p}" for p in positions)


def method_evaluation(explanation: types_pb2.Explanation, result: types_pb2.MethodResult) -> dict[str, Any]:
    """The attributes of one method's ``gen_ai.evaluation.result`` event."""
    attributes: dict[str, Any] = {"gen_ai.evaluation.name": result.method}
    faithfulness = result.faithfulness
    measured = result.HasField("faithfulness") and len(faithfulness.fractions) > 0
    if measured:
        attributes["gen_ai.evaluation.score.value"] = faithfulness.aopc_comprehensiveness
        attributes["sightline.faithfulness.random_aopc_comprehensiveness"] = faithfulness.random_aopc_comprehensiveness
        beats = faithfulness.aopc_comprehensiveness > faithfulness.random_aopc_comprehensiveness
        attributes["gen_ai.evaluation.score.label"] = "beats random" if beats else "no better than random"
    else:
        attributes["gen_ai.evaluation.score.label"] = "faithfulness not measured"
    if result.HasField("attributions"):
        top = overall_sources(explanation, result, TOP_SOURCES)
        text = (
            f"strongest sources over {len(explanation.target_positions)} explained tokens: "
            f"{_sources_text(explanation, top, capture_message_content())}"
        )
        if measured:
            text += (
                f"; comprehensiveness (AOPC) {faithfulness.aopc_comprehensiveness:.4f} "
                f"vs {faithfulness.random_aopc_comprehensiveness:.4f} for random sources"
            )
        attributes["gen_ai.evaluation.explanation"] = text
    else:
        attributes["gen_ai.evaluation.explanation"] = (
            f"{result.method} reads the model's layers out; it attributes no sources"
        )
    return attributes


def fidelity_evaluation(explanation: types_pb2.Explanation) -> dict[str, Any]:
    """The fidelity check's ``gen_ai.evaluation.result`` attributes."""
    fidelity = explanation.fidelity
    gap = fidelity.max_abs_logprob_diff
    return {
        "gen_ai.evaluation.name": FIDELITY_EVALUATION,
        "gen_ai.evaluation.score.value": gap,
        "gen_ai.evaluation.score.label": "reproduced" if gap <= FIDELITY_TOLERANCE else "diverged",
        "gen_ai.evaluation.explanation": (
            f"the explainer recomputed {len(fidelity.recomputed_logprobs)} generated tokens' log-probabilities on "
            f"the same weights; largest gap to what vLLM served: {gap:.3g}"
        ),
    }


def record_evaluations(span: trace.Span, explanation: types_pb2.Explanation, *, served_compared: bool) -> None:
    """One ``gen_ai.evaluation.result`` event per method, and one for fidelity when served log-probabilities were
    compared, on the job's span."""
    for result in explanation.results:
        span.add_event(EVALUATION_EVENT, method_evaluation(explanation, result))
    if served_compared:
        span.add_event(EVALUATION_EVENT, fidelity_evaluation(explanation))
