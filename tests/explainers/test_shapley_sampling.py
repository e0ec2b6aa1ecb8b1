"""Shapley sampling's coalition scorer (prefix caches of neighbouring coalitions, batched waves, duplicates scored
once) against scoring every coalition of every permutation from scratch, and its plan and published cost."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch

from explainers.methods import shapley_sampling
from explainers.methods.base import AttributionContext
from explainers.methods.perturbation import num_sources
from explainers.methods.shapley_sampling import (
    ShapleySampling,
    ShapleySamplingParams,
    coalition_waves,
    pass_batches,
    place_coalitions,
)
from explainers.model import LoadedModel
from explainers.targets import Targets, TargetScore, token_scores

MakeContext = Callable[[LoadedModel], AttributionContext]
REPLACEMENT_ID = 0  # the word tokenizer's unk, absent from the fixed sequence


def shapley(**params: object) -> ShapleySamplingParams:
    return ShapleySampling().parse_params({"replacement": "unk", **params})


def from_scratch(ctx: AttributionContext, params: ShapleySamplingParams) -> torch.Tensor:
    """The straightforward computation: every state of every permutation (the same torch.randperm draws) scored by
    a whole forward pass of the full model, one sequence at a time, contributions summed in permutation order."""
    num_players = num_sources(ctx.targets)
    generator = torch.Generator().manual_seed(params.seed)
    total = torch.zeros(len(ctx.targets), len(ctx.token_ids) - 1, dtype=torch.float64)

    def score(back: set[int]) -> torch.Tensor:
        sequence = ctx.token_ids.clone()
        sequence[[j for j in range(num_players) if j not in back]] = REPLACEMENT_ID
        with torch.no_grad():
            return token_scores(ctx.loaded, sequence[None], ctx.targets)[0]

    for _ in range(params.samples):
        back: set[int] = set()
        before = score(back)
        for player in torch.randperm(num_players, generator=generator).tolist():
            back.add(player)
            after = score(back)
            total[:, player] += after - before
            before = after
    total /= params.samples
    # Causality zeroes a player's contribution to targets at or before it; the method writes exact zeros there.
    positions = ctx.targets.positions[:, None]
    return torch.where(torch.arange(total.shape[1])[None, :] < positions, total, 0.0)


def with_targets(
    ctx: AttributionContext, positions: list[int], foil_ids: list[int] | None = None
) -> AttributionContext:
    chosen = torch.tensor(positions)
    foils = None if foil_ids is None else torch.tensor(foil_ids)
    return dataclasses.replace(ctx, targets=Targets(chosen, ctx.token_ids[chosen], foils, ctx.targets.score))


@pytest.mark.parametrize(
    ("positions", "foil_ids", "score", "params"),
    [
        (list(range(6, 14)), None, TargetScore.LOGPROB, {"samples": 9, "seed": 11}),
        (list(range(6, 14)), None, TargetScore.LOGPROB, {"samples": 6, "seed": 2, "batch_size": 1}),
        ([7, 9, 13], [5, 11, 40], TargetScore.LOGPROB, {"samples": 7, "seed": 5, "batch_size": 3}),
        ([10, 12], None, TargetScore.PROBABILITY, {"samples": 5, "seed": 1, "batch_size": 64}),
    ],
    ids=["all_targets", "one_per_pass", "contrastive_subset", "probability"],
)
def test_the_fast_scorer_equals_scoring_every_coalition_from_scratch(
    tiny_model: LoadedModel,
    make_context: MakeContext,
    positions: list[int],
    foil_ids: list[int] | None,
    score: TargetScore,
    params: dict[str, Any],
) -> None:
    ctx = with_targets(make_context(tiny_model), positions, foil_ids)
    ctx = dataclasses.replace(ctx, targets=dataclasses.replace(ctx.targets, score=score))
    method_params = shapley(**params)
    ours = ShapleySampling().attributions(ctx, method_params)
    expected = from_scratch(ctx, method_params)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)
    assert expected.abs().max() > 0.05


@pytest.mark.parametrize(
    ("kept_bytes", "block", "reuses_keys"),
    [(1, 8, True), (10**9, 2, True), (10**9, 1, True), (10**9, 8, False)],
    ids=["one_permutation_and_chain_under_a_tiny_budget", "blocks_of_2", "chain", "no_key_reuse"],
)
def test_memory_bounds_block_sizes_and_window_models_never_change_the_result(
    tiny_model: LoadedModel,
    make_context: MakeContext,
    monkeypatch: pytest.MonkeyPatch,
    kept_bytes: int,
    block: int,
    reuses_keys: bool,
) -> None:
    """A budget too small for one state still scores (block 1: each state from the one before; one permutation
    per group); without reusable keys (a sliding window shorter than the sequence) every pass runs whole."""
    ctx = make_context(tiny_model)
    params = shapley(samples=5, seed=9, batch_size=4)
    expected = from_scratch(ctx, params)
    monkeypatch.setattr(shapley_sampling, "KEPT_CACHE_BYTES", kept_bytes)
    monkeypatch.setattr(shapley_sampling, "BLOCK_STEPS", block)
    monkeypatch.setattr(shapley_sampling, "reuses_prefix_keys", lambda loaded, num_tokens: reuses_keys)
    starts: list[int] = []

    def record_start(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        past = kwargs.get("past_key_values")
        starts.append(0 if past is None else past.get_seq_length())

    hook = tiny_model.model.base_model.register_forward_hook(record_start, with_kwargs=True)
    try:
        ours = ShapleySampling().attributions(ctx, params)
    finally:
        hook.remove()
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)
    assert (max(starts) > 0) == reuses_keys


def test_identical_coalitions_are_scored_once(tiny_model: LoadedModel, make_context: MakeContext) -> None:
    # Target at position 3: 3 players, 6 orders, so 40 permutations repeat states many times.
    ctx = with_targets(make_context(tiny_model), [3])
    params = shapley(samples=40, seed=4)
    rows: list[int] = []

    def count(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        rows.append(len(kwargs["input_ids"]))

    hook = tiny_model.model.base_model.register_forward_hook(count, with_kwargs=True)
    try:
        ours = ShapleySampling().attributions(ctx, params)
    finally:
        hook.remove()
    torch.testing.assert_close(ours, from_scratch(ctx, params), rtol=0, atol=1e-12)
    # 3 players have 6 intermediate coalitions (3 of one player back, 3 of two); the state after 2 steps is in
    # every permutation a neighbour others start from, so those are scored anew per permutation: 40 + 3 at most.
    # Plus the shared all-replaced and unperturbed sequences.
    assert sum(rows) - 2 <= 40 + 3 < 2 * 40


@pytest.mark.parametrize(("num_players", "block"), [(2, 8), (13, 8), (44, 8), (44, 16), (9, 1), (17, 4)])
def test_every_state_is_scored_once_after_the_neighbours_it_starts_from(num_players: int, block: int) -> None:
    waves = coalition_waves(num_players, block)
    scored = {0, num_players}
    for wave in waves:
        for step, neighbours in wave:
            assert step not in scored and set(neighbours) <= scored
        scored |= {step for step, _ in wave}
    assert scored == set(range(num_players + 1))


def test_a_coalition_starts_where_it_first_differs_from_its_parent() -> None:
    generator = torch.Generator().manual_seed(3)
    num_players = 23
    orders = torch.stack([torch.randperm(num_players, generator=generator) for _ in range(4)])
    join_steps = orders.argsort(dim=1)
    for wave in coalition_waves(num_players, 8):
        coalitions = place_coalitions(orders, wave)
        assert len(coalitions) == 4 * len(wave)
        for coalition in coalitions:
            replaced = join_steps[coalition.permutation] >= coalition.step
            parent_replaced = join_steps[coalition.permutation] >= coalition.parent
            differing = torch.nonzero(replaced != parent_replaced)
            assert coalition.start == int(differing[0])
            # No candidate agrees longer: neither shared reference (all replaced, none replaced).
            assert coalition.start >= int(torch.nonzero(replaced)[0])
            assert coalition.start >= int(torch.nonzero(~replaced)[0])
        for batch in pass_batches(coalitions, 3, num_players):
            assert 1 <= len(batch) <= 3


def test_published_cost_bounds_the_positions_computed(tiny_model: LoadedModel, make_context: MakeContext) -> None:
    """MethodCost counts passes over the whole sequence; a pass from a cached prefix counts its share of it."""
    ctx = make_context(tiny_model)
    params = shapley(samples=20, seed=0)
    positions: list[int] = []

    def count(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        positions.append(kwargs["input_ids"].numel())

    hook = tiny_model.model.base_model.register_forward_hook(count, with_kwargs=True)
    try:
        ShapleySampling().attributions(ctx, params)
    finally:
        hook.remove()
    cost = ShapleySampling.cost
    assert cost.scaled_by == "samples" and cost.passes == cost.per_target == 0
    bound = cost.per_token * len(ctx.token_ids) * params.samples * len(ctx.token_ids)
    # Scoring every coalition from scratch: samples x (players - 1) sequences of all players.
    num_players = len(ctx.token_ids) - 1
    from_scratch_positions = params.samples * (num_players - 1) * num_players
    assert sum(positions) <= bound
    assert sum(positions) < 0.7 * from_scratch_positions
