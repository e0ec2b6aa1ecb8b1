"""The method registry, parameter parsing, and the two methods against independent computations."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from captum.attr import InputXGradient as CaptumInputXGradient
from sightline.v1 import explanations_pb2, types_pb2

from explainers.hidden_cache import STORAGE_DTYPE
from explainers.methods.base import AttributionContext, InvalidParamsError, ModelShape
from explainers.methods.gradients import EmbeddingGradientParams
from explainers.methods.input_x_gradient import InputXGradient
from explainers.methods.logit_lens import LayerReadout, LogitLens, LogitLensParams
from explainers.methods.registry import UnknownMethodError, all_methods, get_method, method_infos, register
from explainers.model import LoadedModel
from tests.explainers.conftest import REGISTERED_METHODS

ReadTensor = Callable[[types_pb2.Tensor], np.ndarray]
MakeContext = Callable[[LoadedModel], AttributionContext]


# --- registry and parameters ---


def test_registry_lists_input_x_gradient_and_logit_lens_with_their_capabilities() -> None:
    assert {"input_x_gradient", "logit_lens"} <= {method.name for method in all_methods()}
    infos = {info.name: info for info in method_infos()}
    gradient, lens = infos["input_x_gradient"], infos["logit_lens"]
    assert gradient.needs_gradients and gradient.attributes_tokens and not gradient.uses_cache
    assert lens.uses_cache and not lens.needs_gradients and not lens.attributes_tokens
    assert gradient.supports_contrastive_targets and not lens.supports_contrastive_targets
    assert not gradient.multimodal
    (k,) = lens.params
    assert (k.name, k.type, k.default_value) == (
        "k",
        explanations_pb2.PARAM_TYPE_INT,
        types_pb2.ParamValue(int_value=5),
    )
    assert k.description.endswith("Range 1..50 (inclusive).")
    assert (k.minimum, k.maximum) == (1, 50)
    assert [p.default_value for p in gradient.params] == [types_pb2.ParamValue(int_value=64)]


def test_unknown_method_names_the_valid_ones() -> None:
    with pytest.raises(
        UnknownMethodError,
        match="'telepathy'; available methods: " + REGISTERED_METHODS,
    ):
        get_method("telepathy")


def test_registering_a_name_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register(LogitLens())


@pytest.mark.parametrize("method", all_methods(), ids=lambda method: method.name)
def test_param_declarations_match_the_typed_params(method: Any) -> None:
    fields = {field.name: field.type for field in dataclasses.fields(method.params_type)}
    assert fields == {spec.name: spec.type.__name__ for spec in method.params}


def test_parse_params_fills_defaults_and_takes_integral_numbers() -> None:
    assert LogitLens().parse_params({}) == LogitLensParams(k=5)
    # A whole number written as a float (16.0, as JSON clients may send it) is a valid int.
    assert InputXGradient().parse_params({"target_batch_size": 4.0}) == EmbeddingGradientParams(target_batch_size=4)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"kk": 3}, r"unknown parameter\(s\) 'kk' for method 'logit_lens'; valid: k \(int, 1..50, default 5\)"),
        ({"k": "3"}, "parameter 'k' of method 'logit_lens' must be an integer, got '3'"),
        ({"k": 2.5}, "must be an integer, got 2.5"),
        ({"k": True}, "must be an integer, got True"),
        ({"k": float("nan")}, "must be an integer, got nan"),
        ({"k": 0}, "parameter 'k' of method 'logit_lens' must be in 1..50, got 0"),
        ({"k": 51.0}, "must be in 1..50, got 51"),
    ],
)
def test_parse_params_rejects_bad_values_with_actionable_messages(params: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidParamsError, match=message):
        LogitLens().parse_params(params)


def test_every_numeric_parameter_is_bounded_once_the_model_is_known(tiny_model: LoadedModel) -> None:
    """Regression (issue 13): token-id, layer and head parameters had no maximum, so the gateway let 1e300 through
    and the job failed in the worker quoting a 300-digit number. The catalogue a worker publishes bounds them by
    its model, and the worker parses with the same bounds."""
    shape = ModelShape.of(tiny_model)
    assert (shape.vocab_size, shape.num_layers, shape.num_heads) == (64, 2, 4)
    bounded = {
        (info.name, param.name): param.maximum
        for info in method_infos(shape)
        for param in info.params
        if param.type in (explanations_pb2.PARAM_TYPE_INT, explanations_pb2.PARAM_TYPE_FLOAT)
    }
    assert all(param.HasField("maximum") for info in method_infos(shape) for param in info.params
               if param.type in (explanations_pb2.PARAM_TYPE_INT, explanations_pb2.PARAM_TYPE_FLOAT))  # fmt: skip
    assert bounded[("integrated_gradients", "baseline_token_id")] == 63
    assert bounded[("occlusion", "replacement_token_id")] == 63
    assert bounded[("attention", "layer")] == 2 and bounded[("attention", "head")] == 3
    assert bounded[("gradient_x_activation", "layer")] == 2
    # Without a model nothing is made up: the same parameter is open above.
    unbounded = {info.name: info for info in method_infos()}["integrated_gradients"]
    assert not next(p for p in unbounded.params if p.name == "baseline_token_id").HasField("maximum")

    with pytest.raises(InvalidParamsError) as caught:
        get_method("integrated_gradients").parse_params({"baseline_token_id": 1e300}, shape)
    message = str(caught.value)
    assert message == "parameter 'baseline_token_id' of method 'integrated_gradients' must be in 0..63, got 1e+300"
    assert get_method("integrated_gradients").parse_params({"baseline_token_id": 63}, shape).baseline_token_id == 63


# --- input x gradient ---


def per_target_reference(loaded: LoadedModel, token_ids: torch.Tensor, target_positions: torch.Tensor) -> np.ndarray:
    """The peer libraries' way: one forward pass per target over its prefix, gradient w.r.t. inputs_embeds."""
    rows = np.zeros((len(target_positions), len(token_ids) - 1))
    for row, position in enumerate(target_positions.tolist()):
        prefix = token_ids[:position]
        embeddings = loaded.model.get_input_embeddings()(prefix[None]).detach().requires_grad_(True)
        logits = loaded.model(inputs_embeds=embeddings).logits[0, -1]
        logprob = torch.log_softmax(logits, dim=-1)[token_ids[position]]
        (gradient,) = torch.autograd.grad(logprob, embeddings)
        rows[row, :position] = (embeddings * gradient).sum(dim=-1)[0].detach().numpy()
    return rows


