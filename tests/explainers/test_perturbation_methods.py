"""Occlusion and Shapley value sampling against explicit recomputation, brute-force Shapley values and Captum."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from captum.attr import FeatureAblation, ShapleyValueSampling
from sightline.v1 import types_pb2
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from explainers.methods import perturbation
from explainers.methods.base import AttributionContext, InvalidParamsError
from explainers.methods.occlusion import Occlusion, OcclusionParams
from explainers.methods.perturbation import PerturbationMethod
from explainers.methods.shapley_sampling import ShapleySampling, ShapleySamplingParams
from explainers.model import ATTN_IMPLEMENTATION, LoadedModel
from explainers.targets import Targets
from tests.explainers.conftest import VOCAB_SIZE, word_tokenizer

ReadTensor = Callable[[types_pb2.Tensor], np.ndarray]
MakeContext = Callable[[LoadedModel], AttributionContext]

# The word tokenizer's only special token is unk ("w0", id 0), which the fixed sequence does not contain.
REPLACEMENT_ID = 0
UNK: dict[str, object] = {"replacement": "unk"}


def occlusion(**params: object) -> OcclusionParams:
    return Occlusion().parse_params({**UNK, **params})


def shapley(**params: object) -> ShapleySamplingParams:
    return ShapleySampling().parse_params({**UNK, **params})


def with_targets(
    ctx: AttributionContext, positions: list[int], foil_ids: list[int] | None = None
) -> AttributionContext:
    chosen = torch.tensor(positions)
    targets = Targets(
        positions=chosen,
        token_ids=ctx.token_ids[chosen],
        foil_ids=None if foil_ids is None else torch.tensor(foil_ids),
    )
    return dataclasses.replace(ctx, targets=targets)


def target_logprobs(
    loaded: LoadedModel, inputs: torch.Tensor, token_ids: torch.Tensor, positions: list[int]
) -> torch.Tensor:
    """log p(token_ids[t] | inputs[:t]) [len(positions)] for each t in positions, from one forward pass over the
    (perturbed) inputs: the scored tokens are always the served ones, even where inputs replaced them."""
    with torch.no_grad():
        logits = loaded.model(input_ids=inputs[None]).logits[0, [t - 1 for t in positions]]
    return torch.log_softmax(logits, dim=-1)[range(len(positions)), token_ids[positions]]


def replaced(token_ids: torch.Tensor, positions: list[int] | range) -> torch.Tensor:
    perturbed = token_ids.clone()
    perturbed[list(positions)] = REPLACEMENT_ID
    return perturbed


def exact_shapley(loaded: LoadedModel, token_ids: torch.Tensor, position: int, num_players: int) -> torch.Tensor:
    """Shapley values [num_players] of the first num_players tokens for the token at `position`, by brute force:
    phi_j = sum over coalitions S without j of |S|! (n - |S| - 1)! / n! * (v(S + j) - v(S)), where v(S) is the
    log-probability with every player outside S replaced."""
    coalitions = list(itertools.product((False, True), repeat=num_players))
    prefixes = token_ids[:position].repeat(len(coalitions), 1)
    prefixes[:, :num_players] = torch.where(torch.tensor(coalitions), prefixes[:, :num_players], REPLACEMENT_ID)
    with torch.no_grad():
        logits = loaded.model(input_ids=prefixes).logits[:, -1]
    values = dict(zip(coalitions, torch.log_softmax(logits, dim=-1)[:, token_ids[position]].tolist(), strict=True))

    shapley_values = torch.zeros(num_players, dtype=torch.float64)
    for coalition, value in values.items():
        size = sum(coalition)
        for player in (j for j in range(num_players) if not coalition[j]):
            weight = math.factorial(size) * math.factorial(num_players - size - 1) / math.factorial(num_players)
            joined = tuple(present or j == player for j, present in enumerate(coalition))
            shapley_values[player] += weight * (values[joined] - value)
    return shapley_values


def captum_forward(loaded: LoadedModel, token_ids: torch.Tensor, position: int) -> Callable[[torch.Tensor], Any]:
    """Captum's forward_func: a batch of (perturbed) token ids -> log p(token at `position`) per sequence."""

    def target_logprob(inputs: torch.Tensor) -> torch.Tensor:
        logits = loaded.model(input_ids=inputs).logits[:, position - 1]
        return torch.log_softmax(logits, dim=-1)[:, token_ids[position]]

    return target_logprob


