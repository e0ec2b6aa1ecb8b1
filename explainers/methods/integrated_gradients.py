"""Integrated gradients: each preceding token's share of the change in a generated token's score along a straight
path from a baseline to the actual input embeddings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from sightline.v1 import types_pb2

from explainers import progress
from explainers.methods.base import (
    AttributionContext,
    AttributionMethod,
    CostModel,
    InvalidParamsError,
    ParamSpec,
    prefix_only,
    tensor_proto,
)
from explainers.methods.gradients import (
    MAX_GRAPH_ROWS,
    TARGET_BATCH_SIZE,
    gradient_times_state,
    score_gradients,
)
from explainers.model import LoadedModel, forward_from_layer, forward_with_hidden_states
from explainers.targets import Targets

# Captum's `method` names, with its definitions.
QUADRATURES = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle")


@dataclass(frozen=True)
class IntegratedGradientsParams:
    baseline: str
    baseline_token_id: int
    steps: int
    quadrature: str
    internal_batch_size: int
    target_batch_size: int


INTEGRATED_GRADIENTS_PARAMS = (
    ParamSpec(
        "baseline",
        str,
        "token",
        "The path's start: the states of a sequence repeating baseline_token_id, or all-zero states. From zero, "
        "RMSNorm models change their score abruptly within ~1e-3 of the start, which a few hundred steps do not "
        "resolve: check convergence_delta.",
        choices=("token", "zero"),
    ),
    ParamSpec(
        "baseline_token_id",
        int,
        0,
        "The token repeated in the 'token' baseline.",
        minimum=0,
        maximum_from="last_token_id",
    ),
    ParamSpec("steps", int, 16, "Points on the path where gradients are taken.", minimum=2, maximum=512),
    ParamSpec(
        "quadrature",
        str,
        "gausslegendre",
        "How the path integral is approximated, as Captum's `method`: Gauss-Legendre nodes, or a left, right, "
        "middle or trapezoid Riemann sum.",
        choices=QUADRATURES,
    ),
    ParamSpec(
        "internal_batch_size",
        int,
        16,
        "Path points run together in one recording forward pass (fewer on long sequences, to bound its memory); "
        "trades memory for speed and never changes the result.",
        minimum=1,
        maximum=512,
    ),
    TARGET_BATCH_SIZE,
)


def quadrature_rule(quadrature: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(points alpha in [0, 1], their weights), float64 [steps], as Captum's approximation_methods defines them."""
    if quadrature == "gausslegendre":
        nodes, node_weights = np.polynomial.legendre.leggauss(steps)  # on [-1, 1]
        return torch.from_numpy((nodes + 1) / 2), torch.from_numpy(node_weights / 2)
    index = torch.arange(steps, dtype=torch.float64)
    alphas = {
        "riemann_left": index / steps,
        "riemann_right": (index + 1) / steps,
        "riemann_middle": (index + 0.5) / steps,
        "riemann_trapezoid": index / (steps - 1),
    }[quadrature]
    weights = torch.full((steps,), 1 / steps, dtype=torch.float64)
    if quadrature == "riemann_trapezoid":
        # Captum halves the end weights of 1 / steps, not of 1 / (steps - 1): they sum to 1 - 1 / steps. Kept, so
        # that results match Captum's; the error still shrinks like 1 / steps.
        weights[[0, -1]] /= 2
    return alphas, weights


