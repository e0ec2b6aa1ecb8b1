"""attention and attention_rollout against the attention probabilities transformers' eager attention returns."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from sightline.v1 import types_pb2
from transformers.models.llama import modeling_llama

from explainers.methods import attention_weights
from explainers.methods.attention import Attention, AttentionParams
from explainers.methods.attention_rollout import AttentionRollout, AttentionRolloutParams, rollout
from explainers.methods.attention_weights import attention_probabilities
from explainers.methods.base import AttributionContext, InvalidParamsError
from explainers.model import LoadedModel

ReadTensor = Callable[[types_pb2.Tensor], np.ndarray]
MakeContext = Callable[[LoadedModel], AttributionContext]


def eager_attentions(loaded: LoadedModel, token_ids: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's attention probabilities [heads, num_tokens, num_tokens] from transformers' eager attention."""
    eager = copy.deepcopy(loaded.model)  # the session's model stays on SDPA
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = eager(input_ids=token_ids[None], output_attentions=True).attentions
    return [layer[0] for layer in attentions]


def eager_attention_softmax_in_query_dtype(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager_attention_forward without its float32 round trip of the softmax."""
    key = modeling_llama.repeat_kv(key, module.num_key_value_groups)
    value = modeling_llama.repeat_kv(value, module.num_key_value_groups)
    logits = query @ key.transpose(2, 3) * scaling
    if attention_mask is not None:
        logits = logits + attention_mask
    weights = logits.softmax(dim=-1)
    return (weights @ value).transpose(1, 2).contiguous(), weights


@pytest.fixture
def exact_eager_attentions(
    tiny_model: LoadedModel, token_ids: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> list[torch.Tensor]:
    """Eager attention in float64 throughout. Stock eager computes its softmax in float32 (errors ~3e-7), which
    would hide any deviation below that; everything else (norm, projections, rotary, GQA, mask) is transformers'."""
    monkeypatch.setattr(modeling_llama, "eager_attention_forward", eager_attention_softmax_in_query_dtype)
    return eager_attentions(tiny_model, token_ids)


# --- the shared probabilities ---


@pytest.mark.parametrize("layer", [1, 2])
def test_probabilities_match_float64_eager_attention(
    tiny_model: LoadedModel, make_context: MakeContext, exact_eager_attentions: list[torch.Tensor], layer: int
) -> None:
    ctx = make_context(tiny_model)
    predicting = ctx.targets.predicting_positions
    expected = exact_eager_attentions[layer - 1]  # [heads, num_tokens, num_tokens]

    (rows,) = attention_probabilities(tiny_model, ctx.hidden_states, [layer], predicting)
    (every_row,) = attention_probabilities(tiny_model, ctx.hidden_states, [layer], torch.arange(len(ctx.token_ids)))

    assert rows.shape == (4, 8, 14) and every_row.shape == (4, 14, 14)
    torch.testing.assert_close(rows, expected[:, predicting], rtol=0, atol=1e-10)
    torch.testing.assert_close(every_row, expected, rtol=0, atol=1e-10)
    assert torch.all(every_row.triu(diagonal=1) == 0)  # causal: exactly, not just numerically


def test_layer_groups_never_change_the_probabilities(
    tiny_model: LoadedModel, make_context: MakeContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Layers are computed in groups bounded by MAX_GROUP_PROBABILITIES: one layer at a time gives the same."""
    ctx = make_context(tiny_model)
    every_position = torch.arange(len(ctx.token_ids))
    together = list(attention_probabilities(tiny_model, ctx.hidden_states, [2, 1], every_position))
    monkeypatch.setattr(attention_weights, "MAX_GROUP_PROBABILITIES", 1)
    one_by_one = list(attention_probabilities(tiny_model, ctx.hidden_states, [2, 1], every_position))

    assert len(together) == len(one_by_one) == 2
    for grouped, alone in zip(together, one_by_one, strict=True):
        torch.testing.assert_close(grouped, alone, rtol=0, atol=1e-15)


def test_probabilities_match_stock_eager_attention_to_its_float32_softmax(
    tiny_model: LoadedModel, make_context: MakeContext
) -> None:
    ctx = make_context(tiny_model)
    every_position = torch.arange(len(ctx.token_ids))
    expected_layers = eager_attentions(tiny_model, ctx.token_ids)
    our_layers = attention_probabilities(tiny_model, ctx.hidden_states, [1, 2], every_position)
    for ours, expected in zip(our_layers, expected_layers, strict=True):
        # Stock eager rounds the softmax through float32: 2**-24 relative, measured 3e-7 here.
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


# --- attention ---


@pytest.mark.parametrize(
    ("params", "reference"),
    [
        (AttentionParams(layer=-1, head=-1, aggregate="mean"), lambda stacked: stacked.mean(dim=(0, 1))),
        (AttentionParams(layer=-1, head=-1, aggregate="max"), lambda stacked: stacked.amax(dim=(0, 1))),
        (AttentionParams(layer=2, head=3, aggregate="mean"), lambda stacked: stacked[1, 3]),
        (AttentionParams(layer=1, head=-1, aggregate="max"), lambda stacked: stacked[0].amax(dim=0)),
        (AttentionParams(layer=-1, head=0, aggregate="mean"), lambda stacked: stacked[:, 0].mean(dim=0)),
    ],
    ids=["mean", "max", "layer2-head3", "layer1-max-heads", "head0-mean-layers"],
)
def test_attention_selects_and_aggregates_like_eager(
    tiny_model: LoadedModel,
    make_context: MakeContext,
    read_tensor: ReadTensor,
    exact_eager_attentions: list[torch.Tensor],
    params: AttentionParams,
    reference: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    ctx = make_context(tiny_model)
    predicting = ctx.targets.predicting_positions
    stacked = torch.stack(exact_eager_attentions)[:, :, predicting]  # [layers, heads, num_targets, num_tokens]

    attributions = read_tensor(Attention().attribute(ctx, params).attributions)

    expected = reference(stacked)[:, :-1].numpy()
    for row, position in enumerate(ctx.targets.positions.tolist()):
        expected[row, position:] = 0.0
    assert attributions.shape == (8, 13)
    np.testing.assert_allclose(attributions, expected, rtol=0, atol=1e-7)  # float32 on the wire


def test_one_head_rows_are_its_whole_softmax_including_the_predicting_position(
    tiny_model: LoadedModel, make_context: MakeContext, read_tensor: ReadTensor
) -> None:
    ctx = make_context(tiny_model)
    attributions = read_tensor(Attention().attribute(ctx, AttentionParams(2, 1, "mean")).attributions)

    # The predicting position target - 1 attends to itself and precedes the target: nothing is cut off.
    np.testing.assert_allclose(attributions.sum(axis=1), 1.0, rtol=0, atol=1e-6)
    for row, position in enumerate(ctx.targets.positions.tolist()):
        assert attributions[row, position - 1] > 0.0
        assert np.all(attributions[row, position:] == 0.0)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (AttentionParams(0, -1, "mean"), r"'layer' of method 'attention' must be -1 \(all\) or in 1..2 .*got 0"),
        (AttentionParams(3, -1, "mean"), r"'layer' .* in 1..2 for this model, got 3"),
        (AttentionParams(-1, 4, "mean"), r"'head' .* in 0..3 for this model, got 4"),
    ],
)
def test_attention_rejects_layers_and_heads_the_model_lacks(
    tiny_model: LoadedModel, make_context: MakeContext, params: AttentionParams, message: str
) -> None:
    with pytest.raises(InvalidParamsError, match=message):
        Attention().attribute(make_context(tiny_model), params)


def test_attention_params_and_capabilities() -> None:
    assert Attention().parse_params({}) == AttentionParams(layer=-1, head=-1, aggregate="mean")
    with pytest.raises(InvalidParamsError, match="must be one of mean, max"):
        Attention().parse_params({"aggregate": "min"})
    with pytest.raises(InvalidParamsError, match=r"'params.layer' of method 'attention' must be in -1..\s*; got -2"):
        Attention().parse_params({"layer": -2})
    for method in (Attention(), AttentionRollout()):
        info = method.info()
        assert info.attributes_tokens and info.uses_cache
        assert not info.needs_gradients and not info.supports_contrastive_targets


# --- attention rollout ---


def paper_rollout(attentions: list[np.ndarray], head_fusion: str, residual: bool) -> np.ndarray:
    """Abnar & Zuidema's recurrence, literally: rollout_0 = I, rollout_l = A_l @ rollout_{l-1}."""
    result = np.eye(attentions[0].shape[-1])
    for heads in attentions:
        layer = {"mean": heads.mean(axis=0), "max": heads.max(axis=0), "min": heads.min(axis=0)}[head_fusion]
        if residual:
            layer = 0.5 * layer + 0.5 * np.eye(len(layer))
        result = (layer / layer.sum(axis=-1, keepdims=True)) @ result
    return result


def test_rollout_of_a_hand_computed_two_token_case() -> None:
    first = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]], dtype=torch.float64)
    second = torch.tensor([[[1.0, 0.0], [0.2, 0.8]]], dtype=torch.float64)
    # With the identity: [[1, 0], [0.25, 0.75]] then [[1, 0], [0.1, 0.9]]; their product, by hand:
    expected = torch.tensor([[1.0, 0.0], [0.325, 0.675]], dtype=torch.float64)
    both_rows = torch.arange(2)
    torch.testing.assert_close(rollout([second, first], both_rows, "mean", True), expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(rollout([second, first], torch.tensor([1]), "mean", True), expected[1:])
    # Without it the rollout is the plain product A_2 A_1.
    torch.testing.assert_close(rollout([second, first], both_rows, "mean", False), second[0] @ first[0])


# Two layers of two heads over three tokens, written out by hand (causal, rows sum to 1).
HAND_ATTENTIONS = [
    np.array(
        [
            [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]],
            [[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.6, 0.2, 0.2]],
        ]
    ),
    np.array(
        [
            [[1.0, 0.0, 0.0], [0.3, 0.7, 0.0], [0.1, 0.1, 0.8]],
            [[1.0, 0.0, 0.0], [0.7, 0.3, 0.0], [0.5, 0.4, 0.1]],
        ]
    ),
]