# --- shared: parameters and the replacement token ---


@pytest.mark.parametrize("method", [Occlusion(), ShapleySampling()], ids=lambda method: method.name)
def test_params_declare_the_typed_fields_and_capabilities(method: PerturbationMethod[Any]) -> None:
    fields = {field.name: field.type for field in dataclasses.fields(method.params_type)}
    assert fields == {spec.name: spec.type.__name__ for spec in method.params}
    info = method.info()
    assert info.attributes_tokens and info.supports_contrastive_targets
    assert not info.needs_gradients and not info.uses_cache
    (replacement,) = (param for param in info.params if param.name == "replacement")
    assert list(replacement.choices) == ["pad", "unk", "bos", "token"]


def test_parse_params_fills_the_defaults() -> None:
    assert Occlusion().parse_params({}) == OcclusionParams(
        replacement="pad", replacement_token_id=0, batch_size=16, window=1
    )
    assert ShapleySampling().parse_params({}) == ShapleySamplingParams(
        replacement="pad", replacement_token_id=0, batch_size=16, samples=25, seed=0
    )


def test_a_special_token_the_tokenizer_lacks_is_refused_naming_what_it_has(
    tiny_model: LoadedModel, make_context: MakeContext
) -> None:
    ctx = make_context(tiny_model)
    expected = (
        r"replacement 'pad' needs the tokenizer's pad token, but model 'tiny-llama' has none "
        r"\(it has: unk \(id 0\)\); choose another replacement, or 'token' with replacement_token_id"
    )
    with pytest.raises(InvalidParamsError, match=expected):
        Occlusion().attribute(ctx, Occlusion().parse_params({}))
    with pytest.raises(InvalidParamsError, match="replacement_token_id must be in \\[0, 64\\) for model 'tiny-llama'"):
        Occlusion().attribute(ctx, occlusion(replacement="token", replacement_token_id=64))
    with pytest.raises(InvalidParamsError, match="must be one of pad, unk, bos, token; got 'mask'"):
        occlusion(replacement="mask")


def test_replacement_token_is_the_chosen_id(tiny_model: LoadedModel, make_context: MakeContext) -> None:
    ctx = with_targets(make_context(tiny_model), [6])
    by_unk = Occlusion().attributions(ctx, occlusion())
    by_id_zero = Occlusion().attributions(ctx, occlusion(replacement="token", replacement_token_id=0))
    by_id_five = Occlusion().attributions(ctx, occlusion(replacement="token", replacement_token_id=5))
    torch.testing.assert_close(by_id_zero, by_unk, rtol=0, atol=0)
    drop = target_logprobs(tiny_model, ctx.token_ids, ctx.token_ids, [6]) - target_logprobs(
        tiny_model, replaced(ctx.token_ids, [2]), ctx.token_ids, [6]
    )
    assert float(by_unk[0, 2]) == pytest.approx(float(drop), abs=1e-12)
    assert float(by_id_five[0, 2]) != pytest.approx(float(drop), abs=1e-3)


# --- occlusion ---


