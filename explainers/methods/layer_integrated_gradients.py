"""Layer integrated gradients: integrated gradients to one layer's residual stream, from the cached hidden states
upward."""

from __future__ import annotations

from dataclasses import dataclass

from sightline.v1 import types_pb2

from explainers.methods.base import AttributionContext, AttributionMethod, CostModel
from explainers.methods.gradients import LAYER, cached_layer_states
from explainers.methods.integrated_gradients import (
    INTEGRATED_GRADIENTS_PARAMS,
    IntegratedGradientsParams,
    baseline_states,
    integrated_gradients,
)


@dataclass(frozen=True)
class LayerIntegratedGradientsParams(IntegratedGradientsParams):
    layer: int


class LayerIntegratedGradients(AttributionMethod[LayerIntegratedGradientsParams]):
    """Integrated gradients to the cached residual stream at `layer`, as Captum's LayerIntegratedGradients computes
    them at that layer's output. The path points run from the cached layer upward, so the layers below it are not
    rerun for them; layer 0 is integrated_gradients.
    """

    name = "layer_integrated_gradients"
    description = (
        "Signed integrated gradients to one layer's residual stream: for each generated token, the change in its "
        "score from the baseline's state at that layer to the actual one, shared among the preceding tokens' states "
        "by integrating the gradient along the straight path between them. Extras: convergence_delta "
        "[num_targets], the sum of a token's attributions minus its score difference (0 for an exact integral)."
    )
    params = (LAYER, *INTEGRATED_GRADIENTS_PARAMS)
    params_type = LayerIntegratedGradientsParams
    needs_gradients = True
    uses_cache = True
    attributes_tokens = True
    cost = CostModel(passes=1, per_target=2, scaled_by="steps")
    supports_contrastive_targets = True

    def attribute(self, ctx: AttributionContext, params: LayerIntegratedGradientsParams) -> types_pb2.MethodResult:
        states = cached_layer_states(ctx, params.layer, self.name)
        baselines = baseline_states(ctx, params, params.layer, self.name)
        return integrated_gradients(self.name, ctx.loaded, states, baselines, params.layer, ctx.targets, params)