def integrated_gradients(
    method: str,
    loaded: LoadedModel,
    inputs: torch.Tensor,
    baselines: torch.Tensor,
    layer: int,
    targets: Targets,
    params: IntegratedGradientsParams,
) -> types_pb2.MethodResult:
    """Integrated gradients of targets.score with respect to the residual stream at `layer`, from baselines to inputs
    (both [1, num_tokens, hidden]):

        attribution[i, j] = sum_h (inputs - baselines)[j, h] * sum_s weight_s * d score_i / d state[j, h]

    at state = baselines + alpha_s * (inputs - baselines). Every position is interpolated, as Captum does; causality
    leaves the ones at and after a target without gradient. Extras: convergence_delta [num_targets], the
    completeness error sum_j attribution[i, j] - (score_i(inputs) - score_i(baselines)).
    """
    alphas, weights = (values.to(inputs.dtype) for values in quadrature_rule(params.quadrature, params.steps))
    difference = inputs - baselines
    num_tokens = inputs.shape[1]
    # A forward pass keeps every layer's activations of all its path points for the backward pass.
    points_per_pass = max(1, min(params.internal_batch_size, MAX_GRAPH_ROWS // num_tokens))
    attributions = inputs.new_zeros(len(targets), num_tokens)
    with progress.steps(len(range(0, params.steps, points_per_pass))):
        for start in range(0, params.steps, points_per_pass):
            stop = start + points_per_pass
            # This pass's points on the path: [points, num_tokens, hidden].
            path = baselines + alphas[start:stop, None, None] * difference
            for chunk, gradients in score_gradients(
                loaded, path, layer, targets, params.target_batch_size, point_weights=weights[start:stop]
            ):
                # gradients [chunk, points, prefix, hidden] are weighted: summing over the points integrates.
                prefix = gradients.shape[2]
                attributions[chunk, :prefix] += gradient_times_state(gradients.sum(dim=1), difference[0, :prefix])
            progress.step()

    with torch.no_grad():
        input_scores, baseline_scores = forward_from_layer(loaded, torch.cat([inputs, baselines]), layer, targets)
    # Summed over every position, before prefix_only, so the delta is exactly completeness' error.
    convergence_delta = attributions.sum(dim=-1) - (input_scores - baseline_scores)
    return types_pb2.MethodResult(
        method=method,
        attributions=tensor_proto(prefix_only(attributions, targets)),
        extras={"convergence_delta": tensor_proto(convergence_delta)},
    )


class BaselineChoice(Protocol):
    """The parameters that choose a path's start: integrated gradients' and every method that starts where it does."""

    @property
    def baseline(self) -> str: ...

    @property
    def baseline_token_id(self) -> int: ...


def baseline_states(ctx: AttributionContext, params: BaselineChoice, layer: int, method: str) -> torch.Tensor:
    """The path's start [1, num_tokens, hidden] at `layer`: zeros, or the residual stream there of a sequence that
    repeats baseline_token_id, from one extra forward pass (as Captum's LayerIntegratedGradients derives a layer's
    baseline from baseline inputs).
    """
    if params.baseline == "zero":
        return torch.zeros(1, len(ctx.token_ids), ctx.loaded.hidden_size, dtype=ctx.loaded.dtype)
    if params.baseline_token_id >= ctx.loaded.vocab_size:
        raise InvalidParamsError(
            f"parameter 'baseline_token_id' of method {method!r} must be below the vocabulary size "
            f"{ctx.loaded.vocab_size}, got {params.baseline_token_id}"
        )
    baseline_ids = torch.full_like(ctx.token_ids, params.baseline_token_id)
    return forward_with_hidden_states(ctx.loaded, baseline_ids).hidden_states[layer][None]


class IntegratedGradients(AttributionMethod[IntegratedGradientsParams]):
    """Integrated gradients to the input embeddings. Per internal_batch_size path points, one recording forward
    pass and a backward pass per target over its prefix (see score_gradients).
    """

    name = "integrated_gradients"
    description = (
        "Signed integrated gradients to the input embeddings: for each generated token, the change in its score "
        "from the baseline to the actual input, shared among the preceding tokens by integrating the gradient "
        "along the straight path between them. Extras: convergence_delta [num_targets], the sum of a token's "
        "attributions minus its score difference (0 for an exact integral)."
    )
    params = INTEGRATED_GRADIENTS_PARAMS
    params_type = IntegratedGradientsParams
    needs_gradients = True
    uses_cache = False
    attributes_tokens = True
    cost = CostModel(passes=1, per_target=2, scaled_by="steps")
    supports_contrastive_targets = True

    def attribute(self, ctx: AttributionContext, params: IntegratedGradientsParams) -> types_pb2.MethodResult:
        baselines = baseline_states(ctx, params, 0, self.name)
        embeddings = ctx.loaded.embed(ctx.token_ids)
        return integrated_gradients(self.name, ctx.loaded, embeddings, baselines, 0, ctx.targets, params)
