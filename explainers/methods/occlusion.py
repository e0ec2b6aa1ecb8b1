"""Occlusion: how much each generated token's score drops when a preceding token, or the span holding it, is
replaced."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from explainers.methods.base import AttributionContext, CostModel, ParamSpec
from explainers.methods.perturbation import (
    PERTURBATION_PARAMS,
    PerturbationMethod,
    PerturbationParams,
    num_sources,
    replaced_scores,
    replacement_token_id,
)


@dataclass(frozen=True)
class OcclusionParams(PerturbationParams):
    window: int


class Occlusion(PerturbationMethod[OcclusionParams]):
    """attribution[i, j] = score_i(x) - score_i(x with the window holding token j replaced), exact.

    Windows are the non-overlapping spans [0, w), [w, 2w), ... and every token in a window gets the window's score
    change, as Captum's FeatureAblation with a feature mask. One forward pass per window scores every target.
    """

    name = "occlusion"
    description = (
        "Occlusion (leave-one-out): for each generated token, the drop in its score when a preceding token, or the "
        "window of `window` tokens holding it, is replaced by the replacement token."
    )
    params = (
        ParamSpec(
            "window",
            int,
            1,
            "Tokens replaced together: 1 leaves out one token at a time; w replaces the non-overlapping spans "
            "[0, w), [w, 2w), ... and gives every token its span's score change.",
            minimum=1,
            maximum=64,
        ),
        *PERTURBATION_PARAMS,
    )
    params_type = OcclusionParams
    # One pass per window plus the unperturbed one, each over at most the whole sequence; exact for window 1.
    cost = CostModel(passes=1, per_token=1)

    def source_attributions(self, ctx: AttributionContext, params: OcclusionParams) -> torch.Tensor:
        window_of_source = torch.arange(num_sources(ctx.targets)) // params.window
        windows = torch.arange(int(window_of_source[-1]) + 1)
        occluded = window_of_source[None, :] == windows[:, None]  # [num_windows, num_sources]
        unperturbed = torch.zeros_like(occluded[:1])
        scores = replaced_scores(
            ctx, torch.cat([unperturbed, occluded]), replacement_token_id(ctx.loaded, params), params.batch_size
        )
        score_drops = scores[:1] - scores[1:]  # [num_windows, num_targets]
        return score_drops[window_of_source].T
