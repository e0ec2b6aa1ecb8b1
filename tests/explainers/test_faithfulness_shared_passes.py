"""Faithfulness scored on shared passes (each perturbed prefix resumed from the unperturbed or the all-replaced
sequence's keys and values) equals the straightforward recomputation: every perturbed prefix its own whole pass,
every method measured on its own."""

from __future__ import annotations

import pytest
import torch

from explainers.faithfulness import FRACTIONS, faithfulness_of, perturbed_scores, replacement_token_id
from explainers.model import LoadedModel
from explainers.targets import Targets, token_scores
from tests.explainers.conftest import OUTPUT_IDS, PROMPT_IDS, word_tokenizer
from tests.model_families import build_family_model

TOKEN_IDS = torch.tensor(PROMPT_IDS + OUTPUT_IDS)
# Every generated token's prefix for the single-prefix checks; three targets where each method is recomputed alone.
POSITIONS = torch.arange(len(PROMPT_IDS), len(TOKEN_IDS))
FEW_POSITIONS = torch.tensor([len(PROMPT_IDS), len(PROMPT_IDS) + 4, len(TOKEN_IDS) - 1])
FIELDS = ("comprehensiveness", "sufficiency", "random_comprehensiveness", "random_sufficiency")


def family_model(model_type: str) -> LoadedModel:
    """A tiny random model of the family in float64 (mistral_sliding and gemma3_text: windows of 4 positions,
    shorter than the sequence, where nothing can resume from a cache; gpt2: learned positions)."""
    model = build_family_model(model_type)
    model.to(torch.float64)  # type: ignore[arg-type]
    model.train(False)
    model.requires_grad_(False)
    return LoadedModel(
        model=model,
        tokenizer=word_tokenizer(),
        weights_digest=model_type,
        model_name=model_type,
        num_layers=int(model.config.num_hidden_layers),
    )