@pytest.mark.parametrize(
    ("window", "positions"),
    [(1, list(range(6, 14))), (3, list(range(6, 14))), (3, [7, 9, 11])],
    ids=["window_1", "window_3", "window_3_three_targets"],
)
def test_occlusion_is_the_recomputed_score_drop(
    tiny_model: LoadedModel,
    make_context: MakeContext,
    read_tensor: ReadTensor,
    window: int,
    positions: list[int],
) -> None:
    ctx = with_targets(make_context(tiny_model), positions)
    attributions = Occlusion().attributions(ctx, occlusion(window=window))

    unperturbed = target_logprobs(tiny_model, ctx.token_ids, ctx.token_ids, positions)
    expected = torch.zeros(len(positions), len(ctx.token_ids) - 1, dtype=torch.float64)
    for row, position in enumerate(positions):
        for token in range(position):
            start = token // window * window
            perturbed = replaced(ctx.token_ids, range(start, min(start + window, len(ctx.token_ids))))
            expected[row, token] = (
                unperturbed[row] - target_logprobs(tiny_model, perturbed, ctx.token_ids, [position])[0]
            )
    torch.testing.assert_close(attributions, expected, rtol=0, atol=1e-12)
    assert expected.abs().max() > 0.5

    shipped = read_tensor(Occlusion().attribute(ctx, occlusion(window=window)).attributions)
    assert shipped.dtype == np.float32
    np.testing.assert_allclose(shipped, expected.numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("window", [1, 3])
@pytest.mark.parametrize("target", [0, 7])
def test_occlusion_agrees_with_captum_feature_ablation(
    tiny_model: LoadedModel, make_context: MakeContext, window: int, target: int
) -> None:
    ctx = make_context(tiny_model)
    position = int(ctx.targets.positions[target])
    feature_mask = torch.arange(len(ctx.token_ids))[None] // window
    captum = FeatureAblation(captum_forward(tiny_model, ctx.token_ids, position)).attribute(
        ctx.token_ids[None], baselines=REPLACEMENT_ID, feature_mask=feature_mask, perturbations_per_eval=16
    )[0]

    ours = Occlusion().attributions(ctx, occlusion(window=window))[target]
    # Captum gives a window's change to all its tokens, also to those at and after the target.
    torch.testing.assert_close(ours[:position], captum[:position], rtol=0, atol=1e-12)
    assert torch.all(ours[position:] == 0.0)


# --- Shapley value sampling ---


def test_shapley_sampling_is_the_average_marginal_contribution_over_its_permutations(
    tiny_model: LoadedModel, make_context: MakeContext
) -> None:
    """The definition, one model call per coalition, over the permutations the method draws: one torch.randperm
    per sample from a Generator seeded with `seed`."""
    ctx = make_context(tiny_model)
    params = shapley(samples=4, seed=3)
    attributions = ShapleySampling().attributions(ctx, params)

    num_players = len(ctx.token_ids) - 1
    generator = torch.Generator().manual_seed(params.seed)
    positions = ctx.targets.positions.tolist()
    expected = torch.zeros(len(ctx.token_ids) - 1, len(positions), dtype=torch.float64)
    for _ in range(params.samples):
        absent = list(range(num_players))
        before = target_logprobs(tiny_model, replaced(ctx.token_ids, absent), ctx.token_ids, positions)
        for player in torch.randperm(num_players, generator=generator).tolist():
            absent.remove(player)
            after = target_logprobs(tiny_model, replaced(ctx.token_ids, absent), ctx.token_ids, positions)
            expected[player] += (after - before) / params.samples
            before = after
    # Causality, not the method, zeroes a player's contribution to the targets at or before its position.
    torch.testing.assert_close(attributions, expected.T, rtol=0, atol=1e-12)


def test_shapley_sampling_is_efficient(tiny_model: LoadedModel, make_context: MakeContext) -> None:
    ctx = make_context(tiny_model)
    attributions = ShapleySampling().attributions(ctx, shapley(samples=5))
    positions = ctx.targets.positions.tolist()
    baseline = replaced(ctx.token_ids, range(len(ctx.token_ids) - 1))
    gain = target_logprobs(tiny_model, ctx.token_ids, ctx.token_ids, positions) - target_logprobs(
        tiny_model, baseline, ctx.token_ids, positions
    )
    torch.testing.assert_close(attributions.sum(dim=1), gain, rtol=0, atol=1e-9)
    assert gain.abs().max() > 1.0


def test_shapley_sampling_converges_to_the_exact_shapley_values(
    tiny_model: LoadedModel, make_context: MakeContext
) -> None:
    # Target 0 (position 6) alone: 6 players, so the exact values take 2**6 model calls.
    ctx = with_targets(make_context(tiny_model), [6])
    exact = exact_shapley(tiny_model, ctx.token_ids, 6, num_players=6)
    estimate = ShapleySampling().attributions(ctx, shapley(samples=1000, batch_size=256))[0, :6]

    # Sampling error, measured as the largest |estimate - exact| over the 6 players: 0.040 at seed 0, 0.040 on
    # average over seeds 0-9, 0.061 at worst; values go up to 1.4.
    torch.testing.assert_close(estimate, exact, rtol=0, atol=0.1)
    assert exact.abs().max() > 1.0


@pytest.mark.parametrize("target", [0, 7])
def test_shapley_sampling_equals_captum_given_the_same_permutations(
    tiny_model: LoadedModel, make_context: MakeContext, target: int
) -> None:
    ctx = make_context(tiny_model)
    position = int(ctx.targets.positions[target])
    num_players = len(ctx.token_ids) - 1
    params = shapley(samples=10, seed=7)

    # Captum draws one torch.randperm(num_features) per sample from the global generator, so seeding that with
    # our seed makes it walk the same permutations of the same players: the tokens before the last target.
    torch.manual_seed(params.seed)
    captum = ShapleyValueSampling(captum_forward(tiny_model, ctx.token_ids, position)).attribute(
        ctx.token_ids[None, :num_players],
        baselines=REPLACEMENT_ID,
        n_samples=params.samples,
        perturbations_per_eval=num_players,
    )[0]

    ours = ShapleySampling().attributions(ctx, params)[target]
    # Captum sums its marginal contributions in float32 (measured difference: up to 1e-7).
    torch.testing.assert_close(ours, captum.double(), rtol=0, atol=1e-6)
    assert ours.abs().max() > 0.1


def bag_of_words_llama() -> LoadedModel:
    """A one-layer Llama with zero query and key projections, so attention is uniform over the prefix.

    The position predicting a target then sees its own token plus the *mean* of the value vectors over the
    prefix: rotary embeddings only rotate the (zero) queries and keys, so the earlier tokens enter through a
    symmetric function, and two equal token ids before the predicting position are interchangeable players.
    Identical ids are not enough for the 2-layer fixture: there a token's position changes what it contributes.
    """
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.3,
    )
    torch.manual_seed(1)
    model: PreTrainedModel = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
        config, attn_implementation=ATTN_IMPLEMENTATION
    )
    model.to(torch.float64)  # type: ignore[arg-type]
    model.train(False)
    model.requires_grad_(False)
    for name in ("q_proj", "k_proj"):
        projection = model.get_submodule(f"model.layers.0.self_attn.{name}")
        assert isinstance(projection, torch.nn.Linear)
        projection.weight.zero_()
    return LoadedModel(
        model=model, tokenizer=word_tokenizer(), weights_digest="bag", model_name="bag-of-words", num_layers=1
    )


