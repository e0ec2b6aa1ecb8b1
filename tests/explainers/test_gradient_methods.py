"""Saliency, integrated gradients, layer integrated gradients and gradient x activation against from-scratch
per-target computations and Captum; completeness, linearity in contrastive targets, and forward_from_layer."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients as CaptumIntegratedGradients
from captum.attr import LayerGradientXActivation as CaptumLayerGradientXActivation
from captum.attr import LayerIntegratedGradients as CaptumLayerIntegratedGradients
from captum.attr import Saliency as CaptumSaliency
from captum.attr._utils.approximation_methods import approximation_parameters
from sightline.v1 import types_pb2

from explainers.methods import gradients
from explainers.methods.base import AttributionContext, AttributionMethod, InvalidParamsError
from explainers.methods.gradient_x_activation import GradientXActivation
from explainers.methods.input_x_gradient import InputXGradient
from explainers.methods.integrated_gradients import IntegratedGradients
from explainers.methods.layer_integrated_gradients import LayerIntegratedGradients
from explainers.methods.saliency import Saliency
from explainers.model import LoadedModel, forward_from_layer
from explainers.targets import Targets, target_scores

ReadTensor = Callable[[types_pb2.Tensor], np.ndarray]
MakeContext = Callable[[LoadedModel], AttributionContext]
# The attributions [num_tokens] of the target at a position, computed on their own.
RowOf = Callable[[AttributionContext, int], torch.Tensor]

# Results cross the wire as float32, and everything else is float64 (the tiny model's norms included, see
# Float64RMSNorm): the attributions agree with Captum and the per-target references to float32's precision.
# Chunked and unchunked are identical.
TOLERANCE = 2e-7


def assert_matches(
    actual: np.ndarray, expected: np.ndarray, scale: float | None = None, tolerance: float = TOLERANCE
) -> None:
    """actual == expected to tolerance times scale (default: the largest |expected|)."""
    scale = float(np.abs(expected).max()) if scale is None else scale
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tolerance * scale)


@pytest.fixture
def ctx(tiny_model: LoadedModel, make_context: MakeContext) -> AttributionContext:
    return make_context(tiny_model)


def run(
    method: AttributionMethod[Any], ctx: AttributionContext, read_tensor: ReadTensor, **params: object
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(attributions, extras) of one method on ctx."""
    result = method.attribute(ctx, method.parse_params(params))
    assert result.attributions.dtype == types_pb2.DTYPE_FLOAT32
    return read_tensor(result.attributions), {name: read_tensor(extra) for name, extra in result.extras.items()}


# --- from-scratch references: the full model from token ids, one target at a time ---


def layer_module(loaded: LoadedModel, layer: int) -> torch.nn.Module:
    """The module whose output is hidden_states[layer]."""
    return loaded.input_embeddings if layer == 0 else loaded.decoder_layers[layer - 1]


def score_with_layer_output(ctx: AttributionContext, layer: int, states: torch.Tensor, position: int) -> torch.Tensor:
    """log p(token at position) [batch] from full forward passes over the token ids in which the output of `layer`
    is replaced by states [batch, num_tokens, hidden]."""
    handle = layer_module(ctx.loaded, layer).register_forward_hook(lambda _module, _args, _output: states)
    try:
        logits: torch.Tensor = ctx.loaded.model(input_ids=ctx.token_ids.expand(len(states), -1)).logits[:, position - 1]
    finally:
        handle.remove()
    return torch.log_softmax(logits, dim=-1)[:, ctx.token_ids[position]]


def layer_gradient(ctx: AttributionContext, layer: int, states: torch.Tensor, position: int) -> torch.Tensor:
    """d log p(token at position) / d states, batch row by batch row: [batch, num_tokens, hidden]."""
    states = states.detach().requires_grad_(True)
    with torch.enable_grad():
        (gradient,) = torch.autograd.grad(score_with_layer_output(ctx, layer, states, position).sum(), states)
    return gradient


def repeated_token_states(ctx: AttributionContext, layer: int, token: int) -> torch.Tensor:
    """transformers' own hidden state at an inner layer of a sequence repeating one token: [1, num_tokens, hidden]."""
    with torch.no_grad():
        output = ctx.loaded.model(input_ids=torch.full_like(ctx.token_ids, token)[None], output_hidden_states=True)
    states: torch.Tensor = output.hidden_states[layer]
    return states


