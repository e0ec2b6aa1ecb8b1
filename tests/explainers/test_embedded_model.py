"""The embedded models' registry and conversion (explainers/embedded_model.py): SmolLM2 keeps its chat template and
adds no <bos>; Gemma 3 270M, a base model, has no chat template and its tokenizer prepends <bos> as its GGUF asks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast

from explainers.embedded_model import (
    EMBEDDED_MODELS,
    GEMMA_GGUF_FILE,
    GEMMA_MODEL_NAME,
    MODEL_NAME,
    EmbeddedModel,
    EmbeddedModelError,
    _prepend_bos,
    _tidy_tokenizer_config,
    _try_existing,
    assembled_gemma_gguf,
    embedded_model,
    prepare_model,
    verify_manifest,
)

FRANCE_COMPLETION = "Question: What is the capital of France?\nAnswer:"


def test_registry_names_both_models_and_refuses_others_listing_them() -> None:
    assert list(EMBEDDED_MODELS) == [MODEL_NAME, GEMMA_MODEL_NAME]
    smollm2, gemma = embedded_model(MODEL_NAME), embedded_model(GEMMA_MODEL_NAME)
    assert (smollm2.model_class, smollm2.chat_template, smollm2.add_bos) == ("LlamaForCausalLM", True, False)
    assert (gemma.model_class, gemma.chat_template, gemma.add_bos) == ("Gemma3ForCausalLM", False, True)
    with pytest.raises(EmbeddedModelError, match=f"'llama-7b'.*{MODEL_NAME}, {GEMMA_MODEL_NAME}"):
        embedded_model("llama-7b")
    with pytest.raises(EmbeddedModelError, match="no embedded model 'llama-7b'"):
        prepare_model(Path("/nonexistent"), "llama-7b")


def test_a_missing_gguf_names_its_wheel_and_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def not_installed(scratch: Path) -> Path:
        assert scratch.is_dir() and scratch.parent == tmp_path
        raise EmbeddedModelError("package 'absent_gguf' is not installed")

    absent = EmbeddedModel("absent-1m", "absent-gguf==1.0", "absent.gguf", not_installed, "", "", False, True)
    monkeypatch.setitem(EMBEDDED_MODELS, absent.name, absent)
    with pytest.raises(EmbeddedModelError, match=r"not installed; the GGUF of absent-1m ships in absent-gguf==1\.0"):
        prepare_model(tmp_path / "absent-1m", absent.name)
    # Neither the model dir nor the scratch and temporary dirs of the failed build remain; only the build lock.
    assert sorted(path.name for path in tmp_path.iterdir()) == [".absent-1m.lock"]


def _word_level_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "Paris": 4, "France": 5}
    word_level = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=word_level, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def test_prepended_bos_survives_saving_and_loading_as_a_plain_fast_tokenizer(tmp_path: Path) -> None:
    tokenizer = _word_level_tokenizer()
    assert tokenizer("France Paris").input_ids == [5, 4]
    _prepend_bos(tokenizer)
    tokenizer.save_pretrained(tmp_path)
    _tidy_tokenizer_config(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    reloaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert reloaded("France Paris").input_ids == [2, 5, 4]
    assert reloaded("France Paris", add_special_tokens=False).input_ids == [5, 4]
    assert reloaded.decode([2, 5, 4], skip_special_tokens=True) == "France Paris"


def test_gemma_gguf_is_assembled_from_its_chunk_wheels(tmp_path: Path) -> None:
    path = assembled_gemma_gguf(tmp_path)
    assert path == tmp_path / GEMMA_GGUF_FILE
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


@pytest.fixture(scope="module")
def gemma_dir() -> Path:
    # Converted once and cached (about 70 s of CPU, ~3 min on a busy 2-core host); the e2e test serves the same dir.
    return prepare_model(model=GEMMA_MODEL_NAME).model_dir


def test_gemma_converts_to_a_base_model_whose_tokenizer_prepends_bos(gemma_dir: Path) -> None:
    manifest = verify_manifest(gemma_dir)
    assert (manifest.model_name, manifest.source, manifest.dtype) == (GEMMA_MODEL_NAME, GEMMA_GGUF_FILE, "float32")
    config = AutoConfig.from_pretrained(gemma_dir, local_files_only=True)
    assert (config.model_type, config.architectures) == ("gemma3_text", ["Gemma3ForCausalLM"])
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (2, 1, 0)
    assert "quantization_config" not in json.loads((gemma_dir / "config.json").read_text())

    tokenizer = AutoTokenizer.from_pretrained(gemma_dir, local_files_only=True)
    assert not tokenizer.chat_template
    assert tokenizer.model_max_length == config.max_position_embeddings
    ids = tokenizer(FRANCE_COMPLETION).input_ids
    assert ids[0] == tokenizer.bos_token_id == 2 and 2 not in ids[1:]
    assert ids[1:] == tokenizer(FRANCE_COMPLETION, add_special_tokens=False).input_ids
    # A dir of one model is never taken for the other's.
    assert _try_existing(gemma_dir, EMBEDDED_MODELS[MODEL_NAME]) is None
    assert _try_existing(gemma_dir, EMBEDDED_MODELS[GEMMA_MODEL_NAME]) == manifest


def test_gemma_answers_the_france_completion_with_paris(gemma_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gemma_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(gemma_dir, local_files_only=True)
    ids = torch.tensor([tokenizer(FRANCE_COMPLETION).input_ids])
    with torch.no_grad():
        next_id = int(model(ids).logits[0, -1].argmax())
    assert tokenizer.decode([next_id]) == " Paris"


def test_smollm2_keeps_its_chat_template_and_adds_no_bos() -> None:
    smollm2_dir = prepare_model().model_dir
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    assert tokenizer.chat_template
    assert tokenizer("Paris").input_ids[:1] != [tokenizer.bos_token_id]
    assert _try_existing(smollm2_dir, EMBEDDED_MODELS[GEMMA_MODEL_NAME]) is None
