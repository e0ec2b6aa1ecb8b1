"""Method parameters as the API carries them, for tests that build requests from raw protos."""

from __future__ import annotations

from collections.abc import Mapping

from sightline.v1 import types_pb2


def param_values(values: Mapping[str, bool | int | float | str]) -> dict[str, types_pb2.ParamValue]:
    """``values`` as MethodSpec.params: an int as int_value, a float as float_value (NaN and the infinities too)."""
    typed = {}
    for name, value in values.items():
        if isinstance(value, bool):
            typed[name] = types_pb2.ParamValue(bool_value=value)
        elif isinstance(value, int):
            typed[name] = types_pb2.ParamValue(int_value=value)
        elif isinstance(value, float):
            typed[name] = types_pb2.ParamValue(float_value=value)
        else:
            typed[name] = types_pb2.ParamValue(string_value=value)
    return typed
