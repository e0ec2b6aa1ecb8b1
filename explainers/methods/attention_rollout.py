"""Attention rollout (Abnar & Zuidema, 2020): attention propagated through the layers, residual path included."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from sightline.v1 import types_pb2

from explainers.methods.attention_weights import FUSIONS, attention_probabilities, fuse
from explainers.methods.base import (
    AttributionContext,
    AttributionMethod,
    CostModel,
    ParamSpec,
    prefix_only,
    tensor_proto,
)


@dataclass(frozen=True)
class AttentionRolloutParams:
    head_fusion: str
    residual: bool


def rollout(
    layer_attentions: Iterable[torch.Tensor], rows: torch.Tensor, head_fusion: str, residual: bool
) -> torch.Tensor:
    """Rows [num_rows, num_tokens] of the rollout A_L @ ... @ A_1, from each layer's attention [heads, num_tokens,
    num_tokens] given LAST layer first. A_l is the layer's heads fused, averaged with the identity (0.5 A + 0.5 I)
    when residual, rows renormalised to sum to 1.

    Multiplying from the top down, rows of A_L first, keeps the running product at [num_rows, num_tokens] and costs
    num_rows * num_tokens**2 per layer instead of num_tokens**3; one layer's attention is held at a time.
    """
    flow: torch.Tensor | None = None
    for attention in layer_attentions:
        fused = fuse(attention, head_fusion)  # a new tensor: the steps below work in place
        if residual:
            # The residual connection carries each token's own state past the attention, half-and-half per the paper.
            fused.mul_(0.5).diagonal().add_(0.5)
        # Max and min fusion do not keep rows stochastic; renormalising keeps the product a mixing of inputs.
        fused.div_(fused.sum(dim=-1, keepdim=True))
        flow = fused[rows] if flow is None else flow @ fused
    if flow is None:
        raise ValueError("attention rollout needs at least one layer")
    return flow


class AttentionRollout(AttributionMethod[AttentionRolloutParams]):
    """attribution[i, j] = row target_i - 1 of the attention rollout: how much of position j's input flows into the
    state that predicts target i, if every layer mixed tokens only through its (head-fused) attention.

    Needs every query row of every layer below the last, so each layer's [heads, num_tokens, num_tokens]
    probabilities are recomputed from the cached hidden states, fused and folded into the running product one layer
    at a time, from the last layer down.
    """

    name = "attention_rollout"
    description = (
        "Attention rollout (Abnar & Zuidema 2020): per layer, head-fused attention averaged with the identity for "
        "the residual path, multiplied through all layers; the rows of the positions predicting each generated "
        "token. Recomputed from the cached hidden states, no gradients."
    )
    params = (
        ParamSpec("head_fusion", str, "mean", "How each layer's heads are combined.", choices=FUSIONS),
        ParamSpec(
            "residual", bool, True, "Add the identity for the residual connection (0.5 A + 0.5 I), as the paper does."
        ),
    )
    params_type = AttentionRolloutParams
    needs_gradients = False
    uses_cache = True
    attributes_tokens = True
    cost = CostModel(passes=0.5)

    def attribute(self, ctx: AttributionContext, params: AttentionRolloutParams) -> types_pb2.MethodResult:
        every_position = torch.arange(len(ctx.token_ids))
        last_layer_first = attention_probabilities(
            ctx.loaded, ctx.hidden_states, range(ctx.loaded.num_layers, 0, -1), every_position
        )
        predicting = ctx.targets.predicting_positions
        scores = rollout(last_layer_first, predicting, params.head_fusion, params.residual)  # [num_targets, num_tokens]
        return types_pb2.MethodResult(method=self.name, attributions=tensor_proto(prefix_only(scores, ctx.targets)))
