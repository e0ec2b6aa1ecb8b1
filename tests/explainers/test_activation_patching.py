"""Activation patching against a direct intervention written with nnsight on the float64 tiny Llama (the corrupted
run with one clean state put back, for every layer and position), and its axioms: restoring the state a score
reads brings the clean score back, restoring an untouched input changes nothing."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pytest
import torch
from nnsight import NNsight
from sightline.v1 import types_pb2

from explainers.methods import activation_patching
from explainers.methods.activation_patching import ActivationPatching
from explainers.methods.base import AttributionContext, InvalidParamsError
from explainers.model import LoadedModel

ReadTensor = Callable[[types_pb2.Tensor], np.ndarray]
MakeContext = Callable[[LoadedModel], AttributionContext]
# The recovered scores are differences of float64 log-probabilities, sent as float32.
TOLERANCE = 1e-6


@pytest.fixture
def ctx(tiny_model: LoadedModel, make_context: MakeContext) -> AttributionContext:
    return make_context(tiny_model)


def run(ctx: AttributionContext, read_tensor: ReadTensor, **params: object) -> dict[str, np.ndarray]:
    method = ActivationPatching()
    result = method.attribute(ctx, method.parse_params(params))
    return {"attributions": read_tensor(result.attributions)} | {
        name: read_tensor(extra) for name, extra in result.extras.items()
    }


def nnsight_recovered(ctx: AttributionContext, first_layer: torch.Tensor) -> torch.Tensor:
    """recovered [num_layers + 1, num_targets, num_tokens] by intervention: the model run from the corrupted
    first-layer states first_layer [1, num_tokens, hidden], with the clean state at (layer, position) written over
    the first decoder layer's input (layer 0) or decoder layer l's output, one trace each."""
    # A copy: nnsight instruments the modules it wraps, and the tiny model is shared by the session's tests.
    model = NNsight(copy.deepcopy(ctx.loaded.model))
    targets = ctx.targets
    num_tokens = len(ctx.token_ids)

    def scores(logits: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(logits[0, targets.predicting_positions], dim=-1)
        chosen: torch.Tensor = log_probs.gather(-1, targets.token_ids[:, None])[:, 0]
        return chosen

    with torch.no_grad(), model.trace(inputs_embeds=first_layer):
        corrupted_logits = model.output.logits.save()
    corrupted = scores(corrupted_logits)
    recovered = torch.zeros(ctx.loaded.num_layers + 1, len(targets), num_tokens, dtype=torch.float64)
    for layer in range(ctx.loaded.num_layers + 1):
        clean = ctx.hidden_states[layer]
        for position in range(num_tokens):
            # A copy: at layer 0 the write lands in the very tensor passed in.
            with torch.no_grad(), model.trace(inputs_embeds=first_layer.clone()):
                if layer == 0:
                    model.model.layers[0].input[0, position] = clean[position]
                else:
                    model.model.layers[layer - 1].output[0, position] = clean[position]
                logits = model.output.logits.save()
            recovered[layer, :, position] = scores(logits) - corrupted
    return recovered


def prefix(maps: torch.Tensor, ctx: AttributionContext) -> np.ndarray:
    sources = torch.arange(maps.shape[-1] - 1)
    kept: np.ndarray = torch.where(sources < ctx.targets.positions[:, None], maps[..., :-1], 0.0).numpy()
    return kept


def test_token_corruption_equals_the_nnsight_intervention(ctx: AttributionContext, read_tensor: ReadTensor) -> None:
    result = run(ctx, read_tensor, corruption="token", corrupt_start=1, corrupt_stop=4, replacement_token_id=7)
    corrupted_ids = ctx.token_ids.clone()
    corrupted_ids[1:4] = 7
    expected = nnsight_recovered(ctx, ctx.loaded.embed(corrupted_ids))
    np.testing.assert_allclose(result["recovered"], prefix(expected, ctx), rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(result["attributions"], prefix(expected, ctx).max(axis=0), rtol=0, atol=TOLERANCE)


def test_noise_corruption_equals_the_nnsight_intervention(ctx: AttributionContext, read_tensor: ReadTensor) -> None:
    result = run(ctx, read_tensor, corrupt_stop=3, samples=2, seed=5, noise_scale=2.0)
    # The noise as the method documents it: draws from a generator seeded with `seed`, scaled by noise_scale
    # standard deviations of the first-layer states, on the corrupted positions.
    clean = ctx.hidden_states[0]
    noise = torch.randn((2, 3, clean.shape[-1]), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    expected = []
    for draw in noise:
        first_layer = clean.clone()
        first_layer[:3] += 2.0 * clean.std() * draw
        expected.append(nnsight_recovered(ctx, first_layer[None]))
    np.testing.assert_allclose(result["recovered"], prefix(torch.stack(expected).mean(dim=0), ctx), atol=TOLERANCE)


def test_restoring_what_a_score_reads_brings_it_back_and_restoring_an_untouched_input_changes_nothing(
    ctx: AttributionContext, read_tensor: ReadTensor
) -> None:
    result = run(ctx, read_tensor, corrupt_stop=4, samples=3)
    recovered = result["recovered"]
    last_layer = recovered[-1]
    lost = result["clean_scores"] - result["corrupted_scores"]
    assert np.abs(lost).max() > 1e-2  # the corruption matters
    for target, position in enumerate(ctx.targets.predicting_positions.tolist()):
        np.testing.assert_allclose(last_layer[target, position], lost[target], rtol=0, atol=TOLERANCE)
    # First-layer states past the corrupted ones are the clean run's already: to the rounding of a batched pass.
    np.testing.assert_allclose(recovered[0][:, 4:], 0.0, rtol=0, atol=1e-12)


def test_an_empty_or_out_of_range_corruption_is_refused(ctx: AttributionContext) -> None:
    method = ActivationPatching()
    for params in ({"corrupt_start": 6}, {"corrupt_start": 2, "corrupt_stop": 15}):
        with pytest.raises(InvalidParamsError, match=r"needs corrupt_start < corrupt_stop <= 14"):
            method.attribute(ctx, method.parse_params(params))


def test_batching_never_changes_a_score(
    ctx: AttributionContext, read_tensor: ReadTensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    together = run(ctx, read_tensor, corrupt_stop=4, samples=2)
    monkeypatch.setattr(activation_patching, "MAX_PASS_ROWS", 1)
    one_at_a_time = run(ctx, read_tensor, corrupt_stop=4, samples=2)
    np.testing.assert_allclose(one_at_a_time["recovered"], together["recovered"], rtol=0, atol=1e-7)


@pytest.mark.parametrize(("positions", "num_tokens", "runs"), [(13, 14, 1), (44, 45, 4), (300, 301, 4), (5, 4000, 2)])
def test_the_fast_paths_passes_restore_every_position_once_within_the_pass_budget(
    positions: int, num_tokens: int, runs: int
) -> None:
    chunks = activation_patching.restored_chunks(positions, num_tokens, runs)
    assert [start for start, _ in chunks] == [0, *(stop for _, stop in chunks[:-1])]
    assert chunks[-1][1] == positions
    for start, stop in chunks:
        computed = runs * (stop - start) * (num_tokens - start)
        assert stop - start == 1 or computed <= activation_patching.MAX_PASS_ROWS
    # Passes from later starts compute less: fewer positions than one pass per run over the whole sequence.
    computed = sum(runs * (stop - start) * (num_tokens - start) for start, stop in chunks)
    assert computed < runs * positions * num_tokens
