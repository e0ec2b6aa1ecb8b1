"""Gradient SHAP (Lundberg and Lee 2017, as Captum's GradientShap): expected gradients from random points between a
baseline and a noisy copy of the input, times their difference, averaged."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sightline.v1 import types_pb2

from explainers import progress
from explainers.methods.base import (
    AttributionContext,
    AttributionMethod,
    CostModel,
    ParamSpec,
    prefix_only,
    tensor_proto,
)
from explainers.methods.gradients import MAX_GRAPH_ROWS, TARGET_BATCH_SIZE, score_gradients
from explainers.methods.integrated_gradients import INTEGRATED_GRADIENTS_PARAMS, baseline_states
from explainers.model import LoadedModel, forward_from_layer
from explainers.targets import Targets


@dataclass(frozen=True)
class GradientShapParams:
    baseline: str
    baseline_token_id: int
    samples: int
    stdev: float
    seed: int
    internal_batch_size: int
    target_batch_size: int


# The baseline and its token as integrated gradients takes them, so that both methods start from the same state.
_BASELINE, _BASELINE_TOKEN = (spec for spec in INTEGRATED_GRADIENTS_PARAMS if spec.name.startswith("baseline"))

GRADIENT_SHAP_PARAMS = (
    _BASELINE,
    _BASELINE_TOKEN,
    ParamSpec("samples", int, 16, "Random points at which gradients are taken (Captum's n_samples).", 1, 512),
    ParamSpec(
        "stdev",
        float,
        0.0,
        "Standard deviation of the Gaussian noise added to the input embeddings at each sample (Captum's stdevs); "
        "0 gives expected gradients on the straight path.",
        minimum=0.0,
        maximum=1e3,
    ),
    ParamSpec(
        "seed",
        int,
        0,
        "Seeds the samples' noise (torch) and positions on the path (NumPy) as Captum draws them after "
        "torch.manual_seed(seed) and np.random.seed(seed): the same seed gives the same attributions.",
        minimum=0,
        maximum=2**31 - 1,
    ),
    ParamSpec(
        "internal_batch_size",
        int,
        16,
        "Samples run together in one recording forward pass (fewer on long sequences, to bound its memory); trades "
        "memory for speed and never changes the result.",
        minimum=1,
        maximum=512,
    ),
    TARGET_BATCH_SIZE,
)


@dataclass(frozen=True)
class Samples:
    """The random points: noisy inputs [samples, num_tokens, hidden] and their places on the path [samples]."""

    noisy_inputs: torch.Tensor
    alphas: torch.Tensor

    @classmethod
    def draw(cls, inputs: torch.Tensor, params: GradientShapParams) -> Samples:
        """Captum's draws, in its order: the noise from torch's generator (one normal tensor over every sample),
        then each sample's place on the path from NumPy's legacy generator. (Captum's draw of a baseline index
        consumes nothing from a distribution of one baseline.)"""
        generator = torch.Generator().manual_seed(params.seed)
        shape = (params.samples, *inputs.shape[1:])
        noise = torch.normal(0, torch.tensor(params.stdev).repeat(shape), generator=generator)
        alphas = np.random.RandomState(params.seed).uniform(0.0, 1.0, params.samples)
        return cls(inputs + noise.to(inputs.dtype), torch.tensor(alphas, dtype=inputs.dtype))


def gradient_shap(
    method: str,
    loaded: LoadedModel,
    inputs: torch.Tensor,
    baselines: torch.Tensor,
    targets: Targets,
    params: GradientShapParams,
) -> types_pb2.MethodResult:
    """Gradient SHAP of targets.score with respect to the input embeddings inputs [1, num_tokens, hidden], from
    baselines of the same shape:

        attribution[i, j] = 1 / S * sum_s sum_h (x_s - b)[j, h] * d score_i / d state[j, h] at b + alpha_s (x_s - b)

    with x_s the input plus noise. Extras: convergence_delta [num_targets], sum_j attribution[i, j] - (score_i(inputs)
    - score_i(baselines)): Gradient SHAP is complete only in expectation (and exactly as samples grow without noise,
    where it becomes integrated gradients by Monte Carlo), so this says how far these samples are from it.
    """
    samples = Samples.draw(inputs, params)
    differences = samples.noisy_inputs - baselines  # [samples, num_tokens, hidden]
    num_tokens = inputs.shape[1]
    per_pass = max(1, min(params.internal_batch_size, MAX_GRAPH_ROWS // num_tokens))
    weights = torch.full((params.samples,), 1 / params.samples, dtype=inputs.dtype)
    attributions = inputs.new_zeros(len(targets), num_tokens)
    with progress.steps(len(range(0, params.samples, per_pass))):
        for start in range(0, params.samples, per_pass):
            stop = start + per_pass
            # Captum's point: alpha * x + (1 - alpha) * b.
            alphas = samples.alphas[start:stop, None, None]
            points = alphas * samples.noisy_inputs[start:stop] + (1 - alphas) * baselines
            for chunk, gradients in score_gradients(
                loaded, points, 0, targets, params.target_batch_size, point_weights=weights[start:stop]
            ):
                # gradients [chunk, points, prefix, hidden] are weighted by 1 / samples: summing over them averages.
                prefix = gradients.shape[2]
                attributions[chunk, :prefix] += (gradients * differences[None, start:stop, :prefix]).sum(dim=(1, 3))
            progress.step()

    with torch.no_grad():
        input_scores, baseline_scores = forward_from_layer(loaded, torch.cat([inputs, baselines]), 0, targets)
    convergence_delta = attributions.sum(dim=-1) - (input_scores - baseline_scores)
    return types_pb2.MethodResult(
        method=method,
        attributions=tensor_proto(prefix_only(attributions, targets)),
        extras={"convergence_delta": tensor_proto(convergence_delta)},
    )


class GradientShap(AttributionMethod[GradientShapParams]):
    """Gradient SHAP to the input embeddings: per internal_batch_size samples, one recording forward pass and a
    backward pass per target over its prefix (see score_gradients), as integrated gradients takes per path point."""

    name = "gradient_shap"
    description = (
        "Signed Gradient SHAP (expected gradients) to the input embeddings, as Captum's GradientShap: for each "
        "generated token, the gradient of its score at random points between the baseline and the input (plus "
        "optional Gaussian noise), times input minus baseline, averaged over the samples and summed over the hidden "
        "dimension. Seeded, so repeatable. Extras: convergence_delta [num_targets], the sum of a token's "
        "attributions minus its score difference (0 only in expectation)."
    )
    params = GRADIENT_SHAP_PARAMS
    params_type = GradientShapParams
    needs_gradients = True
    uses_cache = False
    attributes_tokens = True
    cost = CostModel(passes=1, per_target=2, scaled_by="samples")
    supports_contrastive_targets = True

    def attribute(self, ctx: AttributionContext, params: GradientShapParams) -> types_pb2.MethodResult:
        baselines = baseline_states(ctx, params, 0, self.name)
        embeddings = ctx.loaded.embed(ctx.token_ids)
        return gradient_shap(self.name, ctx.loaded, embeddings, baselines, ctx.targets, params)
