"""Explained generation end to end: gateway → vLLM → Redis → explainer worker → gateway."""

from __future__ import annotations

import numpy as np
import pytest
from sightline.v1 import explanations_pb2, explanations_pb2_grpc, inference_pb2, inference_pb2_grpc, types_pb2

from tests.e2e.test_generation import FRANCE

pytestmark = pytest.mark.e2e

# vLLM and the explainer both run the same float32 weights; they differ only in kernels and
# summation order, so served and recomputed log-probabilities agree far below this bound.
FIDELITY_BOUND = 0.02


def _matrix(tensor: types_pb2.Tensor) -> np.ndarray:
    assert tensor.dtype == types_pb2.DTYPE_FLOAT32
    return np.array(tensor.float_values, dtype=np.float32).reshape(tuple(tensor.shape))


def _generate(
    inference: inference_pb2_grpc.InferenceServiceStub,
    *methods: str,
    mode: types_pb2.ExplainMode = types_pb2.EXPLAIN_MODE_SYNC,
) -> inference_pb2.GenerateResponse:
    response: inference_pb2.GenerateResponse = inference.Generate(
        inference_pb2.GenerateRequest(
            input=inference_pb2.GenerationInput(chat=FRANCE),
            sampling=types_pb2.SamplingParams(max_tokens=12),
            explain=types_pb2.ExplainSpec(methods=[types_pb2.MethodSpec(name=m) for m in methods], mode=mode),
        ),
        timeout=300,
    )
    return response


def test_sync_explanation_is_attached(inference: inference_pb2_grpc.InferenceServiceStub) -> None:
    response = _generate(inference, "input_x_gradient", "logit_lens")
    explanation = response.explanation
    assert explanation.state == types_pb2.EXPLANATION_STATE_SUCCEEDED, explanation.error
    assert explanation.explanation_id == response.explanation_id
    assert explanation.trace_id == response.trace_id

    prompt_len = len(response.prompt_token_ids)
    generated = len(response.output_tokens)
    assert explanation.prompt_length == prompt_len
    output_ids = [t.id for t in response.output_tokens]
    assert [t.id for t in explanation.tokens] == list(response.prompt_token_ids) + output_ids
    assert all(t.text for t in explanation.tokens)
    assert list(explanation.target_positions) == list(range(prompt_len, prompt_len + generated))

    results = {r.method: r for r in explanation.results}
    matrix = _matrix(results["input_x_gradient"].attributions)
    # One row per generated token, one column per token that can precede one.
    assert matrix.shape == (generated, prompt_len + generated - 1)
    for row, position in enumerate(explanation.target_positions):
        assert np.all(matrix[row, position:] == 0.0), "a token cannot be attributed to itself or later tokens"
        assert np.any(matrix[row, :position] != 0.0)
        assert np.all(np.isfinite(matrix[row]))

    lens = results["logit_lens"]
    top_ids = np.array(lens.extras["top_token_ids"].int_values, dtype=np.int32).reshape(
        tuple(lens.extras["top_token_ids"].shape)
    )
    assert top_ids.shape[1] == generated
    # At the last layer the lens is the model itself: greedy decoding picked its top-1 token.
    assert list(top_ids[-1, :, 0]) == output_ids

    # The explainer's replica reproduces what vLLM served.
    assert len(explanation.fidelity.recomputed_logprobs) == generated
    assert explanation.fidelity.max_abs_logprob_diff < FIDELITY_BOUND
    served = np.array([t.logprob for t in response.output_tokens])
    assert np.max(np.abs(np.array(explanation.fidelity.recomputed_logprobs) - served)) < FIDELITY_BOUND


def test_async_explanation_is_fetched_later(
    inference: inference_pb2_grpc.InferenceServiceStub, explanations: explanations_pb2_grpc.ExplanationsServiceStub
) -> None:
    response = _generate(inference, "input_x_gradient", mode=types_pb2.EXPLAIN_MODE_ASYNC)
    assert response.explanation_id.startswith("exp_")
    assert not response.HasField("explanation")
    fetched = explanations.GetExplanation(
        explanations_pb2.GetExplanationRequest(explanation_id=response.explanation_id, wait_seconds=120), timeout=150
    ).explanation
    assert fetched.state == types_pb2.EXPLANATION_STATE_SUCCEEDED, fetched.error
    matrix = _matrix(fetched.results[0].attributions)
    assert matrix.shape == (
        len(response.output_tokens),
        len(response.prompt_token_ids) + len(response.output_tokens) - 1,
    )
    # Fetching again without waiting returns the same stored record.
    again = explanations.GetExplanation(
        explanations_pb2.GetExplanationRequest(explanation_id=response.explanation_id), timeout=10
    ).explanation
    assert again == fetched


def test_explaining_the_same_tokens_again_hits_the_cache(
    inference: inference_pb2_grpc.InferenceServiceStub, explanations: explanations_pb2_grpc.ExplanationsServiceStub
) -> None:
    first = _generate(inference, "logit_lens")
    second = explanations.Explain(
        explanations_pb2.ExplainRequest(
            prompt_token_ids=first.prompt_token_ids,
            output_token_ids=[t.id for t in first.output_tokens],
            explain=types_pb2.ExplainSpec(methods=[types_pb2.MethodSpec(name="logit_lens")]),
        ),
        timeout=120,
    ).explanation
    assert second.state == types_pb2.EXPLANATION_STATE_SUCCEEDED, second.error
    assert second.cache_hit
    assert second.results[0].extras["top_token_ids"] == first.explanation.results[0].extras["top_token_ids"]


def test_streamed_generation_carries_its_explanation(inference: inference_pb2_grpc.InferenceServiceStub) -> None:
    chunks = list(
        inference.GenerateStream(
            inference_pb2.GenerateRequest(
                input=inference_pb2.GenerationInput(chat=FRANCE),
                sampling=types_pb2.SamplingParams(max_tokens=8),
                explain=types_pb2.ExplainSpec(methods=[types_pb2.MethodSpec(name="input_x_gradient")]),
            ),
            timeout=300,
        )
    )
    final = chunks[-1].end
    generated = sum(len(c.delta.output_tokens) for c in chunks)
    assert final.explanation.state == types_pb2.EXPLANATION_STATE_SUCCEEDED, final.explanation.error
    assert _matrix(final.explanation.results[0].attributions).shape[0] == generated


def test_list_methods_describes_the_registry(explanations: explanations_pb2_grpc.ExplanationsServiceStub) -> None:
    methods = {m.name: m for m in explanations.ListMethods(explanations_pb2.ListMethodsRequest(), timeout=10).methods}
    assert {"input_x_gradient", "logit_lens"} <= set(methods)
    assert methods["input_x_gradient"].needs_gradients and methods["input_x_gradient"].attributes_tokens
    assert methods["logit_lens"].uses_cache and not methods["logit_lens"].needs_gradients
    assert any(p.name == "k" and p.type == explanations_pb2.PARAM_TYPE_INT for p in methods["logit_lens"].params)
