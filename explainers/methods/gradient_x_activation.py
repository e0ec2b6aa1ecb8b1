"""Gradient x activation: input x gradient at any layer's residual stream, from the cached hidden states upward."""

from __future__ import annotations

from dataclasses import dataclass

from sightline.v1 import types_pb2

from explainers.methods.base import GRADIENT_COST, AttributionContext, AttributionMethod, prefix_only, tensor_proto
from explainers.methods.gradients import (
    LAYER,
    TARGET_BATCH_SIZE,
    cached_layer_states,
    gradient_times_state,
    reduced_gradients,
)


@dataclass(frozen=True)
class GradientXActivationParams:
    layer: int
    target_batch_size: int


class GradientXActivation(AttributionMethod[GradientXActivationParams]):
    """attribution[i, j] = sum_h state[j, h] * d score_i / d state[j, h], signed, where state is the residual
    stream at `layer`; layer 0 is input x gradient on the cached embeddings.

    The forward pass starts from the cached states, so the layers below `layer` are not rerun. At the last layer
    the result is ~0: the final RMSNorm makes each score blind to the scale of its state, and state . gradient is
    exactly the derivative along that scale.
    """

    name = "gradient_x_activation"
    description = (
        "Signed gradient x activation at one layer's residual stream: for each generated token, the gradient of its "
        "score with respect to every preceding token's hidden state at that layer, times that state, summed over "
        "the hidden dimension. Layer 0 (the embedding output) is input x gradient; at the last layer it is ~0, as the "
        "final norm makes each score blind to the scale of its state."
    )
    params = (LAYER, TARGET_BATCH_SIZE)
    params_type = GradientXActivationParams
    needs_gradients = True
    uses_cache = True
    attributes_tokens = True
    cost = GRADIENT_COST
    supports_contrastive_targets = True

    def attribute(self, ctx: AttributionContext, params: GradientXActivationParams) -> types_pb2.MethodResult:
        states = cached_layer_states(ctx, params.layer, self.name)  # [1, num_tokens, hidden]
        products = reduced_gradients(
            ctx.loaded, states, params.layer, ctx.targets, params.target_batch_size, gradient_times_state
        )
        return types_pb2.MethodResult(method=self.name, attributions=tensor_proto(prefix_only(products, ctx.targets)))
