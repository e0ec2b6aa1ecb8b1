"""An explanation as the viewer page's JSON: plain fields as they are, every matrix as base64 little-endian bytes.

Matrices travel as raw bytes (``{"dtype", "shape", "data"}``), not nested lists: a 1,024-token explanation's
attribution matrix is half a million numbers, which the page reads with one ``Float32Array`` instead of parsing.
"""

from __future__ import annotations

import base64
import sys
from array import array
from typing import Any

from sightline.v1 import explanations_pb2, types_pb2


def _tensor(tensor: types_pb2.Tensor) -> dict[str, Any]:
    # The standard library's array, not numpy: the gateway runs without numpy (tests/deploy/test_packaging.py).
    packed: array[int] | array[float]
    if tensor.dtype == types_pb2.DTYPE_INT32:
        dtype, packed = "int32", array("i", tensor.int_values)
    else:
        dtype, packed = "float32", array("f", tensor.float_values)
    if sys.byteorder != "little":
        packed.byteswap()
    return {"dtype": dtype, "shape": list(tensor.shape), "data": base64.b64encode(packed.tobytes()).decode("ascii")}


def _timestamp(message: Any, field: str) -> str | None:
    return getattr(message, field).ToJsonString() if message.HasField(field) else None


def _faithfulness(faithfulness: types_pb2.Faithfulness) -> dict[str, Any]:
    return {
        "fractions": list(faithfulness.fractions),
        "comprehensiveness": list(faithfulness.comprehensiveness),
        "sufficiency": list(faithfulness.sufficiency),
        "random_comprehensiveness": list(faithfulness.random_comprehensiveness),
        "random_sufficiency": list(faithfulness.random_sufficiency),
        "aopc_comprehensiveness": faithfulness.aopc_comprehensiveness,
        "aopc_sufficiency": faithfulness.aopc_sufficiency,
        "random_aopc_comprehensiveness": faithfulness.random_aopc_comprehensiveness,
        "random_aopc_sufficiency": faithfulness.random_aopc_sufficiency,
    }


def _method(result: types_pb2.MethodResult) -> dict[str, Any]:
    method: dict[str, Any] = {"method": result.method, "seconds": result.seconds}
    if result.HasField("attributions"):
        method["attributions"] = _tensor(result.attributions)
    if result.HasField("aggregated"):
        method["aggregated"] = _tensor(result.aggregated)
    if result.HasField("faithfulness") and result.faithfulness.fractions:
        method["faithfulness"] = _faithfulness(result.faithfulness)
    method["extras"] = {name: _tensor(tensor) for name, tensor in sorted(result.extras.items())}
    return method


def explanation_payload(explanation: types_pb2.Explanation, trace_url_template: str) -> dict[str, Any]:
    """Everything the page shows of one explanation; ``trace_url_template`` has ``{trace_id}`` (or is "")."""
    steps = explanation.step_scores
    trace_id = explanation.trace_id
    return {
        "explanation_id": explanation.explanation_id,
        "state": types_pb2.ExplanationState.Name(explanation.state),
        "error": explanation.error.message,
        "model": explanation.model,
        "created_at": _timestamp(explanation, "created_at"),
        "completed_at": _timestamp(explanation, "completed_at"),
        "trace_id": trace_id,
        "trace_url": trace_url_template.replace("{trace_id}", trace_id) if trace_url_template and trace_id else "",
        "cache_hit": explanation.cache_hit,
        "attempts": explanation.attempts,
        "tokens": [
            {"id": t.id, "text": t.text, "logprob": t.logprob if t.HasField("logprob") else None}
            for t in explanation.tokens
        ],
        "prompt_length": explanation.prompt_length,
        "target_positions": list(explanation.target_positions),
        "target_score": types_pb2.TargetScore.Name(explanation.target_score),
        "foil_token_ids": list(explanation.foil_token_ids),
        "source_groups": [{"start": g.start, "end": g.end, "label": g.label} for g in explanation.source_groups],
        "step_scores": {
            "logprobs": list(steps.logprobs),
            "probabilities": list(steps.probabilities),
            "entropies": list(steps.entropies),
            "ranks": list(steps.ranks),
            "top_token_ids": _tensor(steps.top_token_ids) if steps.HasField("top_token_ids") else None,
            "top_logprobs": _tensor(steps.top_logprobs) if steps.HasField("top_logprobs") else None,
        },
        "fidelity": {
            "recomputed_logprobs": list(explanation.fidelity.recomputed_logprobs),
            "max_abs_logprob_diff": explanation.fidelity.max_abs_logprob_diff,
        },
        "methods": [_method(result) for result in explanation.results],
    }


def summary_payload(summary: explanations_pb2.ExplanationSummary) -> dict[str, Any]:
    return {
        "explanation_id": summary.explanation_id,
        "state": types_pb2.ExplanationState.Name(summary.state),
        "model": summary.model,
        "methods": list(summary.methods),
        "created_at": _timestamp(summary, "created_at"),
        "trace_id": summary.trace_id,
    }
