"""The interface every attribution method implements: typed parameters, declared capabilities, `attribute()`."""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Generic, TypeVar

import numpy as np
import torch
from sightline.v1 import explanations_pb2, types_pb2

from explainers.backprop import RecordedLayers
from explainers.hidden_cache import DerivedTensors
from explainers.model import LoadedModel
from explainers.targets import Targets

ParamValue = int | float | str | bool
ParamsT = TypeVar("ParamsT")

_PARAM_TYPES = {
    int: explanations_pb2.PARAM_TYPE_INT,
    float: explanations_pb2.PARAM_TYPE_FLOAT,
    str: explanations_pb2.PARAM_TYPE_STRING,
    bool: explanations_pb2.PARAM_TYPE_BOOL,
}
_TYPE_NAMES: dict[type[ParamValue], str] = {
    int: "an integer",
    float: "a finite number",
    str: "a string",
    bool: "true or false",
}


class InvalidParamsError(ValueError):
    """Method parameters that are unknown, of the wrong type or out of range."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a model that bound some parameters (token ids, layers, heads): a ParamSpec names one of
    ``bounds()`` as its ``maximum_from``, and the worker publishes the bound the model it holds gives it."""

    vocab_size: int
    num_layers: int
    num_heads: int

    @classmethod
    def of(cls, loaded: LoadedModel) -> ModelShape:
        return cls(loaded.vocab_size, loaded.num_layers, int(loaded.model.config.num_attention_heads))

    def bounds(self) -> dict[str, int]:
        return {
            "last_token_id": self.vocab_size - 1,
            "num_layers": self.num_layers,
            "last_head": self.num_heads - 1,
        }


@dataclass(frozen=True)
class ParamSpec:
    """One method parameter: its Python type, default and inclusive bounds (numbers only)."""

    name: str
    type: type[ParamValue]
    default: ParamValue
    description: str
    minimum: float | None = None
    maximum: float | None = None
    # For string parameters: the accepted values.
    choices: tuple[str, ...] = ()
    # For numbers bounded by the model (a token id, a layer, a head): the name of the ModelShape bound that is the
    # maximum, filled in by for_model().
    maximum_from: str = ""

    def for_model(self, shape: ModelShape) -> ParamSpec:
        """This parameter with the maximum the model gives it, if it takes one from the model."""
        if not self.maximum_from:
            return self
        return dataclasses.replace(self, maximum=shape.bounds()[self.maximum_from])

    @property
    def range_text(self) -> str:
        """Inclusive bounds as "lo..hi" (an open side is left empty, as in "0.."), or "" when unbounded."""
        if self.minimum is None and self.maximum is None:
            return ""
        return f"{_render(self.minimum)}..{_render(self.maximum)}"

    def describe(self) -> str:
        bounds = f", {self.range_text}" if self.range_text else ""
        return f"{self.name} ({self.type.__name__}{bounds}, default {_render(self.default)})"

    def parse(self, method: str, value: object) -> ParamValue:
        where = f"parameter {self.name!r} of method {method!r}"
        parsed = _coerce(self.type, value)
        if parsed is None:
            raise InvalidParamsError(f"{where} must be {_TYPE_NAMES[self.type]}, got {value!r}")
        if isinstance(parsed, int | float) and not isinstance(parsed, bool) and not self._in_range(parsed):
            raise InvalidParamsError(f"{where} must be in {self.range_text}, got {_quoted(parsed)}")
        if self.choices and parsed not in self.choices:
            raise InvalidParamsError(f"{where} must be one of {', '.join(self.choices)}, got {parsed!r}")
        return parsed

    def _in_range(self, number: float) -> bool:
        return (self.minimum is None or number >= self.minimum) and (self.maximum is None or number <= self.maximum)

    def info(self) -> explanations_pb2.MethodParam:
        # Bounds are also spelled out in the description, for people reading `sightline methods`.
        bounds = f" Range {self.range_text} (inclusive)." if self.range_text else ""
        return explanations_pb2.MethodParam(
            name=self.name,
            type=_PARAM_TYPES[self.type],
            default_value=param_value(self.default),
            description=self.description + bounds,
            minimum=self.minimum,
            maximum=self.maximum,
            choices=self.choices,
        )


def _coerce(kind: type[ParamValue], value: object) -> ParamValue | None:
    """value as `kind`, or None when it is not one. A bool is never taken for a number, though it subclasses int."""
    if kind is bool:
        return value if isinstance(value, bool) else None
    if kind is str:
        return value if isinstance(value, str) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    if kind is float:
        return float(value)
    # A whole number written as a float (16.0, as JSON clients may send it) is a valid int.
    return int(value) if float(value).is_integer() else None


def _quoted(number: float) -> str:
    """A number as a message quotes it: in full when short, else in scientific notation (never 300 digits)."""
    text = repr(number)
    return text if len(text) <= 24 else f"{float(number):.6g}"


def param_value(value: ParamValue) -> types_pb2.ParamValue:
    """A parameter value as the API carries it, typed (a bool is never taken for an int)."""
    if isinstance(value, bool):
        return types_pb2.ParamValue(bool_value=value)
    if isinstance(value, int):
        return types_pb2.ParamValue(int_value=value)
    if isinstance(value, float):
        return types_pb2.ParamValue(float_value=value)
    return types_pb2.ParamValue(string_value=value)


