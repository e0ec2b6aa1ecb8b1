"""The hand-written forward and backward passes against autograd through transformers' own module (the general
path's hooks put the states in at a layer)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from explainers import general_path
from explainers.architectures import ExplainPath
from explainers.backprop import Seeds, backward_to_layer, record_forward
from explainers.model import LoadedModel, load_model


def module_residual(loaded: LoadedModel, states: torch.Tensor, layer: int) -> torch.Tensor:
    """The last decoder layer's output from states at `layer`, through transformers' own module; differentiable."""
    return general_path.final_residual(loaded.model, loaded.decoder_layers, loaded.final_norm, states, layer)


def path_states(loaded: LoadedModel, token_ids: torch.Tensor, layer: int) -> torch.Tensor:
    """Three distinct batch rows [3, num_tokens, hidden] at `layer`: transformers' states, scaled and shifted."""
    with torch.no_grad():
        states = loaded.model(input_ids=token_ids[None], output_hidden_states=True).hidden_states[layer]
    return torch.cat([states, 0.5 * states, states + 0.1])


@pytest.mark.parametrize("layer", [0, 1])
def test_record_forward_runs_the_layers_as_transformers_does(
    tiny_model: LoadedModel, token_ids: torch.Tensor, layer: int
) -> None:
    states = path_states(tiny_model, token_ids, layer)

    recorded = record_forward(tiny_model, states, layer)

    with torch.no_grad():
        expected = module_residual(tiny_model, states, layer)
    torch.testing.assert_close(recorded.final_residual, expected, rtol=0, atol=1e-12)
    assert len(recorded.records) == tiny_model.num_layers - layer


@pytest.mark.parametrize("layer", [0, 1, 2])
@pytest.mark.parametrize("prefix", [1, 5, 14])
def test_backward_is_autograds_vector_jacobian_product(
    tiny_model: LoadedModel, token_ids: torch.Tensor, layer: int, prefix: int
) -> None:
    states = path_states(tiny_model, token_ids, layer)
    generator = torch.Generator().manual_seed(prefix)
    # Two cotangents per batch row, dense over the prefix (not only one position, as a score's would be).
    cotangents = torch.randn(2, *states[:, :prefix].shape, generator=generator, dtype=states.dtype)

    # The same cotangents twice, in chunks of two prefixes: a chunk's length is its own.
    short = cotangents[:, :, : max(prefix - 2, 1)].clone()
    gradients, short_gradients = backward_to_layer(record_forward(tiny_model, states, layer), [cotangents, short])

    assert gradients.shape == cotangents.shape
    assert short_gradients.shape == short.shape
    inputs = states.detach().requires_grad_(True)
    with torch.enable_grad():
        residual = module_residual(tiny_model, inputs, layer)
    for chunk, chunk_gradients in ((cotangents, gradients), (short, short_gradients)):
        length = chunk.shape[2]
        for cotangent, gradient in zip(chunk, chunk_gradients, strict=True):
            (expected,) = torch.autograd.grad(residual[:, :length], inputs, cotangent, retain_graph=True)
            # Causality: nothing flows to the positions from the chunk's length on.
            assert torch.all(expected[:, length:] == 0)
            scale = float(expected.abs().max())
            torch.testing.assert_close(gradient, expected[:, :length], rtol=0, atol=1e-12 * scale)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_seeded_chunks_skip_only_zeros(tiny_model: LoadedModel, token_ids: torch.Tensor, layer: int) -> None:
    """Cotangents that are zero but at one position each, given as Seeds, get the gradients their dense form gets:
    the top layer's MLP, output and query projections then run at those positions only."""
    states = path_states(tiny_model, token_ids, layer)
    generator = torch.Generator().manual_seed(layer)
    # Two chunks: positions out of order, one at the chunk's last position, one at the first.
    chunks = [
        Seeds(torch.randn(3, 3, 32, generator=generator, dtype=states.dtype), torch.tensor([4, 0, 9]), 10),
        Seeds(torch.randn(2, 3, 32, generator=generator, dtype=states.dtype), torch.tensor([6, 13]), 14),
    ]
    recorded = record_forward(tiny_model, states, layer)

    seeded = backward_to_layer(recorded, chunks)
    dense = backward_to_layer(recorded, [chunk.dense() for chunk in chunks])

    for seeded_gradients, dense_gradients, chunk in zip(seeded, dense, chunks, strict=True):
        assert seeded_gradients.shape == (len(chunk.positions), 3, chunk.prefix, 32)
        if layer == tiny_model.num_layers:
            torch.testing.assert_close(seeded_gradients, chunk.dense(), rtol=0, atol=0)
        scale = float(dense_gradients.abs().max())
        torch.testing.assert_close(seeded_gradients, dense_gradients, rtol=0, atol=1e-12 * scale)


def test_a_llama_without_a_silu_gated_mlp_takes_the_general_path(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The hand-written backward pass differentiates SiLU gating only: any other activation is explained by autograd
    over the module (explainers.general_path) instead of being refused."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, hidden_act="gelu")
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path)

    assert load_model(tmp_path).path is ExplainPath.GENERAL
    assert load_model(tiny_model_dir).path is ExplainPath.FAST
