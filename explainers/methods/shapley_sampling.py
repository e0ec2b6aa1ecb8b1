"""Shapley value sampling: each preceding token's average marginal contribution to each generated token's score
over random orders in which the tokens are put back."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from explainers import progress
from explainers.methods.base import AttributionContext, CostModel, ParamSpec
from explainers.methods.perturbation import (
    PASS_OVERHEAD_POSITIONS,
    PERTURBATION_PARAMS,
    PerturbationMethod,
    PerturbationParams,
    num_sources,
    read_out_scores,
    replacement_token_id,
    reuses_prefix_keys,
)

# Consecutive steps of a permutation scored as one block (a power of two): a block keeps the caches of up to
# BLOCK_STEPS + 1 of its coalitions, so longer blocks share more prefixes and hold more memory.
BLOCK_STEPS = 8
# The cached keys and values of coalitions kept for other coalitions to start from, for all the permutations
# scored together: permutations are taken in groups, and blocks made shorter, to stay under it.
KEPT_CACHE_BYTES = 256 * 2**20
# Positions computed relative to samples x N passes over the N players, batching included: 0.53 to 0.56 for
# 25 samples of N = 20 .. 200 (0.56 for the France question's 44). The all-replaced and unperturbed passes, shared
# by all samples, are within the margin.
SCORED_FRACTION = 0.56


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

    The intermediate sequences ("coalitions") are scored as _CoalitionScorer describes: each from the cached
    keys and values of a coalition agreeing with it on the longest prefix, many per forward pass, identical ones
    once. That changes how much is computed, never what: the result is the same as scoring every coalition from
    scratch (tested to 1e-12 in float64).
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
            "Random permutations averaged; each costs about half a forward pass per token before the last "
            "explained one.",
            minimum=1,
            maximum=1000,
        ),
        ParamSpec("seed", int, 0, "Seed of the permutations; the same seed gives the same result.", 0, 2**31 - 1),
        *PERTURBATION_PARAMS,
    )
    params_type = ShapleySamplingParams
    # Per permutation one pass per player but the last, each from the longest prefix shared with a coalition
    # already scored: a little over half of the sequence on average (SCORED_FRACTION).
    cost = CostModel(per_token=SCORED_FRACTION, scaled_by="samples")

    def source_attributions(self, ctx: AttributionContext, params: ShapleySamplingParams) -> torch.Tensor:
        num_players = num_sources(ctx.targets)
        replacement_id = replacement_token_id(ctx.loaded, params)
        generator = torch.Generator().manual_seed(params.seed)
        orders = torch.stack([torch.randperm(num_players, generator=generator) for _ in range(params.samples)])
        join_steps = orders.argsort(dim=1)  # [samples, num_players]: the step at which each player is put back

        scorer = _CoalitionScorer(ctx, replacement_id, params.batch_size)
        if num_players == 1:
            # No intermediate states: in every permutation the one player brings the whole change.
            return (scorer.unperturbed_scores - scorer.all_replaced_scores)[None].T
        block, group = scorer.grouping(params.samples)
        total = torch.zeros(num_players, len(ctx.targets), dtype=scorer.unperturbed_scores.dtype)
        groups = range(0, params.samples, group)
        with progress.steps(len(groups)):
            for start in groups:
                state_scores = scorer.permutation_scores(orders[start : start + group], block)
                # [permutations, num_players, num_targets]: the gain of the player put back at each step
                step_gains = state_scores.diff(dim=1)
                steps = join_steps[start : start + group, :, None].expand_as(step_gains)
                total += step_gains.gather(1, steps).sum(dim=0)
                progress.step()
        return (total / params.samples).T


@dataclass(frozen=True)
class _Coalition:
    """The state of permutation `permutation` after `step` of its players are back, scored from the cached keys
    and values of the same permutation's state after `parent` steps (0 and num_players: the shared all-replaced
    and unperturbed sequences), with which it agrees on positions [0, start)."""

    permutation: int
    step: int
    parent: int
    start: int


# One wave: (step, the steps of its already-scored neighbours) for every coalition scored in it.
Wave = list[tuple[int, tuple[int, ...]]]


def coalition_waves(num_players: int, block: int) -> list[Wave]:
    """The order in which a permutation's intermediate states (steps 1 .. num_players - 1) are scored: block by
    block of `block` steps (a power of two), the block's last state from its first, then coarse to fine, each
    state between two states of the level above."""
    waves: list[Wave] = []
    for first in range(0, num_players, block):
        last = min(first + block, num_players)
        if last < num_players:
            top: Wave = [(last, (first,))]
            waves.append(top)
        half = block // 2
        while half >= 1:
            level: Wave = [
                (step, (step - half, min(step + half, last))) for step in range(first + half, last, 2 * half)
            ]
            if level:
                waves.append(level)
            half //= 2
    return waves


def place_coalitions(orders: torch.Tensor, wave: Wave) -> list[_Coalition]:
    """The wave's coalitions of every permutation (orders [permutations, num_players]), each with the neighbour,
    or shared reference, that agrees with it on the longest prefix."""
    num_players = orders.shape[1]
    coalitions = []
    for permutation, order in enumerate(orders.tolist()):
        for step, neighbours in wave:
            # The states after j < k steps differ exactly at the players put back in steps j .. k - 1.
            candidates = {
                parent: min(order[min(parent, step) : max(parent, step)]) for parent in (*neighbours, 0, num_players)
            }
            parent = max(candidates, key=lambda candidate: candidates[candidate])
            coalitions.append(_Coalition(permutation, step, parent, candidates[parent]))
    return coalitions


def pass_batches(coalitions: list[_Coalition], batch_size: int, num_players: int) -> list[list[_Coalition]]:
    """The coalitions in forward passes of at most batch_size rows, each pass running from its earliest row's start
    to num_players: sorted by start, cut where the positions computed plus PASS_OVERHEAD_POSITIONS per pass are
    fewest (a row starting later than the pass recomputes positions its parent already has)."""
    ordered = sorted(coalitions, key=lambda coalition: -coalition.start)
    # cost[j], cut[j]: the cheapest passes over ordered[:j], and where the last of them begins.
    cost, cut = [0] + [0] * len(ordered), [0] * (len(ordered) + 1)
    for j in range(1, len(ordered) + 1):
        length = num_players - ordered[j - 1].start  # the pass's earliest row is its last
        cost[j], cut[j] = min(
            (cost[i] + PASS_OVERHEAD_POSITIONS + (j - i) * length, i) for i in range(max(0, j - batch_size), j)
        )
    batches = []
    j = len(ordered)
    while j > 0:
        batches.append(ordered[cut[j] : j])
        j = cut[j]
    return batches[::-1]


class _CoalitionScorer:
    """Scores the coalitions of Shapley sampling's permutations, computing as little as causality allows.

    Two sequences agree on their keys and values up to the first position where one has a player replaced and the
    other not; from another coalition's cache a pass over the rest is enough. In a permutation the states after j
    and k steps differ exactly at the players put back in between, so they agree up to the earliest of those
    positions. coalition_waves scores a block of steps coarse to fine, each state from whichever already-scored
    neighbour (or the all-replaced or unperturbed sequence) agrees with it longer: on average about half of the
    sequence is computed per state. (A chain k-1 -> k computes as little, but cannot batch: every state would wait
    for the one before.)

    Each wave holds the same level of every permutation of a group: its coalitions are sorted by where they start
    and scored batch_size to a forward pass, each row from its own neighbour's cache, the pass starting where its
    earliest row does. A pass runs to the last target: every intermediate coalition is needed up to there, by its
    players' contributions to the last target. Targets predicted before the pass's start keep the neighbour's
    scores. A coalition equal to one already scored in the group (the first and last steps of random orders often
    coincide) is copied, not scored, unless other coalitions start from its cache.
    """

    def __init__(self, ctx: AttributionContext, replacement_id: int, batch_size: int) -> None:
        self.ctx = ctx
        self.replacement_id = replacement_id
        self.batch_size = batch_size
        self.num_players = num_sources(ctx.targets)
        self.sequence = ctx.token_ids[: self.num_players]
        self.reuses_keys = reuses_prefix_keys(ctx.loaded, self.num_players)
        with torch.no_grad():
            references = torch.stack([torch.full_like(self.sequence, replacement_id), self.sequence])
            output = ctx.loaded.model.base_model(input_ids=references, use_cache=True)
        scores = read_out_scores(ctx.loaded, output.last_hidden_state, ctx.targets, 0)
        self.all_replaced_scores, self.unperturbed_scores = scores[0], scores[1]
        # Per layer (keys, values) [2, kv_heads, num_players, head_dim]: row 0 all replaced, row 1 unperturbed.
        self.reference_cache = [(layer.keys, layer.values) for layer in output.past_key_values.layers]
        self.bytes_per_position = sum(
            2 * keys[0, :, 0].numel() * keys.element_size() for keys, _ in self.reference_cache
        )

    def grouping(self, samples: int) -> tuple[int, int]:
        """(steps per block, permutations per group): the longest block, then the most permutations, whose kept
        caches (at most block + 1 states of num_players positions per permutation) fit KEPT_CACHE_BYTES."""
        if not self.reuses_keys:
            return BLOCK_STEPS, samples
        per_state = self.num_players * self.bytes_per_position
        block = BLOCK_STEPS
        while block > 1 and (block + 1) * per_state > KEPT_CACHE_BYTES:
            block //= 2
        return block, min(samples, max(1, KEPT_CACHE_BYTES // ((block + 1) * per_state)))

    def permutation_scores(self, orders: torch.Tensor, block: int) -> torch.Tensor:
        """Scores [permutations, num_players + 1, num_targets] of each permutation's states after 0 .. num_players
        of its players (orders [permutations, num_players]) are put back."""
        num_permutations, num_players = orders.shape
        join_steps = orders.argsort(dim=1)
        scores = self.all_replaced_scores.new_empty(num_permutations, num_players + 1, len(self.ctx.targets))
        scores[:, 0], scores[:, num_players] = self.all_replaced_scores, self.unperturbed_scores
        waves = coalition_waves(num_players, block)
        # The last wave in which each step is a neighbour: its cache is kept until then.
        last_use = {parent: w for w, wave in enumerate(waves) for _, neighbours in wave for parent in neighbours}
        kept: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        # A coalition's identity: its step and the sum of random 50-bit numbers of the players back (equal sets,
        # equal sums; a match is confirmed on the sets themselves before its scores are reused).
        player_hashes = torch.randint(0, 2**50, (num_players,), generator=torch.Generator().manual_seed(0))
        set_hashes = player_hashes[orders].cumsum(dim=1).tolist()  # [p][k - 1]: of the first k players back
        first_scored: dict[tuple[int, int], tuple[int, int]] = {}
        for w, wave in enumerate(waves):
            to_score, copies = [], []
            for coalition in place_coalitions(orders, wave):
                state = (coalition.permutation, coalition.step)
                key = (coalition.step, set_hashes[coalition.permutation][coalition.step - 1])
                original = first_scored.setdefault(key, state)
                if original != state and coalition.step not in last_use and _same_players(join_steps, state, original):
                    copies.append((state, original))
                else:
                    to_score.append(coalition)
            needed_later = {step for step, last in last_use.items() if last > w}
            for batch in pass_batches(to_score, self.batch_size, num_players):
                self._score(batch, join_steps, scores, kept, needed_later)
                progress.tick()
            for copy, original in copies:
                scores[copy] = scores[original]
            kept = {state: cache for state, cache in kept.items() if state[1] in needed_later}
        return scores

    def _score(
        self,
        batch: list[_Coalition],
        join_steps: torch.Tensor,
        scores: torch.Tensor,
        kept: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]],
        needed_later: set[int],
    ) -> None:
        """Scores one forward pass's coalitions into scores, keeping the caches of those at steps needed_later."""
        start = min(coalition.start for coalition in batch) if self.reuses_keys else 0
        permutations = torch.tensor([coalition.permutation for coalition in batch])
        steps = torch.tensor([coalition.step for coalition in batch])
        parents = torch.tensor([coalition.parent for coalition in batch])
        replaced = join_steps[permutations, start:] >= steps[:, None]  # still replaced after `step` steps
        past = (
            None
            if start == 0
            else DynamicCache(
                [
                    (
                        torch.cat([self._cache(kept, coalition)[layer][0][:, :, :start] for coalition in batch]),
                        torch.cat([self._cache(kept, coalition)[layer][1][:, :, :start] for coalition in batch]),
                    )
                    for layer in range(len(self.reference_cache))
                ]
            )
        )
        inputs = torch.where(replaced, self.replacement_id, self.sequence[start:])
        targets = self.ctx.targets
        # Targets predicted before `start` see the same prefix as in the parent; positions ascend.
        first_target = int(torch.searchsorted(targets.predicting_positions, start))
        with torch.no_grad():
            output = self.ctx.loaded.model.base_model(input_ids=inputs, past_key_values=past, use_cache=True)
            read_out = read_out_scores(self.ctx.loaded, output.last_hidden_state, targets[first_target:], start)
        scores[permutations, steps, :first_target] = scores[permutations, parents, :first_target]
        scores[permutations, steps, first_target:] = read_out
        if self.reuses_keys:
            for row, coalition in enumerate(batch):
                if coalition.step in needed_later:
                    kept[coalition.permutation, coalition.step] = [
                        (layer.keys[row : row + 1].clone(), layer.values[row : row + 1].clone())
                        for layer in output.past_key_values.layers
                    ]

    def _cache(
        self, kept: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]], coalition: _Coalition
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) [1, kv_heads, positions, head_dim] of the coalition's parent."""
        if coalition.parent in (0, self.num_players):
            row = 0 if coalition.parent == 0 else 1
            return [(keys[row : row + 1], values[row : row + 1]) for keys, values in self.reference_cache]
        return kept[coalition.permutation, coalition.parent]


def _same_players(join_steps: torch.Tensor, state: tuple[int, int], other: tuple[int, int]) -> bool:
    """Whether two (permutation, step) states have the same players back."""
    return bool(torch.equal(join_steps[state[0]] < state[1], join_steps[other[0]] < other[1]))
