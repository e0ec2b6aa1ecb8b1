"""The server's default method (common.explain_spec.default_method): AttnLRP where its rules cover the architecture,
else a method every architecture runs; both registered, token-attributing, and the ones the committed plausibility
and faithfulness benchmark supports (benchmarks/results/plausibility.json, docs/methods.md "Which method should I
use")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sightline.v1 import types_pb2

from common.explain_spec import (
    ATTN_LRP_FAMILIES,
    DEFAULT_METHOD,
    DEFAULT_METHOD_ELSEWHERE,
    default_method,
    with_default_method,
)
from explainers.methods.attn_lrp import NOT_COVERED
from explainers.methods.registry import get_method

RESULT = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "plausibility.json"


def test_a_spec_without_methods_gets_the_default_with_everything_else_kept() -> None:
    spec = types_pb2.ExplainSpec(
        mode=types_pb2.EXPLAIN_MODE_ASYNC, faithfulness=True, targets=types_pb2.TargetSpec(output_indices=[2])
    )
    defaulted = with_default_method(spec, "llama")
    assert [(m.name, dict(m.params)) for m in defaulted.methods] == [(DEFAULT_METHOD, {})]
    defaulted.ClearField("methods")
    assert defaulted == spec
    assert not spec.methods  # the caller's spec is left as it was


def test_a_spec_that_names_methods_is_left_alone() -> None:
    spec = types_pb2.ExplainSpec(methods=[types_pb2.MethodSpec(name="occlusion")])
    assert with_default_method(spec, "gpt2") is spec


@pytest.mark.parametrize("architecture", [*ATTN_LRP_FAMILIES, *NOT_COVERED, "some_future_family"])
def test_the_default_is_attn_lrp_exactly_where_its_rules_cover_the_architecture(architecture: str) -> None:
    expected = DEFAULT_METHOD if architecture in ATTN_LRP_FAMILIES else DEFAULT_METHOD_ELSEWHERE
    assert default_method(architecture) == expected
    assert (DEFAULT_METHOD, DEFAULT_METHOD_ELSEWHERE) == ("attn_lrp", "saliency")


@pytest.mark.parametrize("name", [DEFAULT_METHOD, DEFAULT_METHOD_ELSEWHERE])
def test_the_defaults_are_registered_token_attributing_methods(name: str) -> None:
    assert get_method(name).attributes_tokens


def test_the_benchmark_supports_the_defaults() -> None:
    result = json.loads(RESULT.read_text())
    assert not result["smoke"]
    assert result["recommended_default"] == DEFAULT_METHOD
    assert result["recommended_default_every_architecture"] == DEFAULT_METHOD_ELSEWHERE
    rows = {row["method"]: row for row in result["summary"]}
    for name in (DEFAULT_METHOD, DEFAULT_METHOD_ELSEWHERE):
        assert rows[name]["comprehensiveness_vs_random"] > 0 > rows[name]["sufficiency_vs_random"]
