"""Gradient SHAP against Captum's GradientShap with the same seed, and its own bookkeeping: batching never changes
the result, the seed does, and convergence_delta is exactly the completeness gap."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from captum.attr import GradientShap as CaptumGradientShap
from sightline.v1 import types_pb2

from explainers.methods.base import AttributionContext
from explainers.methods.gradient_shap import GradientShap
from explainers.methods.integrated_gradients import IntegratedGradients
from explainers.model import LoadedModel, forward_from_layer

ReadTensor = Callable[[types_pb2.Tensor], np.ndarray]
MakeContext = Callable[[LoadedModel], AttributionContext]

# Float64 throughout the tiny model (see tests/explainers/conftest.py); results cross the wire as float32.
TOLERANCE = 2e-7


@pytest.fixture
def ctx(tiny_model: LoadedModel, make_context: MakeContext) -> AttributionContext:
    return make_context(tiny_model)


def run(ctx: AttributionContext, read_tensor: ReadTensor, **params: object) -> tuple[np.ndarray, np.ndarray]:
    """(attributions, convergence_delta)."""
    method = GradientShap()
    result = method.attribute(ctx, method.parse_params(params))
    return read_tensor(result.attributions), read_tensor(result.extras["convergence_delta"])


def captum_gradient_shap(ctx: AttributionContext, target: int, baseline: torch.Tensor, **kwargs: object) -> np.ndarray:
    """Captum's per-token attributions [num_tokens - 1] for one target, after seeding both global generators."""
    position = int(ctx.targets.positions[target])

    def score(inputs: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = ctx.loaded.model(inputs_embeds=inputs).logits[:, position - 1]
        return torch.log_softmax(logits, dim=-1)[:, ctx.token_ids[position]]

    seed = int(kwargs.pop("seed"))  # type: ignore[call-overload]
    torch.manual_seed(seed)
    np.random.seed(seed)
    embeddings = ctx.loaded.embed(ctx.token_ids)
    attributions = CaptumGradientShap(score).attribute(embeddings, baseline, **kwargs)
    result: np.ndarray = attributions.detach().sum(dim=-1)[0, :-1].numpy()
    return result


def token_baseline(ctx: AttributionContext, token_id: int) -> torch.Tensor:
    return ctx.loaded.embed(torch.full_like(ctx.token_ids, token_id))


@pytest.mark.parametrize(
    ("params", "captum"),
    [
        pytest.param({"baseline": "zero", "samples": 6, "seed": 3}, {"n_samples": 6, "seed": 3}, id="zero"),
        pytest.param(
            {"baseline_token_id": 5, "samples": 5, "stdev": 0.2, "seed": 11},
            {"n_samples": 5, "stdevs": 0.2, "seed": 11},
            id="token-noisy",
        ),
    ],
)
def test_agrees_with_captum(
    ctx: AttributionContext, read_tensor: ReadTensor, params: dict[str, object], captum: dict[str, object]
) -> None:
    attributions, _ = run(ctx, read_tensor, **params)
    embeddings = ctx.loaded.embed(ctx.token_ids)
    baseline = torch.zeros_like(embeddings) if params.get("baseline") == "zero" else token_baseline(ctx, 5)
    scale = float(np.abs(attributions).max())
    assert scale > 0
    for target in (0, 3, len(ctx.targets) - 1):
        expected = captum_gradient_shap(ctx, target, baseline, **dict(captum))
        np.testing.assert_allclose(attributions[target], expected, rtol=0, atol=TOLERANCE * scale)


def test_batching_never_changes_the_result(ctx: AttributionContext, read_tensor: ReadTensor) -> None:
    together, delta_together = run(ctx, read_tensor, samples=7, stdev=0.1, seed=2)
    one_by_one, delta_one_by_one = run(ctx, read_tensor, samples=7, stdev=0.1, seed=2, internal_batch_size=1)
    two_targets_at_once, _ = run(ctx, read_tensor, samples=7, stdev=0.1, seed=2, target_batch_size=2)
    np.testing.assert_allclose(one_by_one, together, rtol=0, atol=1e-7)
    np.testing.assert_allclose(two_targets_at_once, together, rtol=0, atol=1e-7)
    np.testing.assert_allclose(delta_one_by_one, delta_together, rtol=0, atol=1e-7)


def test_the_seed_decides_the_samples(ctx: AttributionContext, read_tensor: ReadTensor) -> None:
    first, _ = run(ctx, read_tensor, samples=4, seed=1)
    again, _ = run(ctx, read_tensor, samples=4, seed=1)
    other, _ = run(ctx, read_tensor, samples=4, seed=2)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-4


def test_convergence_delta_is_the_completeness_gap(ctx: AttributionContext, read_tensor: ReadTensor) -> None:
    # Summed over every position, as the method sums before zeroing a target's own and later positions (which have
    # no gradient anyway): the gap between the attributions' sum and the score difference from the baseline.
    attributions, delta = run(ctx, read_tensor, baseline_token_id=5, samples=32)
    embeddings = ctx.loaded.embed(ctx.token_ids)
    with torch.no_grad():
        scores, baseline_scores = forward_from_layer(
            ctx.loaded, torch.cat([embeddings, token_baseline(ctx, 5)]), 0, ctx.targets
        )
    gap = attributions.sum(axis=-1) - (scores - baseline_scores).numpy()
    np.testing.assert_allclose(delta, gap, rtol=0, atol=1e-6 * float((scores - baseline_scores).abs().max()))


def test_without_noise_it_is_integrated_gradients_by_monte_carlo(
    ctx: AttributionContext, read_tensor: ReadTensor
) -> None:
    # Uniform places on the straight path: the expectation is the path integral integrated gradients takes, so
    # the sample mean closes in on it as samples grow (a fixed seed makes this deterministic).
    method = IntegratedGradients()
    reference = read_tensor(method.attribute(ctx, method.parse_params({"steps": 64})).attributions)
    few, _ = run(ctx, read_tensor, samples=4, seed=0)
    many, _ = run(ctx, read_tensor, samples=256, seed=0)
    error_few, error_many = np.abs(few - reference).max(), np.abs(many - reference).max()
    assert error_many < error_few / 3, (error_few, error_many)