def test_input_x_gradient_matches_one_forward_per_target(
    tiny_model: LoadedModel, make_context: MakeContext, read_tensor: ReadTensor
) -> None:
    ctx = make_context(tiny_model)
    result = InputXGradient().attribute(ctx, EmbeddingGradientParams(target_batch_size=16))
    attributions = read_tensor(result.attributions)

    assert result.attributions.dtype == types_pb2.DTYPE_FLOAT32
    assert attributions.shape == (8, 13)
    reference = per_target_reference(tiny_model, ctx.token_ids, ctx.targets.positions)
    # float32 on the wire: 1e-5 is well above its rounding of values up to ~0.5.
    np.testing.assert_allclose(attributions, reference, rtol=0, atol=1e-5)
    assert np.abs(reference).max() > 0.1  # the comparison is not between near-zero matrices
    for row, position in enumerate(ctx.targets.positions.tolist()):
        assert np.all(attributions[row, position:] == 0.0)
        assert np.all(attributions[row, :position] != 0.0)


@pytest.mark.parametrize("target_batch_size", [1, 3, 7])
def test_input_x_gradient_chunked_equals_unchunked(
    tiny_model: LoadedModel, make_context: MakeContext, read_tensor: ReadTensor, target_batch_size: int
) -> None:
    ctx = make_context(tiny_model)
    unchunked = read_tensor(InputXGradient().attribute(ctx, EmbeddingGradientParams(1024)).attributions)
    chunked = read_tensor(InputXGradient().attribute(ctx, EmbeddingGradientParams(target_batch_size)).attributions)
    np.testing.assert_allclose(chunked, unchunked, rtol=0, atol=1e-7)


@pytest.mark.parametrize("target", [0, 7])
def test_input_x_gradient_agrees_with_captum(
    tiny_model: LoadedModel, make_context: MakeContext, read_tensor: ReadTensor, target: int
) -> None:
    ctx = make_context(tiny_model)
    position = int(ctx.targets.positions[target])
    token = int(ctx.token_ids[position])

    def target_logprob(embeddings: torch.Tensor) -> torch.Tensor:
        logits = tiny_model.model(inputs_embeds=embeddings).logits[:, position - 1]
        return torch.log_softmax(logits, dim=-1)[:, token]

    embeddings = tiny_model.embed(ctx.token_ids).requires_grad_(True)
    captum = CaptumInputXGradient(target_logprob).attribute(embeddings).sum(dim=-1)[0, :-1].detach()

    ours = read_tensor(InputXGradient().attribute(ctx, EmbeddingGradientParams(16)).attributions)[target]
    np.testing.assert_allclose(ours, captum.numpy(), rtol=0, atol=1e-5)


# --- logit lens ---


