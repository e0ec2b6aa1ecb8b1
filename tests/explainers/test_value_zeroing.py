"""Value zeroing against a direct intervention written with nnsight on the float64 tiny Llama: every layer's scores,
the rollout that combines them, and the bookkeeping (rows sum to 1, causality, batching never changes a score)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pytest
import torch
from nnsight import NNsight
from sightline.v1 import types_pb2

from explainers.methods import value_zeroing
from explainers.methods.base import AttributionContext, InvalidParamsError
from explainers.methods.value_zeroing import ValueZeroing, value_zeroing_scores
from explainers.model import LoadedModel

ReadTensor = Callable[[types_pb2.Tensor], np.ndarray]
MakeContext = Callable[[LoadedModel], AttributionContext]


@pytest.fixture
def ctx(tiny_model: LoadedModel, make_context: MakeContext) -> AttributionContext:
    return make_context(tiny_model)


def nnsight_scores(ctx: AttributionContext) -> torch.Tensor:
    """C [num_layers, num_tokens, num_tokens] by intervention on the full model: for each layer and source position,
    a trace that zeroes that position's value vector in that layer's v_proj and saves the layer's output."""
    # A copy: nnsight instruments the modules it wraps, and the tiny model is shared by the session's tests.
    model = NNsight(copy.deepcopy(ctx.loaded.model))
    ids = ctx.token_ids[None]
    num_tokens = len(ctx.token_ids)
    scores = torch.zeros(ctx.loaded.num_layers, num_tokens, num_tokens, dtype=torch.float64)
    for layer in range(ctx.loaded.num_layers):
        with torch.no_grad(), model.trace(ids):
            clean = model.model.layers[layer].output.save()
        for source in range(num_tokens):
            with torch.no_grad(), model.trace(ids):
                model.model.layers[layer].self_attn.v_proj.output[0, source, :] = 0
                altered = model.model.layers[layer].output.save()
            scores[layer, :, source] = 1 - torch.nn.functional.cosine_similarity(altered[0], clean[0], dim=-1)
    scores = torch.where(torch.ones(num_tokens, num_tokens, dtype=torch.bool).tril(), scores, 0.0)
    normalised: torch.Tensor = scores / scores.sum(dim=-1, keepdim=True)
    return normalised


def run(ctx: AttributionContext, read_tensor: ReadTensor, **params: object) -> tuple[np.ndarray, np.ndarray]:
    """(attributions, layer_scores)."""
    method = ValueZeroing()
    result = method.attribute(ctx, method.parse_params(params))
    return read_tensor(result.attributions), read_tensor(result.extras["layer_scores"])


def prefix(rows: torch.Tensor, ctx: AttributionContext) -> np.ndarray:
    """[num_targets, num_tokens] -> the attribution layout: the last position dropped, zero from each target on."""
    sources = torch.arange(rows.shape[-1] - 1)
    kept = torch.where(sources[None] < ctx.targets.positions[:, None], rows[..., :-1], 0.0)
    result: np.ndarray = kept.numpy()
    return result


def test_every_layer_equals_the_nnsight_intervention(ctx: AttributionContext) -> None:
    expected = nnsight_scores(ctx)
    ours = value_zeroing_scores(ctx.loaded, ctx.hidden_states)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours.sum(dim=-1), torch.ones_like(ours[..., 0]), rtol=0, atol=1e-12)


def test_the_attributions_are_the_rows_that_predict_each_target(
    ctx: AttributionContext, read_tensor: ReadTensor
) -> None:
    expected = nnsight_scores(ctx)
    predicting = ctx.targets.predicting_positions
    rollout, layer_scores = run(ctx, read_tensor)
    # The paper's rollout: the last layer's rows times every layer below, no identity added.
    np.testing.assert_allclose(rollout, prefix((expected[1] @ expected[0])[predicting], ctx), rtol=0, atol=1e-7)
    for layer in (1, 2):
        single, _ = run(ctx, read_tensor, aggregation="layer", layer=layer)
        np.testing.assert_allclose(single, prefix(expected[layer - 1][predicting], ctx), rtol=0, atol=1e-7)
        np.testing.assert_allclose(layer_scores[layer - 1], single, rtol=0, atol=0)
    last, _ = run(ctx, read_tensor, aggregation="layer")
    np.testing.assert_array_equal(last, run(ctx, read_tensor, aggregation="layer", layer=2)[0])


def test_batching_never_changes_a_score(ctx: AttributionContext, monkeypatch: pytest.MonkeyPatch) -> None:
    together = value_zeroing_scores(ctx.loaded, ctx.hidden_states)
    monkeypatch.setattr(value_zeroing, "MAX_PASS_ROWS", 1)  # one zeroed position per pass
    torch.testing.assert_close(value_zeroing_scores(ctx.loaded, ctx.hidden_states), together, rtol=0, atol=1e-13)


def test_a_layer_past_the_model_is_refused(ctx: AttributionContext) -> None:
    method = ValueZeroing()
    with pytest.raises(InvalidParamsError, match=r"'layer' of method 'value_zeroing' must be in 0..2"):
        method.attribute(ctx, method.parse_params({"aggregation": "layer", "layer": 3}))


def test_a_family_without_a_known_value_projection_is_refused_with_the_reason(
    ctx: AttributionContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(value_zeroing.VALUE_PROJECTIONS, "llama")
    method = ValueZeroing()
    with pytest.raises(InvalidParamsError, match=r"does not know where a 'llama' model computes its value vectors"):
        method.attribute(ctx, method.parse_params({}))