def per_target_rows(ctx: AttributionContext, row_of: RowOf) -> np.ndarray:
    rows = np.zeros((len(ctx.targets), len(ctx.token_ids) - 1))
    for row, position in enumerate(ctx.targets.positions.tolist()):
        rows[row, :position] = row_of(ctx, position)[:position].numpy()
    return rows


def saliency_row(ctx: AttributionContext, position: int) -> torch.Tensor:
    gradient = layer_gradient(ctx, 0, ctx.loaded.embed(ctx.token_ids), position)
    norms: torch.Tensor = torch.linalg.vector_norm(gradient, dim=-1)[0]
    return norms


def gradient_x_activation_row(layer: int) -> RowOf:
    def row_of(ctx: AttributionContext, position: int) -> torch.Tensor:
        states = ctx.hidden_states[layer][None]
        return (layer_gradient(ctx, layer, states, position) * states).sum(dim=-1)[0]

    return row_of


def integrated_gradients_row(layer: int, baseline_token: int | None, steps: int, quadrature: str) -> RowOf:
    """Integrated gradients to hidden_states[layer] from zero (baseline_token None) or from the states of a
    repeated token, with Captum's quadrature."""
    step_sizes, alphas = approximation_parameters(quadrature)

    def row_of(ctx: AttributionContext, position: int) -> torch.Tensor:
        inputs = ctx.hidden_states[layer][None]
        if baseline_token is None:
            baselines = torch.zeros_like(inputs)
        else:
            baselines = repeated_token_states(ctx, layer, baseline_token)
        path = baselines + torch.tensor(alphas(steps), dtype=torch.float64)[:, None, None] * (inputs - baselines)
        gradients = layer_gradient(ctx, layer, path, position)
        weighted = (torch.tensor(step_sizes(steps), dtype=torch.float64)[:, None, None] * gradients).sum(dim=0)
        return (weighted * (inputs - baselines)[0]).sum(dim=-1)

    return row_of