def _render(value: ParamValue | None) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@dataclass(frozen=True)
class CostModel:
    """Forward passes over the whole sequence (a backward pass counts as two), published as MethodCost so the
    gateway can refuse an explanation that would cost too much before any work is done."""

    passes: float = 0.0
    per_target: float = 0.0
    per_token: float = 0.0
    # The parameter whose value multiplies the whole cost (e.g. integration steps), if any.
    scaled_by: str = ""

    def info(self) -> explanations_pb2.MethodCost:
        return explanations_pb2.MethodCost(
            passes=self.passes,
            passes_per_target=self.per_target,
            passes_per_token=self.per_token,
            scaled_by_param=self.scaled_by,
        )


# One forward pass, then one backward pass (two forwards' worth) per explained token.
GRADIENT_COST = CostModel(passes=1, per_target=2)


@dataclass(frozen=True)
class AttributionContext:
    """What a method gets to explain one sequence: the model, the tokens, the targets and the hidden states."""

    loaded: LoadedModel
    token_ids: torch.Tensor  # int64 [num_tokens]: prompt, then output
    prompt_length: int
    targets: Targets  # the explained tokens, their score function and foils
    # [num_layers + 1, num_tokens, hidden] in the model's dtype at the cache's (bfloat16) precision, from the cache
    # or from the engine's one recorded forward pass; identical either way.
    hidden_states: torch.Tensor
    # The engine's forward pass over the input embeddings, recorded for the backward pass (explainers.backprop), on
    # a cache miss while a method still to run reuses it (reuses_embedding_recording); None otherwise.
    embedding_recording: RecordedLayers | None = None
    # Where a method may keep what it read out of hidden_states for the next request on this sequence (the
    # hidden-state cache's derived entries); None without a cache.
    derived: DerivedTensors | None = None


class AttributionMethod(ABC, Generic[ParamsT]):
    """One attribution method. Subclasses declare their parameters and capabilities and implement attribute()."""

    name: ClassVar[str]
    description: ClassVar[str]
    params: ClassVar[tuple[ParamSpec, ...]]
    # Built from the parsed values as params_type(**values); its fields are the names in `params`.
    params_type: type[ParamsT]
    needs_gradients: ClassVar[bool]
    uses_cache: ClassVar[bool]
    attributes_tokens: ClassVar[bool]
    cost: ClassVar[CostModel]
    supports_contrastive_targets: ClassVar[bool] = False
    multimodal: ClassVar[bool] = False
    # Whether the method runs backward from the input embeddings of the sequence itself, so that the engine's forward
    # pass, recorded, saves it one of its own.
    reuses_embedding_recording: ClassVar[bool] = False

    def param_specs(self, shape: ModelShape | None = None) -> tuple[ParamSpec, ...]:
        """The parameters, with the bounds ``shape`` gives those bounded by the model (unbounded above without)."""
        return self.params if shape is None else tuple(spec.for_model(shape) for spec in self.params)

    def parse_params(self, params: Mapping[str, object], shape: ModelShape | None = None) -> ParamsT:
        """Typed parameters from a request's loose values, within the bounds of the model of ``shape`` if
        given; defaults fill what is missing."""
        specs = {spec.name: spec for spec in self.param_specs(shape)}
        unknown = sorted(set(params) - set(specs))
        if unknown:
            valid = "; ".join(spec.describe() for spec in specs.values()) or "none"
            raise InvalidParamsError(
                f"unknown parameter(s) {', '.join(map(repr, unknown))} for method {self.name!r}; valid: {valid}"
            )
        values = {
            name: spec.parse(self.name, params[name]) if name in params else spec.default
            for name, spec in specs.items()
        }
        return self.params_type(**values)

    @abstractmethod
    def attribute(self, ctx: AttributionContext, params: ParamsT) -> types_pb2.MethodResult:
        """Explain ctx's targets. Token attributions are float32 [num_targets, num_tokens - 1]."""

    def info(self, shape: ModelShape | None = None) -> explanations_pb2.MethodInfo:
        """What ListMethods publishes; with ``shape``, the bounds the parameters take from that model."""
        return explanations_pb2.MethodInfo(
            name=self.name,
            description=self.description,
            params=[spec.info() for spec in self.param_specs(shape)],
            needs_gradients=self.needs_gradients,
            uses_cache=self.uses_cache,
            supports_contrastive_targets=self.supports_contrastive_targets,
            multimodal=self.multimodal,
            attributes_tokens=self.attributes_tokens,
            cost=self.cost.info(),
        )


def tensor_proto(values: torch.Tensor) -> types_pb2.Tensor:
    """A tensor as float32 (floating) or int32 (integer) elements, row-major."""
    tensor = values.detach().cpu()
    if tensor.is_floating_point():
        flat = tensor.to(torch.float32).reshape(-1).numpy()
        return types_pb2.Tensor(dtype=types_pb2.DTYPE_FLOAT32, shape=list(tensor.shape), float_values=flat)
    flat = tensor.to(torch.int32).reshape(-1).numpy()
    return types_pb2.Tensor(dtype=types_pb2.DTYPE_INT32, shape=list(tensor.shape), int_values=flat)


def tensor_array(packed: types_pb2.Tensor) -> np.ndarray:
    """A Tensor's elements as an array of its shape: float32 or int32, as its dtype says."""
    if packed.dtype == types_pb2.DTYPE_INT32:
        return np.array(packed.int_values, dtype=np.int32).reshape(tuple(packed.shape))
    return np.array(packed.float_values, dtype=np.float32).reshape(tuple(packed.shape))


def prefix_only(scores: torch.Tensor, targets: Targets) -> torch.Tensor:
    """The [num_targets, num_tokens - 1] attribution matrix from per-token scores [num_targets, num_tokens]:
    the last token precedes no target, and a target's own and later positions are exactly 0."""
    sources = torch.arange(scores.shape[1] - 1)
    return torch.where(sources[None, :] < targets.positions[:, None], scores[:, :-1], 0.0)