def test_logit_lens_last_layer_is_the_model_prediction(
    tiny_model: LoadedModel, make_context: MakeContext, read_tensor: ReadTensor
) -> None:
    ctx = make_context(tiny_model)
    result = LogitLens().attribute(ctx, LogitLensParams(k=4))
    top_ids = read_tensor(result.extras["top_token_ids"])
    top_logprobs = read_tensor(result.extras["top_logprobs"])
    target_logprobs = read_tensor(result.extras["target_logprobs"])

    assert not result.HasField("attributions")
    assert top_ids.shape == top_logprobs.shape == (3, 8, 4) and target_logprobs.shape == (3, 8)
    assert result.extras["top_token_ids"].dtype == types_pb2.DTYPE_INT32
    assert np.all(np.diff(top_logprobs, axis=-1) <= 0)

    with torch.no_grad():
        logits = tiny_model.model(input_ids=ctx.token_ids[None]).logits[0, ctx.targets.positions - 1]
    model_logprobs = torch.log_softmax(logits, dim=-1)
    np.testing.assert_array_equal(top_ids[-1, :, 0], logits.argmax(dim=-1).numpy())
    expected = model_logprobs.gather(-1, ctx.token_ids[ctx.targets.positions, None])[:, 0]
    np.testing.assert_allclose(target_logprobs[-1], expected.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(top_logprobs[-1], model_logprobs.topk(4).values.numpy(), rtol=1e-6, atol=1e-6)


def lens_readout(positions: list[int], layers: int = 3, k: int = 4) -> LayerReadout:
    n = len(positions)
    return LayerReadout(
        positions=torch.tensor(positions),
        target_logprobs=-torch.rand(layers, n),
        top_ids=torch.randint(0, 64, (layers, n, k)),
        top_logprobs=-torch.rand(layers, n, k).sort(dim=-1).values,
    )


def test_a_layer_readout_serves_any_of_its_positions_with_at_most_its_k() -> None:
    lens = lens_readout([3, 4, 6, 9])

    some = lens.select(torch.tensor([4, 9]), 2)

    assert some is not None
    assert torch.equal(some.positions, torch.tensor([4, 9]))
    assert torch.equal(some.target_logprobs, lens.target_logprobs[:, [1, 3]])
    assert torch.equal(some.top_ids, lens.top_ids[:, [1, 3], :2])
    assert torch.equal(some.top_logprobs, lens.top_logprobs[:, [1, 3], :2])
    assert lens.select(torch.tensor([4, 5]), 2) is None  # 5 was not read out
    assert lens.select(torch.tensor([10]), 2) is None  # past the last one
    assert lens.select(torch.tensor([3]), 5) is None  # more alternatives than kept
    assert lens_readout([]).select(torch.tensor([3]), 1) is None


def test_a_layer_readout_round_trips_and_refuses_inconsistent_tensors() -> None:
    lens = lens_readout([3, 4, 6])
    restored = LayerReadout.from_tensors(lens.tensors(), layers=3)
    assert restored is not None
    assert all(torch.equal(restored.tensors()[name], tensor) for name, tensor in lens.tensors().items())

    def broken(**changes: torch.Tensor) -> dict[str, torch.Tensor]:
        return {**lens.tensors(), **changes}

    assert LayerReadout.from_tensors(lens.tensors(), layers=4) is None
    assert LayerReadout.from_tensors({**lens.tensors(), "extra": torch.zeros(1)}, layers=3) is None
    assert LayerReadout.from_tensors(broken(positions=torch.tensor([3, 6, 4])), layers=3) is None
    assert LayerReadout.from_tensors(broken(positions=torch.tensor([3, 4])), layers=3) is None
    assert LayerReadout.from_tensors(broken(top_logprobs=lens.top_logprobs[..., :2]), layers=3) is None
    assert LayerReadout.from_tensors(broken(top_ids=lens.top_ids[0]), layers=3) is None
    assert LayerReadout.from_tensors(broken(positions=lens.positions.int()), layers=3) is None
    assert LayerReadout.from_tensors(broken(positions=torch.tensor(3)), layers=3) is None
    assert LayerReadout.from_tensors(broken(top_logprobs=lens.top_logprobs.double()), layers=3) is None


def test_logit_lens_from_cached_bfloat16_states_stays_close_to_float32(
    tiny_model_float32: LoadedModel, make_context: MakeContext, read_tensor: ReadTensor
) -> None:
    fresh = make_context(tiny_model_float32)
    cached = dataclasses.replace(fresh, hidden_states=fresh.hidden_states.to(STORAGE_DTYPE).float())

    exact = LogitLens().attribute(fresh, LogitLensParams(k=5))
    rounded = LogitLens().attribute(cached, LogitLensParams(k=5))

    # bfloat16 keeps 8 mantissa bits (relative error <= 2**-9); through the norm and a 64-token unembedding
    # that moves log-probs by a few 1e-3 here. 0.02 leaves margin and is far below any signal the lens shows.
    for extra in ("top_logprobs", "target_logprobs"):
        difference = np.abs(read_tensor(rounded.extras[extra]) - read_tensor(exact.extras[extra]))
        assert difference.max() < 0.02, extra
