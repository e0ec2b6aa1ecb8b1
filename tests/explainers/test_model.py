"""Loading the replica, and the one recorded forward pass the cache and fidelity rely on."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from explainers.model import ATTN_IMPLEMENTATION, LoadedModel, forward_with_hidden_states, load_model, readout_log_probs


def test_load_model_freezes_the_weights_and_hashes_them(tiny_model_dir: Path) -> None:
    loaded = load_model(tiny_model_dir)

    assert not loaded.model.training
    assert not any(parameter.requires_grad for parameter in loaded.model.parameters())
    assert loaded.model.config._attn_implementation == ATTN_IMPLEMENTATION
    assert loaded.dtype == torch.float32
    assert (loaded.num_layers, loaded.vocab_size, loaded.max_positions) == (2, 64, 64)
    assert loaded.tokenizer.decode([7]) == "w7"
    # Without a manifest: sha256 over `sha256sum`-style lines of the safetensors files, as the model builder writes.
    weights = tiny_model_dir / "model.safetensors"
    line = f"{hashlib.sha256(weights.read_bytes()).hexdigest()}  model.safetensors\n"
    assert loaded.weights_digest == hashlib.sha256(line.encode()).hexdigest()
    assert loaded.model_name == tiny_model_dir.name


def test_load_model_takes_identity_from_the_manifest(tiny_model_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    manifest = {"weights_digest": "0123abcd", "model_name": "tiny-served"}
    (model_dir / "sightline_manifest.json").write_text(json.dumps(manifest))

    loaded = load_model(model_dir, dtype=torch.float64)

    assert (loaded.weights_digest, loaded.model_name) == ("0123abcd", "tiny-served")
    assert loaded.dtype == torch.float64


def test_recorded_hidden_states_are_layer_outputs_before_the_final_norm(
    tiny_model: LoadedModel, token_ids: torch.Tensor
) -> None:
    recorded = forward_with_hidden_states(tiny_model, token_ids)
    with torch.no_grad():
        reference = tiny_model.model(input_ids=token_ids[None], output_hidden_states=True)
    hf_states = torch.cat(reference.hidden_states)

    assert recorded.hidden_states.shape == (3, len(token_ids), 32)
    assert recorded.recorded is None
    # Embedding output and inner layers agree with transformers' own hidden states (the layers run as
    # explainers.backprop writes them, so to float64 rounding) ...
    torch.testing.assert_close(recorded.hidden_states[:-1], hf_states[:-1], rtol=0, atol=1e-12)
    # ... but transformers' last entry is after the final norm; ours is the raw last-layer output.
    assert not torch.allclose(recorded.hidden_states[-1], hf_states[-1])
    with torch.no_grad():
        torch.testing.assert_close(tiny_model.final_norm(recorded.hidden_states[-1]), hf_states[-1])
        readout = readout_log_probs(tiny_model, recorded.hidden_states[-1])
    torch.testing.assert_close(readout, torch.log_softmax(reference.logits[0], dim=-1))


def test_a_recorded_forward_pass_keeps_the_same_states_and_the_backward_pass_inputs(
    tiny_model: LoadedModel, token_ids: torch.Tensor
) -> None:
    plain = forward_with_hidden_states(tiny_model, token_ids)
    recorded = forward_with_hidden_states(tiny_model, token_ids, record=True)

    torch.testing.assert_close(recorded.hidden_states, plain.hidden_states, rtol=0, atol=0)
    assert recorded.recorded is not None
    assert len(recorded.recorded.records) == tiny_model.num_layers
    torch.testing.assert_close(recorded.recorded.final_residual[0], plain.hidden_states[-1], rtol=0, atol=0)
