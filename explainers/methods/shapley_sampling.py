"""Shapley value sampling: each preceding token's average marginal contribution to each generated token's score
over random orders in which the tokens are put back."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from explainers import progress
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
class ShapleySamplingParams(PerturbationParams):
    samples: int
    seed: int


class ShapleySampling(PerturbationMethod[ShapleySamplingParams]):
    """Permutation sampling of Shapley values, as Captum's ShapleyValueSampling.

    The players are the tokens before the last target; the baseline has all of them replaced. Each sampled
    permutation puts the players back one at a time, and a player's marginal contribution is the score change
    its return causes. One forward pass per intermediate sequence scores every target, and a player at or after
    a target's position contributes 0 to it by causality. A permutation's contributions telescope, so for every
    target they sum to score(x) - score(baseline) exactly (efficiency), whatever the number of samples.
    """

    name = "shapley_sampling"
    description = (
        "Shapley value sampling: for each generated token, every preceding token's marginal contribution to its "
        "score, averaged over `samples` random orders of putting the tokens back into a sequence where all of them "
        "are replaced. Sums to score(sequence) - score(all replaced) per generated token."
    )
    params = (
        ParamSpec(
            "samples",
            int,
            25,
            "Random permutations averaged; each costs about one forward pass per token before the last explained one.",
            minimum=1,
            maximum=1000,
        ),
        ParamSpec("seed", int, 0, "Seed of the permutations; the same seed gives the same result.", 0, 2**31 - 1),
        *PERTURBATION_PARAMS,
    )
    params_type = ShapleySamplingParams
    # Per permutation one pass per player but the last, plus the two shared ones: at most samples * num_tokens.
    cost = CostModel(per_token=1, scaled_by="samples")

    def source_attributions(self, ctx: AttributionContext, params: ShapleySamplingParams) -> torch.Tensor:
        num_players = num_sources(ctx.targets)
        replacement_id = replacement_token_id(ctx.loaded, params)
        generator = torch.Generator().manual_seed(params.seed)
        orders = torch.stack([torch.randperm(num_players, generator=generator) for _ in range(params.samples)])
        join_steps = orders.argsort(dim=1)  # [samples, num_players]: the step at which each player is put back

        # Every permutation starts with all players replaced and ends with none: two states scored once.
        all_replaced = torch.ones(1, num_players, dtype=torch.bool)
        end_scores = replaced_scores(ctx, torch.cat([all_replaced, ~all_replaced]), replacement_id, params.batch_size)
        if num_players == 1:
            # No intermediate states: in every permutation the one player brings the whole change.
            return (end_scores[1:] - end_scores[:1]).T
        # Enough permutations at a time for their intermediate states to fill a batch, and no more: all states at
        # once would take samples * num_players**2 bytes of masks, gigabytes on a long sequence.
        chunk = max(1, params.batch_size // (num_players - 1))
        total = torch.zeros(num_players, len(ctx.targets), dtype=end_scores.dtype)
        with progress.steps(len(range(0, params.samples, chunk))):
            for start in range(0, params.samples, chunk):
                total += _summed_contributions(
                    ctx, join_steps[start : start + chunk], end_scores, replacement_id, params.batch_size
                )
                progress.step()
        return (total / params.samples).T


def _summed_contributions(
    ctx: AttributionContext, join_steps: torch.Tensor, end_scores: torch.Tensor, replacement_id: int, batch_size: int
) -> torch.Tensor:
    """Each player's marginal contributions [num_players, num_targets], summed over the permutations given by
    join_steps [num_permutations, num_players]; end_scores [2, num_targets] are the all- and none-replaced scores."""
    num_permutations, num_players = join_steps.shape
    # After step k (1 <= k < num_players) the players with join_step >= k are still replaced.
    steps = torch.arange(1, num_players)
    still_replaced = join_steps[:, None, :] >= steps[None, :, None]  # [num_permutations, num_players - 1, players]
    intermediate_scores = replaced_scores(ctx, still_replaced.flatten(end_dim=1), replacement_id, batch_size)
    state_scores = torch.cat(  # [num_permutations, num_players + 1, num_targets]: after 0 .. num_players steps
        [
            end_scores[:1].expand(num_permutations, 1, -1),
            intermediate_scores.view(num_permutations, num_players - 1, end_scores.shape[1]),
            end_scores[1:].expand(num_permutations, 1, -1),
        ],
        dim=1,
    )
    step_gains = state_scores.diff(dim=1)  # [num_permutations, num_players, num_targets]: of the player put back
    return step_gains.gather(1, join_steps[:, :, None].expand_as(step_gains)).sum(dim=0)