def test_shapley_sampling_is_symmetric_in_interchangeable_tokens() -> None:
    loaded = bag_of_words_llama()
    # Players 1 and 3 hold the same id; the target at position 6 is predicted from position 5. The ids are picked
    # so that every other player's Shapley value is at least 0.7 away from theirs.
    token_ids = torch.tensor([54, 2, 60, 2, 29, 40, 45])
    ctx = AttributionContext(
        loaded=loaded,
        token_ids=token_ids,
        prompt_length=6,
        targets=Targets(positions=torch.tensor([6]), token_ids=token_ids[[6]], foil_ids=None),
        hidden_states=torch.empty(0),
    )
    exact = exact_shapley(loaded, token_ids, 6, num_players=6)
    assert float(exact[1]) == pytest.approx(float(exact[3]), abs=1e-12)  # the construction is symmetric

    # The sampled estimate is symmetric in expectation only: each permutation credits the two players differently,
    # and the difference averages out like the rest of the sampling error. At 500 permutations |estimate[1] -
    # estimate[3]| is 0.015 on average over 10 seeds (0.035 at worst), against a gap of >= 0.7 to the others.
    estimate = ShapleySampling().attributions(ctx, shapley(samples=500, batch_size=256))[0]
    assert float(estimate[1]) == pytest.approx(float(estimate[3]), abs=0.1)
    assert min(abs(float(estimate[1] - estimate[j])) for j in (0, 2, 4, 5)) > 0.5


def test_shapley_sampling_is_reproducible_by_seed(tiny_model: LoadedModel, make_context: MakeContext) -> None:
    ctx = make_context(tiny_model)
    first = ShapleySampling().attributions(ctx, shapley(samples=3, seed=11))
    again = ShapleySampling().attributions(ctx, shapley(samples=3, seed=11))
    other = ShapleySampling().attributions(ctx, shapley(samples=3, seed=12))
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert (other - first).abs().max() > 0.1


# --- both methods ---


@pytest.mark.parametrize(
    ("method", "params"),
    [(Occlusion(), occlusion(window=2)), (ShapleySampling(), shapley(samples=3))],
    ids=["occlusion", "shapley_sampling"],
)
def test_contrastive_attributions_are_token_minus_foil(
    tiny_model: LoadedModel, make_context: MakeContext, method: PerturbationMethod[Any], params: Any
) -> None:
    ctx = make_context(tiny_model)
    positions = ctx.targets.positions.tolist()
    foils = [5, 44, 21, 5, 63, 1, 36, 12]
    contrastive = method.attributions(with_targets(ctx, positions, foil_ids=foils), params)
    token = method.attributions(ctx, params)
    # Plain attributions of the foils: they are scored at the targets' positions, the sequence is unchanged.
    foil_targets = dataclasses.replace(ctx.targets, token_ids=torch.tensor(foils))
    foil = method.attributions(dataclasses.replace(ctx, targets=foil_targets), params)
    torch.testing.assert_close(contrastive, token - foil, rtol=0, atol=1e-12)
    assert contrastive.abs().max() > 0.5