def straightforward(loaded: LoadedModel, targets: Targets, matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ERASER's (comprehensiveness, sufficiency) [num_fractions] of one matrix, every perturbed prefix scored by
    a whole pass of its own: the definition, written out."""
    replacement = replacement_token_id(loaded.tokenizer)
    comprehensiveness = torch.zeros(len(targets), len(FRACTIONS), dtype=torch.float64)
    sufficiency = torch.zeros_like(comprehensiveness)
    with torch.no_grad():
        unperturbed = token_scores(loaded, TOKEN_IDS[None], targets)[0]
        for target, position in enumerate(targets.positions.tolist()):
            one_target = targets[target : target + 1]
            ranking = torch.argsort(matrix[target, :position], descending=True, stable=True)
            for column, fraction in enumerate(FRACTIONS):
                rationale = ranking[: max(1, round(fraction * position))]
                removed = TOKEN_IDS[:position].clone()
                removed[rationale] = replacement
                kept = torch.full((position,), replacement)
                kept[rationale] = TOKEN_IDS[rationale]
                drops = unperturbed[target] - token_scores(loaded, torch.stack([removed, kept]), one_target)[:, 0]
                comprehensiveness[target, column], sufficiency[target, column] = drops
    return comprehensiveness.mean(dim=0), sufficiency.mean(dim=0)


def matrices(num_targets: int) -> dict[str, torch.Tensor]:
    """Attributions that put the rationale early, late, on the first token and everywhere tied, so that prefixes
    start their passes at 0, in the middle and at their last position."""
    generator = torch.Generator().manual_seed(3)
    shape = (num_targets, len(TOKEN_IDS) - 1)
    late = torch.arange(shape[1], dtype=torch.float64).expand(shape)
    first = torch.zeros(shape, dtype=torch.float64)
    first[:, 0] = 1.0
    return {
        "random": torch.randn(shape, generator=generator, dtype=torch.float64),
        "early": -late,
        "late": late.clone(),
        "first": first,
        "tied": torch.zeros(shape, dtype=torch.float64),
    }


@pytest.mark.parametrize("foils", [False, True], ids=["plain", "contrastive"])
def test_shared_passes_equal_each_method_recomputed_alone(tiny_model: LoadedModel, foils: bool) -> None:
    foil_ids = torch.full((len(FEW_POSITIONS),), 5) if foils else None
    targets = Targets(positions=FEW_POSITIONS, token_ids=TOKEN_IDS[FEW_POSITIONS], foil_ids=foil_ids)
    named = matrices(len(targets))

    results = faithfulness_of(tiny_model, TOKEN_IDS, targets, named, seed=4, batch_size=3)

    random_matrix = torch.rand(named["random"].shape, generator=torch.Generator().manual_seed(4))
    random_comprehensiveness, random_sufficiency = straightforward(tiny_model, targets, random_matrix)
    for name, matrix in named.items():
        comprehensiveness, sufficiency = straightforward(tiny_model, targets, matrix)
        expected = (comprehensiveness, sufficiency, random_comprehensiveness, random_sufficiency)
        for field, values in zip(FIELDS, expected, strict=True):
            # The fields are float32: equal to the float64 recomputation up to that rounding.
            torch.testing.assert_close(
                torch.tensor(list(getattr(results[name], field)), dtype=torch.float64),
                values,
                rtol=1e-6,
                atol=1e-6,
                msg=f"{name} {field}",
            )


@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_each_resumed_prefix_scores_as_its_own_whole_pass(tiny_model: LoadedModel, batch_size: int) -> None:
    # float64 throughout (the tiny Llama's norms included): the resumed pass is the whole pass to 1e-12.
    targets = Targets(positions=POSITIONS, token_ids=TOKEN_IDS[POSITIONS], foil_ids=None)
    replacement = replacement_token_id(tiny_model.tokenizer)
    generator = torch.Generator().manual_seed(5)
    perturbations = []
    for target, position in enumerate(POSITIONS.tolist()):
        for _ in range(6):
            replaced = torch.rand(position, generator=generator) < 0.4
            perturbations.append((target, tuple(torch.where(replaced, replacement, TOKEN_IDS[:position]).tolist())))
        # Unperturbed and all replaced: prefixes that agree with a reference to their end.
        perturbations += [(target, tuple(TOKEN_IDS[:position].tolist())), (target, (replacement,) * position)]

    scores = perturbed_scores(tiny_model, TOKEN_IDS, targets, [(perturbations, [])], replacement, batch_size)

    assert set(scores) == set(perturbations)
    with torch.no_grad():
        for target, prefix in perturbations:
            whole = token_scores(tiny_model, torch.tensor([prefix]), targets[target : target + 1])[0, 0]
            assert scores[(target, prefix)] == pytest.approx(float(whole), abs=1e-12, rel=1e-12)


@pytest.mark.parametrize("model_type", ["mistral_sliding", "gemma3_text", "gpt2", "gpt_neox", "qwen3"])
def test_shared_passes_equal_recomputation_on_other_families(model_type: str) -> None:
    loaded = family_model(model_type)
    targets = Targets(positions=FEW_POSITIONS, token_ids=TOKEN_IDS[FEW_POSITIONS], foil_ids=None)
    named = {name: matrix for name, matrix in matrices(len(targets)).items() if name in ("random", "late")}

    results = faithfulness_of(loaded, TOKEN_IDS, targets, named, batch_size=5)

    for name, matrix in named.items():
        comprehensiveness, sufficiency = straightforward(loaded, targets, matrix)
        for field, values in zip(FIELDS[:2], (comprehensiveness, sufficiency), strict=True):
            # transformers rounds some norms and softmaxes through float32 inside a float64 model (see
            # test_families): 1e-5, as there.
            torch.testing.assert_close(
                torch.tensor(list(getattr(results[name], field)), dtype=torch.float64),
                values,
                rtol=1e-5,
                atol=1e-5,
                msg=f"{model_type} {name} {field}",
            )
