"""A call that always explains (Explain, EstimateExplanation) and names no method gets the server's default method,
which the plausibility benchmark chose (common.explain_spec.DEFAULT_METHOD; docs/methods.md)."""

from __future__ import annotations

import numpy as np
import pytest
from sightline.v1 import explanations_pb2, explanations_pb2_grpc, inference_pb2, inference_pb2_grpc, types_pb2

from common.explain_spec import DEFAULT_METHOD, default_method
from tests.e2e.test_generation import FRANCE

pytestmark = pytest.mark.e2e


def test_explain_without_methods_runs_the_default_method(
    inference: inference_pb2_grpc.InferenceServiceStub, explanations: explanations_pb2_grpc.ExplanationsServiceStub
) -> None:
    generated = inference.Generate(
        inference_pb2.GenerateRequest(
            input=inference_pb2.GenerationInput(chat=FRANCE), sampling=types_pb2.SamplingParams(max_tokens=8)
        ),
        timeout=300,
    )
    # Generate without methods explains nothing: the default applies only to calls that always explain.
    assert not generated.explanation_id and not generated.HasField("explanation")
    output_ids = [t.id for t in generated.output_tokens]
    explanation = explanations.Explain(
        explanations_pb2.ExplainRequest(
            prompt_token_ids=generated.prompt_token_ids,
            output_token_ids=output_ids,
            explain=types_pb2.ExplainSpec(targets=types_pb2.TargetSpec(output_indices=[0])),
        ),
        timeout=300,
    ).explanation
    assert explanation.state == types_pb2.EXPLANATION_STATE_SUCCEEDED, explanation.error
    # The embedded SmolLM2 is a Llama, which AttnLRP's rules cover.
    assert explanation.architecture == "llama"
    assert [result.method for result in explanation.results] == [default_method("llama")] == [DEFAULT_METHOD]
    matrix = explanation.results[0].attributions
    assert tuple(matrix.shape) == (1, len(generated.prompt_token_ids) + len(output_ids) - 1)
    assert np.any(np.array(matrix.float_values) != 0.0)


def test_estimate_without_methods_prices_the_default_method(
    explanations: explanations_pb2_grpc.ExplanationsServiceStub,
) -> None:
    estimate = explanations.EstimateExplanation(
        explanations_pb2.EstimateExplanationRequest(prompt_tokens=40, output_tokens=10, explain=types_pb2.ExplainSpec())
    )
    architecture = explanations.ListMethods(explanations_pb2.ListMethodsRequest()).architecture
    assert [method.method for method in estimate.methods] == [default_method(architecture)]
    assert estimate.passes == estimate.methods[0].passes > 0