@pytest.mark.parametrize(
    ("method", "params"),
    [(Occlusion(), occlusion(window=3)), (ShapleySampling(), shapley(samples=3))],
    ids=["occlusion", "shapley_sampling"],
)
def test_batch_size_never_changes_the_result(
    tiny_model: LoadedModel, make_context: MakeContext, method: PerturbationMethod[Any], params: Any
) -> None:
    # Three targets: 8 players, so at batch size 16 Shapley sampling puts back two permutations per batch.
    ctx = with_targets(make_context(tiny_model), [6, 7, 8])
    one_at_a_time = method.attributions(ctx, dataclasses.replace(params, batch_size=1))
    batched = method.attributions(ctx, dataclasses.replace(params, batch_size=16))
    torch.testing.assert_close(batched, one_at_a_time, rtol=0, atol=1e-12)


@pytest.mark.parametrize("readout_rows", [1, 5])
def test_reading_out_a_few_rows_at_a_time_never_changes_the_result(
    tiny_model: LoadedModel, make_context: MakeContext, monkeypatch: pytest.MonkeyPatch, readout_rows: int
) -> None:
    """Long perturbed sequences read their targets' logits out a slice at a time (bounded memory): 1 row is one
    target of one sequence per slice, 5 rows one target of a 4-sequence batch or two of a 2-sequence one."""
    ctx = make_context(tiny_model)
    whole = Occlusion().attributions(ctx, occlusion(window=1, batch_size=4))
    monkeypatch.setattr(perturbation, "READOUT_ROWS", readout_rows)
    for batch_size in (2, 4):
        sliced = Occlusion().attributions(ctx, occlusion(window=1, batch_size=batch_size))
        torch.testing.assert_close(sliced, whole, rtol=0, atol=1e-12)


def test_one_preceding_token_gets_the_whole_score_change(tiny_model: LoadedModel, make_context: MakeContext) -> None:
    # Only the first output token explained with a one-token prompt: one player, the smallest game.
    ctx = with_targets(make_context(tiny_model), [1])
    change = target_logprobs(tiny_model, ctx.token_ids, ctx.token_ids, [1]) - target_logprobs(
        tiny_model, replaced(ctx.token_ids, [0]), ctx.token_ids, [1]
    )
    for attributions in (
        Occlusion().attributions(ctx, occlusion(window=4)),
        ShapleySampling().attributions(ctx, shapley(samples=2)),
    ):
        assert attributions.shape == (1, len(ctx.token_ids) - 1)
        torch.testing.assert_close(attributions[:, 0], change, rtol=0, atol=1e-12)
        assert torch.all(attributions[:, 1:] == 0.0)


@pytest.mark.parametrize(
    ("method", "params"),
    [(Occlusion(), occlusion()), (Occlusion(), occlusion(window=4))],
    ids=["occlusion", "occlusion_window_4"],
)
def test_published_cost_bounds_the_sequences_scored(
    tiny_model: LoadedModel, make_context: MakeContext, method: PerturbationMethod[Any], params: Any
) -> None:
    ctx = make_context(tiny_model)
    scored: list[int] = []

    def count(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        scored.append(len(kwargs["input_ids"]))

    # The perturbed passes run the decoder stack (base_model), without the unembedding.
    hook = tiny_model.model.base_model.register_forward_hook(count, with_kwargs=True)
    try:
        method.attributions(ctx, params)
    finally:
        hook.remove()
    assert scored
    # As the gateway reads MethodCost: whole-sequence passes, times the scaling parameter's value. (Shapley
    # sampling's passes start from cached prefixes: tests/explainers/test_shapley_sampling.py bounds its positions.)
    cost = method.cost
    scale = getattr(params, cost.scaled_by) if cost.scaled_by else 1
    assert (
        sum(scored) <= (cost.passes + cost.per_target * len(ctx.targets) + cost.per_token * len(ctx.token_ids)) * scale
    )
