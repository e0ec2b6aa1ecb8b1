"""The attribution methods this worker offers, by name; the gateway's ListMethods publishes method_infos()."""

from __future__ import annotations

from typing import Any

from sightline.v1 import explanations_pb2

from explainers.methods.base import AttributionMethod
from explainers.methods.input_x_gradient import InputXGradient
from explainers.methods.logit_lens import LogitLens

_METHODS: dict[str, AttributionMethod[Any]] = {}


class UnknownMethodError(ValueError):
    """A method name that is not registered."""


def register(method: AttributionMethod[Any]) -> None:
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    _METHODS[method.name] = method


def get_method(name: str) -> AttributionMethod[Any]:
    try:
        return _METHODS[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown explain method {name!r}; available methods: {', '.join(sorted(_METHODS))}"
        ) from None


def all_methods() -> list[AttributionMethod[Any]]:
    return [_METHODS[name] for name in sorted(_METHODS)]


def method_infos() -> list[explanations_pb2.MethodInfo]:
    return [method.info() for method in all_methods()]


register(InputXGradient())
register(LogitLens())
