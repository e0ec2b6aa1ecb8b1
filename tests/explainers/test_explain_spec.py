"""The gateway and the worker parse method parameters with one implementation (common/explain_spec.py): the gateway
reads back, from the catalogue a worker publishes, exactly the parameters the worker declares, so both accept and
refuse the same values with the same message."""

from __future__ import annotations

import math

import pytest

from common.explain_spec import InvalidParamsError, ParamSpec, params_path, parse_params
from explainers.methods.base import AttributionMethod, ModelShape
from explainers.methods.registry import all_methods

SHAPE = ModelShape(vocab_size=64, num_layers=2, num_heads=4)
# Values of every kind, inside and outside every bound a declared parameter has.
PROBES: tuple[object, ...] = (
    -(2**40), -2, -1, 0, 1, 2, 2.5, 3, 16.0, 50, 63, 64, 512, 513, 1e300, math.nan, math.inf,
    True, False, "", "mean", "max", "token", "zero", "riemann_trapezoid", "x" * 200, None, [1], {"a": 1},
)  # fmt: skip


def refusal(method: str, spec: ParamSpec, value: object) -> object:
    """What parsing ``value`` gives: the parsed value, or the refusal's message."""
    try:
        return parse_params(method, [spec], {spec.name: value}, params_path(0))[spec.name]
    except InvalidParamsError as exc:
        return f"refused: {exc}"


@pytest.mark.parametrize("method", all_methods(), ids=lambda method: method.name)
@pytest.mark.parametrize("shape", [None, SHAPE], ids=["no model", "model"])
def test_the_catalogue_gives_the_gateway_the_workers_parameters(
    method: AttributionMethod[object], shape: ModelShape | None
) -> None:
    declared = method.param_specs(shape)
    published = [ParamSpec.from_info(info) for info in method.info(shape).params]
    assert [p.name for p in published] == [p.name for p in declared]
    for worker, gateway in zip(declared, published, strict=True):
        assert (gateway.type, gateway.default, gateway.minimum, gateway.maximum, gateway.choices) == (
            worker.type,
            worker.default,
            worker.minimum,
            worker.maximum,
            worker.choices,
        )
        for value in PROBES:
            assert refusal(method.name, gateway, value) == refusal(method.name, worker, value), (worker.name, value)


def test_messages_name_the_parameters_path_and_quote_values_in_part() -> None:
    steps = ParamSpec("steps", int, 16, "Points on the path.", minimum=2, maximum=512)
    assert refusal("integrated_gradients", steps, 10**300) == (
        "refused: 'explain.methods[0].params.steps' of method 'integrated_gradients' must be in 2..512; got 1e+300"
    )
    assert refusal("integrated_gradients", steps, "x" * 200) == (
        "refused: 'explain.methods[0].params.steps' of method 'integrated_gradients' must be an integer; got "
        f"'{'x' * 59}… (200 characters)"
    )
    with pytest.raises(InvalidParamsError) as caught:
        parse_params("integrated_gradients", [steps], {"y" * 100: 1}, params_path(2))
    assert str(caught.value).startswith("'explain.methods[2].params.yyyy")
    assert str(caught.value).endswith(
        "is not a parameter of method 'integrated_gradients'; its parameters: steps (int, 2..512, default 16)"
    )


def test_only_the_values_given_come_back_typed() -> None:
    specs = [ParamSpec("k", int, 5, "k", 1, 50), ParamSpec("fast", bool, False, "fast")]
    assert parse_params("m", specs, {"k": 16.0}) == {"k": 16}
    assert parse_params("m", specs, {}) == {}