@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("residual", [True, False])
def test_rollout_follows_the_paper_recurrence(head_fusion: str, residual: bool) -> None:
    last_layer_first = (torch.from_numpy(layer) for layer in reversed(HAND_ATTENTIONS))
    ours = rollout(last_layer_first, torch.arange(3), head_fusion, residual)
    expected = paper_rollout(HAND_ATTENTIONS, head_fusion, residual)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-15)
    np.testing.assert_allclose(expected.sum(axis=-1), 1.0, rtol=0, atol=1e-15)  # still a mixing of inputs


@pytest.mark.parametrize("params", [AttentionRolloutParams("mean", True), AttentionRolloutParams("max", False)])
def test_attention_rollout_matches_the_recurrence_over_eager_attentions(
    tiny_model: LoadedModel,
    make_context: MakeContext,
    read_tensor: ReadTensor,
    exact_eager_attentions: list[torch.Tensor],
    params: AttentionRolloutParams,
) -> None:
    ctx = make_context(tiny_model)
    full = paper_rollout([layer.numpy() for layer in exact_eager_attentions], params.head_fusion, params.residual)
    every_position = torch.arange(len(ctx.token_ids))
    ours = rollout(
        attention_probabilities(tiny_model, ctx.hidden_states, [2, 1], every_position),
        every_position,
        params.head_fusion,
        params.residual,
    )
    np.testing.assert_allclose(ours.numpy(), full, rtol=0, atol=1e-10)

    attributions = read_tensor(AttentionRollout().attribute(ctx, params).attributions)
    expected = full[ctx.targets.predicting_positions][:, :-1]
    for row, position in enumerate(ctx.targets.positions.tolist()):
        expected[row, position:] = 0.0
    assert attributions.shape == (8, 13)
    np.testing.assert_allclose(attributions, expected, rtol=0, atol=1e-7)  # float32 on the wire
    np.testing.assert_allclose(attributions.sum(axis=1), 1.0, rtol=0, atol=1e-6)
