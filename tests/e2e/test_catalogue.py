"""Every registered method, and the explanation options, through the gRPC API on the embedded model."""

from __future__ import annotations

import itertools

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from sightline.v1 import explanations_pb2, explanations_pb2_grpc, inference_pb2, inference_pb2_grpc, types_pb2

from tests.params import param_values

pytestmark = pytest.mark.e2e

# Cheap settings so the whole catalogue runs in CI's time; the numerics are tested on tiny models.
CHEAP_PARAMS: dict[str, dict[str, int]] = {
    "integrated_gradients": {"steps": 4},
    "layer_integrated_gradients": {"steps": 4, "layer": 20},
    "gradient_x_activation": {"layer": 20},
    "shapley_sampling": {"samples": 2},
}


def _array(tensor: types_pb2.Tensor) -> np.ndarray:
    if tensor.dtype == types_pb2.DTYPE_FLOAT32:
        return np.array(tensor.float_values, dtype=np.float32).reshape(tuple(tensor.shape))
    return np.array(tensor.int_values, dtype=np.int32).reshape(tuple(tensor.shape))


@pytest.fixture(scope="module")
def generation(inference: inference_pb2_grpc.InferenceServiceStub) -> inference_pb2.GenerateResponse:
    response: inference_pb2.GenerateResponse = inference.Generate(
        inference_pb2.GenerateRequest(
            input=inference_pb2.GenerationInput(prompt="The capital of France is"),
            sampling=types_pb2.SamplingParams(max_tokens=4),
        ),
        timeout=60,
    )
    return response


def _explain(
    explanations: explanations_pb2_grpc.ExplanationsServiceStub,
    generation: inference_pb2.GenerateResponse,
    methods: list[types_pb2.MethodSpec],
    **spec: object,
) -> types_pb2.Explanation:
    response = explanations.Explain(
        explanations_pb2.ExplainRequest(
            prompt_token_ids=generation.prompt_token_ids,
            output_token_ids=[t.id for t in generation.output_tokens],
            output_logprobs=[t.logprob for t in generation.output_tokens],
            explain=types_pb2.ExplainSpec(methods=methods, **spec),  # type: ignore[arg-type]
        ),
        timeout=600,
    )
    explanation: types_pb2.Explanation = response.explanation
    assert explanation.state == types_pb2.EXPLANATION_STATE_SUCCEEDED, explanation.error
    return explanation


def test_every_method_explains_a_real_generation(
    explanations: explanations_pb2_grpc.ExplanationsServiceStub, generation: inference_pb2.GenerateResponse
) -> None:
    infos = explanations.ListMethods(explanations_pb2.ListMethodsRequest(), timeout=10).methods
    assert len(infos) >= 10, [m.name for m in infos]
    specs = []
    for info in infos:
        specs.append(types_pb2.MethodSpec(name=info.name, params=param_values(CHEAP_PARAMS.get(info.name, {}))))
    explanation = _explain(explanations, generation, specs)

    num_tokens = len(explanation.tokens)
    generated = len(generation.output_tokens)
    results = {r.method: r for r in explanation.results}
    assert set(results) == {info.name for info in infos}
    for info in infos:
        result = results[info.name]
        if not info.attributes_tokens:
            continue
        matrix = _array(result.attributions)
        assert matrix.shape == (generated, num_tokens - 1), info.name
        assert np.all(np.isfinite(matrix)), info.name
        for row, position in enumerate(explanation.target_positions):
            assert np.all(matrix[row, position:] == 0), info.name
            assert np.any(matrix[row, :position] != 0), info.name
    delta = _array(results["integrated_gradients"].extras["convergence_delta"])
    assert delta.shape == (generated,)

    steps = explanation.step_scores
    assert len(steps.logprobs) == generated
    served = np.array([t.logprob for t in generation.output_tokens])
    assert np.max(np.abs(np.array(steps.logprobs) - served)) < 0.05
    assert list(steps.ranks) == [1] * generated, "greedy decoding picks each step's most likely token"
    assert _array(steps.top_token_ids)[:, 0].tolist() == [t.id for t in generation.output_tokens]


def test_contrastive_words_and_faithfulness(
    explanations: explanations_pb2_grpc.ExplanationsServiceStub, generation: inference_pb2.GenerateResponse
) -> None:
    first_output = generation.output_tokens[0]
    explanation = _explain(
        explanations,
        generation,
        [types_pb2.MethodSpec(name="input_x_gradient"), types_pb2.MethodSpec(name="occlusion")],
        targets=types_pb2.TargetSpec(output_indices=[0], foil_token_ids=[first_output.id + 1]),
        aggregation=types_pb2.AggregationSpec(granularity=types_pb2.GRANULARITY_WORD),
        faithfulness=True,
    )
    prompt_length = len(generation.prompt_token_ids)
    assert list(explanation.target_positions) == [prompt_length]
    assert list(explanation.foil_token_ids) == [first_output.id + 1]
    groups = explanation.source_groups
    assert groups[0].start == 0 and groups[-1].end == len(explanation.tokens)
    assert all(a.end == b.start for a, b in itertools.pairwise(groups))
    for result in explanation.results:
        assert tuple(result.attributions.shape) == (1, len(explanation.tokens) - 1)
        assert tuple(result.aggregated.shape) == (1, len(groups))
        faithfulness = json_format.MessageToDict(result.faithfulness)
        assert len(faithfulness["fractions"]) == 5
        assert len(faithfulness["comprehensiveness"]) == 5


def test_an_explanation_over_the_cost_limit_is_refused_before_generating(
    inference: inference_pb2_grpc.InferenceServiceStub,
) -> None:
    params = param_values({"steps": 512})
    with pytest.raises(grpc.RpcError) as caught:
        inference.Generate(
            inference_pb2.GenerateRequest(
                input=inference_pb2.GenerationInput(prompt="Tell me a long story."),
                sampling=types_pb2.SamplingParams(max_tokens=2000),
                explain=types_pb2.ExplainSpec(
                    methods=[types_pb2.MethodSpec(name="integrated_gradients", params=params)]
                ),
            ),
            timeout=30,
        )
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "SIGHTLINE_MAX_EXPLANATION_COST" in caught.value.details()
    assert "limit of 50,000,000" in caught.value.details()


def test_parameter_bounds_are_enforced_before_generating(inference: inference_pb2_grpc.InferenceServiceStub) -> None:
    params = param_values({"steps": 100000})
    with pytest.raises(grpc.RpcError) as caught:
        inference.Generate(
            inference_pb2.GenerateRequest(
                input=inference_pb2.GenerationInput(prompt="Hi"),
                explain=types_pb2.ExplainSpec(
                    methods=[types_pb2.MethodSpec(name="integrated_gradients", params=params)]
                ),
            ),
            timeout=30,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "parameter 'steps' of method 'integrated_gradients' must be in 2..512" in caught.value.details()
