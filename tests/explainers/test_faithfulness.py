"""ERASER comprehensiveness and sufficiency on a model whose one important token is known by construction."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel, PreTrainedTokenizerFast

from explainers.faithfulness import FRACTIONS, faithfulness, replacement_token_id
from explainers.model import ATTN_IMPLEMENTATION, LoadedModel
from explainers.targets import Targets, token_scores
from tests.explainers.conftest import VOCAB_SIZE, word_tokenizer

KEY_ID, ANSWER_ID = 7, 3
KEY_POSITION = 2
# The word tokenizer's unk "w0" is the replacement; like every token but the key, it embeds to zero.
TOKEN_IDS = torch.tensor([1, 2, KEY_ID, 4, 5, 6, ANSWER_ID, ANSWER_ID, ANSWER_ID, ANSWER_ID])
POSITIONS = torch.arange(6, 10)  # sources before each target: 6, 7, 8, 9
TARGETS = Targets(positions=POSITIONS, token_ids=TOKEN_IDS[POSITIONS], foil_ids=None)
ANSWER_LOGIT = 10.0


def key_detector() -> PreTrainedModel:
    """A one-layer Llama that predicts ANSWER_ID if and only if KEY_ID occurs earlier, wherever it sits.

    Every token but the key embeds to zero. Queries and keys are zero, so attention is uniform over the prefix;
    the value and output projections copy the key's embedding (dimension 0) into dimension 1 of the residual, which
    the final RMSNorm rescales to the same size wherever the key sits (eps aside) and the unembedding reads as
    ANSWER_ID's logit. Without the key every state is zero: a uniform next-token distribution.
    """
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=4,
        intermediate_size=4,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        max_position_embeddings=16,
    )
    model: PreTrainedModel = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
        config, attn_implementation=ATTN_IMPLEMENTATION
    )
    model.to(torch.float64)  # type: ignore[arg-type]
    model.train(False)
    model.requires_grad_(False)
    parameters = dict(model.named_parameters())
    for name, parameter in parameters.items():
        if not name.endswith("norm.weight"):
            parameter.zero_()
    parameters["model.embed_tokens.weight"][KEY_ID, 0] = 1.0
    parameters["model.layers.0.self_attn.v_proj.weight"][0, 0] = 1.0
    parameters["model.layers.0.self_attn.o_proj.weight"][1, 0] = 1.0
    # The final norm scales dimension 1 to sqrt(hidden_size) = 2.
    parameters["lm_head.weight"][ANSWER_ID, 1] = ANSWER_LOGIT / 2
    return model


@pytest.fixture(scope="module")
def detector() -> LoadedModel:
    return LoadedModel(
        model=key_detector(),
        tokenizer=word_tokenizer(),
        weights_digest="key-detector",
        model_name="key-detector",
        num_layers=1,
    )


def occlusion(loaded: LoadedModel) -> torch.Tensor:
    """Exact leave-one-out attributions [num_targets, num_tokens - 1]: the score drop when a source is replaced."""
    with torch.no_grad():
        unperturbed = token_scores(loaded, TOKEN_IDS[None], TARGETS)[0]
        occluded = TOKEN_IDS.repeat(len(TOKEN_IDS) - 1, 1)
        occluded.fill_diagonal_(replacement_token_id(loaded.tokenizer))
        drops = (unperturbed - token_scores(loaded, occluded, TARGETS)).T  # [num_targets, num_sources]
    return torch.where(torch.arange(len(TOKEN_IDS) - 1)[None, :] < POSITIONS[:, None], drops, 0.0)


def test_the_constructed_model_depends_on_the_key_alone(detector: LoadedModel) -> None:
    attributions = occlusion(detector)
    key_drop = math.log(VOCAB_SIZE) + ANSWER_LOGIT - math.log(math.exp(ANSWER_LOGIT) + VOCAB_SIZE - 1)
    # RMSNorm's eps moves the answer logit by ~1e-5 at most here.
    torch.testing.assert_close(
        attributions[:, KEY_POSITION], torch.full((4,), key_drop, dtype=torch.float64), atol=1e-4, rtol=0
    )
    others = torch.ones_like(attributions, dtype=torch.bool)
    others[:, KEY_POSITION] = False
    assert torch.all(attributions[others] == 0.0)


def test_the_right_attribution_beats_random(detector: LoadedModel) -> None:
    attributions = occlusion(detector)
    key_drop = float(attributions[0, KEY_POSITION])

    result = faithfulness(detector, TOKEN_IDS, TARGETS, attributions)

    assert list(result.fractions) == pytest.approx(FRACTIONS)
    assert result.replacement_token_id == 0
    # The key is the top source at every fraction: removing it costs everything, keeping it alone costs nothing.
    assert list(result.comprehensiveness) == pytest.approx([key_drop] * 5, abs=1e-6)
    assert list(result.sufficiency) == pytest.approx([0.0] * 5, abs=1e-6)
    # Random rationales miss the key at small fractions (and drop it when kept alone).
    assert all(
        ours >= chance for ours, chance in zip(result.comprehensiveness, result.random_comprehensiveness, strict=True)
    )
    assert all(ours <= chance for ours, chance in zip(result.sufficiency, result.random_sufficiency, strict=True))
    assert result.aopc_comprehensiveness > result.random_aopc_comprehensiveness + 1.0
    assert result.aopc_sufficiency < result.random_aopc_sufficiency - 1.0
    assert result.aopc_comprehensiveness == pytest.approx(sum(result.comprehensiveness) / 5)
    assert result.random_aopc_sufficiency == pytest.approx(sum(result.random_sufficiency) / 5)


def test_the_rationale_size_is_a_rounded_fraction_of_each_targets_sources(detector: LoadedModel) -> None:
    # The key ranked second for every target: a rationale finds it only once it holds two or more tokens.
    attributions = torch.zeros(4, len(TOKEN_IDS) - 1, dtype=torch.float64)
    attributions[:, 0] = 2.0
    attributions[:, KEY_POSITION] = 1.0
    key_drop = float(occlusion(detector)[0, KEY_POSITION])

    result = faithfulness(detector, TOKEN_IDS, TARGETS, attributions)

    sources = POSITIONS.tolist()  # 6, 7, 8, 9
    found = [sum(max(1, round(q * n)) >= 2 for n in sources) / len(sources) for q in FRACTIONS]
    assert found == [0.0, 0.0, 0.0, 0.5, 1.0]  # e.g. q = 0.2: k = 1, 1, 2, 2
    assert list(result.comprehensiveness) == pytest.approx([key_drop * share for share in found], abs=1e-6)
    assert list(result.sufficiency) == pytest.approx([key_drop * (1 - share) for share in found], abs=1e-6)


def test_batching_and_the_seed_never_change_the_result(
    tiny_model: LoadedModel, token_ids: torch.Tensor, target_positions: torch.Tensor
) -> None:
    positions = target_positions[-3:]  # three targets keep the unbatched run short
    targets = Targets(positions=positions, token_ids=token_ids[positions], foil_ids=None)
    attributions = torch.randn(len(targets), len(token_ids) - 1, generator=torch.Generator().manual_seed(1))

    results = [faithfulness(tiny_model, token_ids, targets, attributions, batch_size=size) for size in (16, 1, 7)]
    # Fields are float32: 1e-6 allows a last-bit difference of values up to ~8.

    for other in results[1:]:
        for field in ("comprehensiveness", "sufficiency", "random_comprehensiveness", "random_sufficiency"):
            assert list(getattr(other, field)) == pytest.approx(list(getattr(results[0], field)), abs=1e-6), field
    reseeded = faithfulness(tiny_model, token_ids, targets, attributions, seed=1)
    assert list(reseeded.comprehensiveness) == pytest.approx(list(results[0].comprehensiveness), abs=1e-6)
    assert list(reseeded.random_comprehensiveness) != pytest.approx(list(results[0].random_comprehensiveness))


def tokenizer_with(**special_tokens: str) -> PreTrainedTokenizerFast:
    word_level = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(8)}))
    return PreTrainedTokenizerFast(tokenizer_object=word_level, **special_tokens)  # type: ignore[no-untyped-call]


@pytest.mark.parametrize(
    ("special_tokens", "expected"),
    [
        ({"pad_token": "w5", "unk_token": "w6", "bos_token": "w7"}, 5),
        ({"unk_token": "w6", "bos_token": "w7"}, 6),
        ({"bos_token": "w7"}, 7),
        ({}, 0),
    ],
)
def test_replacement_is_pad_then_unk_then_bos_then_zero(special_tokens: dict[str, str], expected: int) -> None:
    assert replacement_token_id(tokenizer_with(**special_tokens)) == expected
