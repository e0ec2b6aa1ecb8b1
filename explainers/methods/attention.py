"""Raw attention: how strongly the position predicting each generated token attends to every earlier token."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sightline.v1 import types_pb2

from explainers.methods.attention_weights import attention_probabilities, fuse
from explainers.methods.base import (
    AttributionContext,
    AttributionMethod,
    CostModel,
    InvalidParamsError,
    ParamSpec,
    prefix_only,
    tensor_proto,
)

ALL = -1


@dataclass(frozen=True)
class AttentionParams:
    layer: int
    head: int
    aggregate: str


class Attention(AttributionMethod[AttentionParams]):
    """attribution[i, j] = attention probability from position target_i - 1 to position j, for one layer and head
    or aggregated over them.

    Target i is predicted at position target_i - 1, whose query row is what attends to the sources; that position
    attends to itself too, and it precedes the target, so it is a source like any other. Recomputed from the cached
    hidden states for the predicting rows only (no forward pass, no gradients).
    """

    name = "attention"
    description = (
        "Attention probabilities from the position that predicts each generated token to every earlier token, "
        "recomputed from the cached hidden states. Not an explanation of the output by itself: attention says "
        "where information was read from, not whether it mattered."
    )
    params = (
        ParamSpec(
            "layer",
            int,
            ALL,
            "Decoder layer, 1..num_layers (1 is closest to the input); -1 aggregates all layers.",
            minimum=ALL,
            maximum_from="num_layers",
        ),
        ParamSpec(
            "head",
            int,
            ALL,
            "Attention head, 0..num_heads - 1; -1 aggregates all heads.",
            minimum=ALL,
            maximum_from="last_head",
        ),
        ParamSpec(
            "aggregate",
            str,
            "mean",
            "How layers and heads are combined where layer or head is -1.",
            choices=("mean", "max"),
        ),
    )
    params_type = AttentionParams
    needs_gradients = False
    uses_cache = True
    attributes_tokens = True
    cost = CostModel(passes=0.1)

    def attribute(self, ctx: AttributionContext, params: AttentionParams) -> types_pb2.MethodResult:
        num_heads = int(ctx.loaded.model.config.num_attention_heads)
        # The bounds depend on the model, which ParamSpec cannot know.
        _check_index(self.name, "layer", params.layer, 1, ctx.loaded.num_layers)
        _check_index(self.name, "head", params.head, 0, num_heads - 1)
        layers = range(1, ctx.loaded.num_layers + 1) if params.layer == ALL else [params.layer]

        per_layer = []  # [num_targets, num_tokens] each
        predicting = ctx.targets.predicting_positions
        for probabilities in attention_probabilities(ctx.loaded, ctx.hidden_states, layers, predicting):
            # probabilities: [heads, num_targets, num_tokens]
            per_layer.append(
                fuse(probabilities, params.aggregate) if params.head == ALL else probabilities[params.head]
            )
        scores = fuse(torch.stack(per_layer), params.aggregate)
        return types_pb2.MethodResult(method=self.name, attributions=tensor_proto(prefix_only(scores, ctx.targets)))


def _check_index(method: str, name: str, value: int, first: int, last: int) -> None:
    if value != ALL and not first <= value <= last:
        raise InvalidParamsError(
            f"parameter {name!r} of method {method!r} must be -1 (all) or in {first}..{last} for this model, "
            f"got {value}"
        )