# --- forward_from_layer ---


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_forward_from_a_cached_layer_reproduces_the_full_forward(ctx: AttributionContext, layer: int) -> None:
    states = ctx.hidden_states[layer][None]
    with torch.no_grad():
        full = target_scores(ctx.loaded, ctx.loaded.embed(ctx.token_ids), ctx.targets)
        # Row 1 is off the model's own trajectory: batching, positions and causal masking must still hold.
        from_layer = forward_from_layer(ctx.loaded, torch.cat([states, 0.5 * states]), layer, ctx.targets)
        scaled = torch.stack(
            [score_with_layer_output(ctx, layer, 0.5 * states, position)[0] for position in ctx.targets.positions]
        )
    # Measured: equal, or 4e-16 apart.
    torch.testing.assert_close(from_layer[0], full[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(from_layer[1], scaled, rtol=0, atol=1e-10)


# --- every gradient method against one from-scratch forward and backward pass per target ---

METHOD_CASES = [
    pytest.param(Saliency(), {}, saliency_row, id="saliency"),
    *(
        pytest.param(GradientXActivation(), {"layer": layer}, gradient_x_activation_row(layer), id=f"gxa-{layer}")
        # Not the last layer: the final RMSNorm makes a score blind to its state's scale, so it is ~0 there.
        for layer in (0, 1)
    ),
    pytest.param(
        IntegratedGradients(),
        {"baseline": "zero", "steps": 8, "quadrature": "riemann_middle"},
        integrated_gradients_row(0, None, 8, "riemann_middle"),
        id="ig-zero",
    ),
    pytest.param(
        IntegratedGradients(),
        {"baseline_token_id": 5, "steps": 8, "internal_batch_size": 3},
        integrated_gradients_row(0, 5, 8, "gausslegendre"),
        id="ig-token",
    ),
    pytest.param(
        LayerIntegratedGradients(),
        {"layer": 1, "baseline_token_id": 5, "steps": 8, "quadrature": "riemann_right"},
        integrated_gradients_row(1, 5, 8, "riemann_right"),
        id="lig-1-token",
    ),
    pytest.param(
        LayerIntegratedGradients(),
        {"layer": 2, "baseline": "zero", "steps": 8, "quadrature": "riemann_trapezoid"},
        integrated_gradients_row(2, None, 8, "riemann_trapezoid"),
        id="lig-2-zero",
    ),
]


@pytest.mark.parametrize(("method", "params", "row_of"), METHOD_CASES)
def test_batched_targets_equal_one_pass_per_target(
    ctx: AttributionContext,
    read_tensor: ReadTensor,
    method: AttributionMethod[Any],
    params: dict[str, object],
    row_of: RowOf,
) -> None:
    attributions, _ = run(method, ctx, read_tensor, **params)
    reference = per_target_rows(ctx, row_of)

    assert attributions.shape == (8, 13)
    assert np.abs(reference).max() > 0.1  # the comparison is not between near-zero matrices
    assert_matches(attributions, reference)
    for row, position in enumerate(ctx.targets.positions.tolist()):
        assert np.all(attributions[row, position:] == 0.0)


CHUNKED_CASES = [
    pytest.param(Saliency(), {}, id="saliency"),
    pytest.param(GradientXActivation(), {"layer": 1}, id="gxa"),
    pytest.param(IntegratedGradients(), {"steps": 8}, id="ig"),
    pytest.param(LayerIntegratedGradients(), {"layer": 1, "steps": 8}, id="lig"),
]


@pytest.mark.parametrize(("method", "params"), CHUNKED_CASES)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_chunked_equals_unchunked(
    ctx: AttributionContext,
    read_tensor: ReadTensor,
    method: AttributionMethod[Any],
    params: dict[str, object],
    batch_size: int,
) -> None:
    # internal_batch_size chunks the path points of the integrated gradients.
    point_batches = {"internal_batch_size": batch_size} if "steps" in params else {}
    unchunked, unchunked_extras = run(method, ctx, read_tensor, **params, target_batch_size=1024)
    chunked, chunked_extras = run(method, ctx, read_tensor, **params, **point_batches, target_batch_size=batch_size)
    assert_matches(chunked, unchunked)
    for name, extra in unchunked_extras.items():
        assert_matches(chunked_extras[name], extra)


def test_gradient_x_activation_at_layer_0_is_input_x_gradient(ctx: AttributionContext, read_tensor: ReadTensor) -> None:
    at_embeddings, _ = run(GradientXActivation(), ctx, read_tensor, layer=0)
    input_x_gradient, _ = run(InputXGradient(), ctx, read_tensor)
    assert_matches(at_embeddings, input_x_gradient)


@pytest.mark.parametrize("baseline", ["token", "zero"])
def test_layer_integrated_gradients_at_layer_0_are_integrated_gradients(
    ctx: AttributionContext, read_tensor: ReadTensor, baseline: str
) -> None:
    layer_0, layer_extras = run(LayerIntegratedGradients(), ctx, read_tensor, layer=0, baseline=baseline, steps=8)
    inputs, input_extras = run(IntegratedGradients(), ctx, read_tensor, baseline=baseline, steps=8)
    assert_matches(layer_0, inputs)
    assert_matches(layer_extras["convergence_delta"], input_extras["convergence_delta"])


def test_plan_chunks_covers_every_target_once_within_its_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gradients, "MAX_GROUP_ROWS", 600)
    positions = torch.arange(40, 70)
    points = 2

    groups = gradients.plan_chunks(positions, target_batch_size=8, num_points=points)

    chunks = [chunk for group in groups for chunk in group]
    assert [chunk.start for chunk in chunks] == [0] + [chunk.stop for chunk in chunks[:-1]]
    assert chunks[-1].stop == len(positions)

    def rows(chunk: slice) -> int:
        return int(chunk.stop - chunk.start) * points * int(positions[chunk.stop - 1])

    for group in groups:
        assert group[-1].stop - group[0].start <= 8
        assert len(group) == 1 or sum(map(rows, group)) <= 600
        # A chunk closes at CHUNK_ROWS rows, or where its group ends.
        for chunk in group[:-1]:
            assert rows(chunk) >= gradients.CHUNK_ROWS
            assert rows(slice(chunk.start, chunk.stop - 1)) < gradients.CHUNK_ROWS


def test_gradients_leave_torch_threads_as_they_found_them(
    ctx: AttributionContext, read_tensor: ReadTensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The chunks run one thread per op; the caller's setting must come back, also when a chunk fails.
    before = torch.get_num_threads()
    assert before > 1  # the package's fixture: otherwise this test could not fail
    run(Saliency(), ctx, read_tensor)
    assert torch.get_num_threads() == before

    def failing_backward(*args: object) -> list[torch.Tensor]:
        assert torch.get_num_threads() == 1
        raise RuntimeError("chunk failed")

    monkeypatch.setattr(gradients, "backward_to_layer", failing_backward)
    with pytest.raises(RuntimeError, match="chunk failed"):
        run(Saliency(), ctx, read_tensor)
    assert torch.get_num_threads() == before


# --- agreement with Captum, one target at a time ---


def captum_attributions(ctx: AttributionContext, method: str, target: int) -> torch.Tensor:
    """Captum's attributions [1, num_tokens, hidden] for one target."""
    position = int(ctx.targets.positions[target])

    def score(inputs: torch.Tensor) -> torch.Tensor:
        given = {"inputs_embeds": inputs} if inputs.is_floating_point() else {"input_ids": inputs}
        logits: torch.Tensor = ctx.loaded.model(**given).logits[:, position - 1]
        return torch.log_softmax(logits, dim=-1)[:, ctx.token_ids[position]]

    ids, baseline_ids = ctx.token_ids[None], torch.full_like(ctx.token_ids[None], 5)
    embeddings = ctx.loaded.embed(ctx.token_ids)
    attributions: torch.Tensor
    if method == "saliency":
        # abs=False gives the raw gradient; ours is its L2 norm over the hidden dimension.
        attributions = CaptumSaliency(score).attribute(embeddings.requires_grad_(True), abs=False)
    elif method == "ig-zero":
        ig = CaptumIntegratedGradients(score)
        attributions = ig.attribute(embeddings, torch.zeros_like(embeddings), n_steps=16, method="riemann_left")
    elif method == "ig-token":
        # Captum's usual language-model set-up: LIG on the embedding layer, from baseline token ids.
        lig = CaptumLayerIntegratedGradients(score, ctx.loaded.input_embeddings)
        attributions = lig.attribute(ids, baseline_ids, n_steps=16)
    elif method == "lig-token":
        lig = CaptumLayerIntegratedGradients(score, ctx.loaded.decoder_layers[0])
        attributions = lig.attribute(ids, baseline_ids, n_steps=16, method="riemann_middle")
    elif method == "lig-zero":
        # Captum's LIG derives a layer's baseline from baseline inputs, which cannot give a zero state; this is the
        # integral it would then take: Captum's IG through the same output-replacing hook.
        states = ctx.hidden_states[1][None]
        ig = CaptumIntegratedGradients(lambda path: score_with_layer_output(ctx, 1, path, position))
        attributions = ig.attribute(states, torch.zeros_like(states), n_steps=16, method="riemann_trapezoid")
    else:
        assert method == "gxa"
        attributions = CaptumLayerGradientXActivation(score, ctx.loaded.decoder_layers[0]).attribute(ids)
    return attributions.detach()


CAPTUM_CASES = [
    pytest.param(Saliency(), {}, "saliency", id="saliency"),
    pytest.param(IntegratedGradients(), {"baseline": "zero", "quadrature": "riemann_left"}, "ig-zero", id="ig-zero"),
    pytest.param(IntegratedGradients(), {"baseline_token_id": 5}, "ig-token", id="ig-token"),
    pytest.param(
        LayerIntegratedGradients(),
        {"layer": 1, "baseline_token_id": 5, "quadrature": "riemann_middle"},
        "lig-token",
        id="lig-token",
    ),
    pytest.param(
        LayerIntegratedGradients(),
        {"layer": 1, "baseline": "zero", "quadrature": "riemann_trapezoid"},
        "lig-zero",
        id="lig-zero",
    ),
    pytest.param(GradientXActivation(), {"layer": 1}, "gxa", id="gxa"),
]


@pytest.mark.parametrize(("method", "params", "captum_method"), CAPTUM_CASES)
def test_agrees_with_captum(
    ctx: AttributionContext,
    read_tensor: ReadTensor,
    method: AttributionMethod[Any],
    params: dict[str, object],
    captum_method: str,
) -> None:
    attributions, _ = run(method, ctx, read_tensor, **params)  # 16 steps, Captum's default n_steps too
    for target in (0, 7):
        captum = captum_attributions(ctx, captum_method, target)[0, :-1]
        per_token = torch.linalg.vector_norm(captum, dim=-1) if captum_method == "saliency" else captum.sum(dim=-1)
        assert_matches(attributions[target], per_token.numpy())


# --- completeness ---


@pytest.mark.parametrize(
    ("method", "layer"),
    [pytest.param(IntegratedGradients(), 0, id="ig"), pytest.param(LayerIntegratedGradients(), 1, id="lig-1")],
)
def test_integrated_gradients_are_complete_and_report_the_gap(
    ctx: AttributionContext, read_tensor: ReadTensor, method: AttributionMethod[Any], layer: int
) -> None:
    layer_param = {"layer": layer} if isinstance(method, LayerIntegratedGradients) else {}
    inputs, baselines = ctx.hidden_states[layer][None], repeated_token_states(ctx, layer, 0)  # the default baseline
    rows = []
    with torch.no_grad():
        for position in ctx.targets.positions.tolist():
            input_score, baseline_score = score_with_layer_output(ctx, layer, torch.cat([inputs, baselines]), position)
            rows.append(float(input_score - baseline_score))
    difference = np.array(rows)
    assert np.abs(difference).min() > 0.01

    def gap(steps: int, quadrature: str) -> np.ndarray:
        # All points in one forward pass: the fastest way through 128 of them on the tiny model.
        attributions, extras = run(
            method, ctx, read_tensor, **layer_param, steps=steps, quadrature=quadrature, internal_batch_size=steps
        )
        delta = extras["convergence_delta"]
        # Positions at and after a target have no gradient, so the reported rows hold the whole sum.
        assert_matches(delta, attributions.astype(np.float64).sum(axis=-1) - difference, scale=np.abs(difference).max())
        return abs(delta)

    assert np.all(gap(64, "riemann_trapezoid") < gap(8, "riemann_trapezoid"))
    assert np.all(gap(128, "gausslegendre") < 1e-3 * np.abs(difference))


# --- contrastive targets ---


@pytest.mark.parametrize(
    ("method", "params"),
    [
        pytest.param(InputXGradient(), {}, id="ixg"),
        pytest.param(IntegratedGradients(), {"steps": 8}, id="ig"),
        pytest.param(LayerIntegratedGradients(), {"layer": 1, "steps": 8}, id="lig"),
        pytest.param(GradientXActivation(), {"layer": 1}, id="gxa"),
    ],
)
def test_contrastive_attributions_are_the_difference_of_the_plain_ones(
    ctx: AttributionContext, read_tensor: ReadTensor, method: AttributionMethod[Any], params: dict[str, object]
) -> None:
    # Saliency is left out: a norm is not linear in the score.
    foils = torch.tensor([11, 12, 13, 14, 15, 16, 17, 18])
    contrast = dataclasses.replace(ctx, targets=dataclasses.replace(ctx.targets, foil_ids=foils))
    foil_only = dataclasses.replace(ctx, targets=Targets(ctx.targets.positions, foils, foil_ids=None))

    contrastive, contrastive_extras = run(method, contrast, read_tensor, **params)
    token, token_extras = run(method, ctx, read_tensor, **params)
    foil, foil_extras = run(method, foil_only, read_tensor, **params)

    assert_matches(contrastive, token - foil, scale=max(np.abs(token).max(), np.abs(foil).max()))
    for name, extra in contrastive_extras.items():
        assert_matches(
            extra,
            token_extras[name] - foil_extras[name],
            scale=max(np.abs(token_extras[name]).max(), np.abs(foil_extras[name]).max()),
        )


# --- parameters ---


def test_layers_beyond_the_model_and_baseline_tokens_beyond_the_vocabulary_are_refused(ctx: AttributionContext) -> None:
    layer_methods: tuple[AttributionMethod[Any], ...] = (GradientXActivation(), LayerIntegratedGradients())
    for layer_method in layer_methods:
        with pytest.raises(InvalidParamsError, match=r"'layer' .* must be in 0\.\.2 for this model, got 3"):
            layer_method.attribute(ctx, layer_method.parse_params({"layer": 3}))
    ig = IntegratedGradients()
    with pytest.raises(InvalidParamsError, match=r"'baseline_token_id' .* below the vocabulary size 64, got 64"):
        ig.attribute(ctx, ig.parse_params({"baseline_token_id": 64}))
    with pytest.raises(InvalidParamsError, match="must be one of gausslegendre, riemann_trapezoid"):
        ig.parse_params({"quadrature": "simpson"})
