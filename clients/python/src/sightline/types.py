"""Typed, immutable views of Sightline's protobuf messages.

Every object the clients return directly (``Generation``, ``StreamChunk``,
``Explanation``, ``MethodInfo``) keeps the message it was converted from as
``raw``, for fields this module does not map and for proto JSON output.
"""

from __future__ import annotations

import math
import sys
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypeAlias

from google.protobuf import timestamp_pb2
from sightline.v1 import explanations_pb2, inference_pb2, types_pb2

if TYPE_CHECKING:
    from numpy.typing import NDArray

# ---------------------------------------------------------------------------
# Inputs

ChatMessage: TypeAlias = Mapping[str, str]
"""``{"role": "system" | "user" | "assistant", "content": "..."}``."""

Prompt: TypeAlias = str | Sequence[ChatMessage] | Sequence[int]
"""Plain text, chat messages (rendered with the model's chat template), or token ids used as given."""

ParamValue: TypeAlias = bool | int | float | str

ExplainMethods: TypeAlias = str | Sequence[str] | Mapping[str, Mapping[str, ParamValue]]
"""A method name, method names, or method names mapped to their parameters (see ``list_methods``)."""

ExplainModeName: TypeAlias = Literal["sync", "async"]

# ---------------------------------------------------------------------------
# Enumerations


class FinishReason(StrEnum):
    UNSPECIFIED = "unspecified"
    STOP = "stop"
    """A stop token or stop string ended generation."""
    LENGTH = "length"
    """max_tokens or the context window ended generation."""
    ABORT = "abort"
    """The request was aborted upstream."""


class ExplanationState(StrEnum):
    UNSPECIFIED = "unspecified"
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class ParamType(StrEnum):
    UNSPECIFIED = "unspecified"
    INT = "int"
    FLOAT = "float"
    STRING = "string"
    BOOL = "bool"


# Values a newer server may add map to UNSPECIFIED rather than failing the whole response.
_FINISH_REASONS = {
    types_pb2.FINISH_REASON_STOP: FinishReason.STOP,
    types_pb2.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    types_pb2.FINISH_REASON_ABORT: FinishReason.ABORT,
}
_EXPLANATION_STATES = {
    types_pb2.EXPLANATION_STATE_PENDING: ExplanationState.PENDING,
    types_pb2.EXPLANATION_STATE_RUNNING: ExplanationState.RUNNING,
    types_pb2.EXPLANATION_STATE_SUCCEEDED: ExplanationState.SUCCEEDED,
    types_pb2.EXPLANATION_STATE_FAILED: ExplanationState.FAILED,
}
_PARAM_TYPES = {
    explanations_pb2.PARAM_TYPE_INT: ParamType.INT,
    explanations_pb2.PARAM_TYPE_FLOAT: ParamType.FLOAT,
    explanations_pb2.PARAM_TYPE_STRING: ParamType.STRING,
    explanations_pb2.PARAM_TYPE_BOOL: ParamType.BOOL,
}

# ---------------------------------------------------------------------------
# Tensors

TensorDType: TypeAlias = Literal["float32", "int32"]

# (dtype name, array typecode): 'f' is a C float and 'i' a C int, both 4 bytes on every
# platform CPython supports, matching the wire's float32 and int32.
_TENSOR_ELEMENTS: dict[int, tuple[TensorDType, str]] = {
    types_pb2.D_TYPE_FLOAT32: ("float32", "f"),
    types_pb2.D_TYPE_INT32: ("int32", "i"),
}


@dataclass(frozen=True)
class Matrix:
    """A dense row-major tensor decoded from a packed ``sightline.v1.Tensor``.

    Usually two-dimensional (an attribution matrix is ``[targets, tokens - 1]``),
    but method extras may have other ranks, e.g. logit lens ``[layers + 1, targets, k]``.
    ``values`` holds every element flat, in row-major order and native byte order.
    """

    dtype: TensorDType
    shape: tuple[int, ...]
    values: array[float] | array[int]

    def __post_init__(self) -> None:
        if any(size < 0 for size in self.shape) or len(self.values) != math.prod(self.shape):
            raise ValueError(f"{len(self.values)} values do not fill a {self.dtype} tensor of shape {self.shape}")

    @classmethod
    def from_proto(cls, tensor: types_pb2.Tensor) -> Matrix:
        if tensor.dtype not in _TENSOR_ELEMENTS:
            raise ValueError(f"unsupported tensor dtype {tensor.dtype} (expected float32 or int32)")
        dtype, typecode = _TENSOR_ELEMENTS[tensor.dtype]
        values = array(typecode)
        values.frombytes(tensor.data)
        if sys.byteorder == "big":  # the wire format is little-endian
            values.byteswap()
        return cls(dtype, tuple(tensor.shape), values)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def row(self, *index: int) -> list[float] | list[int]:
        """The values under a leading index, flattened.

        For a 2-D matrix ``row(i)`` is row ``i``; for a ``[layers, targets, k]``
        tensor ``row(layer, target)`` is that cell's ``k`` values. Negative indices
        count from the end, as in Python sequences.
        """
        if not 0 < len(index) < self.ndim:
            raise IndexError(f"row() takes 1 to {self.ndim - 1} indices for shape {self.shape}, got {len(index)}")
        offset = 0
        for axis, (position, size) in enumerate(zip(index, self.shape, strict=False)):
            resolved = position + size if position < 0 else position
            if not 0 <= resolved < size:
                raise IndexError(f"index {position} is out of range for axis {axis} of size {size}")
            offset = offset * size + resolved
        block = math.prod(self.shape[len(index) :])
        return self.values[offset * block : (offset + 1) * block].tolist()

    def tolist(self) -> list[Any]:
        """Nested lists following ``shape``, like ``numpy.ndarray.tolist``."""
        return _nest(self.values.tolist(), self.shape)

    def to_numpy(self) -> NDArray[Any]:
        """A new numpy array of this shape and dtype. Needs numpy, which the SDK does not."""
        try:
            import numpy
        except ImportError as error:
            raise ImportError("Matrix.to_numpy() needs numpy: pip install numpy") from error
        # Copied so that writes to the result cannot change this (frozen) matrix.
        return numpy.frombuffer(self.values, dtype=self.dtype).reshape(self.shape).copy()


def _nest(flat: list[Any], shape: tuple[int, ...]) -> list[Any]:
    if len(shape) <= 1:
        return flat
    stride = math.prod(shape[1:])
    return [_nest(flat[i * stride : (i + 1) * stride], shape[1:]) for i in range(shape[0])]


def _optional_matrix(tensor: types_pb2.Tensor) -> Matrix | None:
    # Methods that do not attribute to tokens leave the tensor empty (or unset, which reads the same).
    if not tensor.shape and not tensor.data:
        return None
    return Matrix.from_proto(tensor)


def _optional_datetime(timestamp: timestamp_pb2.Timestamp, present: bool) -> datetime | None:
    return timestamp.ToDatetime(tzinfo=UTC) if present else None


# ---------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class Token:
    id: int
    text: str
    """The token's text as the tokenizer renders it on its own (may be a word piece)."""
    logprob: float | None
    """The serving engine's log-probability, for generated tokens."""

    @classmethod
    def from_proto(cls, token: types_pb2.Token) -> Token:
        return cls(token.id, token.text, token.logprob if token.HasField("logprob") else None)


@dataclass(frozen=True)
class Usage:
    input_tokens: int
    output_tokens: int

    @classmethod
    def from_proto(cls, usage: types_pb2.Usage) -> Usage:
        return cls(usage.input_tokens, usage.output_tokens)


@dataclass(frozen=True)
class MethodResult:
    method: str
    attributions: Matrix | None
    """float32 ``[targets, tokens - 1]``: row ``i`` scores every token before target ``i``.
    None for methods that do not attribute to tokens."""
    extras: Mapping[str, Matrix]
    """Method-specific outputs, e.g. logit lens ``top_token_ids``, ``top_logprobs``, ``target_logprobs``."""
    seconds: float

    @classmethod
    def from_proto(cls, result: types_pb2.MethodResult) -> MethodResult:
        return cls(
            method=result.method,
            attributions=_optional_matrix(result.attributions),
            extras={name: Matrix.from_proto(tensor) for name, tensor in result.extras.items()},
            seconds=result.seconds,
        )


@dataclass(frozen=True)
class Fidelity:
    """How faithfully the explainer's replica reproduced what was served."""

    recomputed_logprobs: tuple[float, ...]
    max_abs_logprob_diff: float
    """max |recomputed - served| over the generated tokens."""

    @classmethod
    def from_proto(cls, fidelity: types_pb2.Fidelity) -> Fidelity:
        return cls(tuple(fidelity.recomputed_logprobs), fidelity.max_abs_logprob_diff)


class Source(NamedTuple):
    """One source token's contribution to a target token."""

    position: int
    token: Token
    score: float


@dataclass(frozen=True)
class LogitLensLayer:
    """What one layer's residual stream predicts at one target position."""

    layer: int
    """0 is the embedding output, the last is the final layer."""
    top_token_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]
    target_logprob: float
    """This layer's log-probability of the token actually at the target position."""


@dataclass(frozen=True)
class Explanation:
    explanation_id: str
    state: ExplanationState
    error: str
    """Why the explanation failed, when state is FAILED."""
    model: str
    weights_digest: str
    tokens: tuple[Token, ...]
    """Every token of the sequence: prompt first, then the generated output."""
    prompt_length: int
    target_positions: tuple[int, ...]
    """Indices into ``tokens`` of the tokens explained; "target index" below indexes this."""
    results: Mapping[str, MethodResult]
    """Results by method name, in the order the server sent them."""
    fidelity: Fidelity | None
    cache_hit: bool
    """Whether the hidden states came from the cache rather than a fresh forward pass."""
    trace_id: str
    attempts: int
    created_at: datetime | None
    completed_at: datetime | None
    raw: types_pb2.Explanation = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        # Checked once here so that top_sources() and friends can index without surprises.
        for position in self.target_positions:
            if not 0 <= position < len(self.tokens):
                raise ValueError(f"target position {position} is outside the {len(self.tokens)} tokens")
        expected_shape = (len(self.target_positions), max(len(self.tokens) - 1, 0))
        for name, result in self.results.items():
            if result.attributions is not None and result.attributions.shape != expected_shape:
                raise ValueError(
                    f"attributions of {name!r} have shape {result.attributions.shape}, expected"
                    f" {expected_shape} for {len(self.target_positions)} targets over {len(self.tokens)} tokens"
                )

    @classmethod
    def from_proto(cls, explanation: types_pb2.Explanation) -> Explanation:
        return cls(
            explanation_id=explanation.explanation_id,
            state=_EXPLANATION_STATES.get(explanation.state, ExplanationState.UNSPECIFIED),
            error=explanation.error,
            model=explanation.model,
            weights_digest=explanation.weights_digest,
            tokens=tuple(Token.from_proto(token) for token in explanation.tokens),
            prompt_length=explanation.prompt_length,
            target_positions=tuple(explanation.target_positions),
            # A method listed twice keeps its last result.
            results={result.method: MethodResult.from_proto(result) for result in explanation.results},
            fidelity=Fidelity.from_proto(explanation.fidelity) if explanation.HasField("fidelity") else None,
            cache_hit=explanation.cache_hit,
            trace_id=explanation.trace_id,
            attempts=explanation.attempts,
            created_at=_optional_datetime(explanation.created_at, explanation.HasField("created_at")),
            completed_at=_optional_datetime(explanation.completed_at, explanation.HasField("completed_at")),
            raw=explanation,
        )

    @property
    def finished(self) -> bool:
        """Whether the explanation reached a final state (succeeded or failed)."""
        return self.state in (ExplanationState.SUCCEEDED, ExplanationState.FAILED)

    @property
    def token_attribution_methods(self) -> list[str]:
        """Names of the results that carry an attribution matrix, in result order."""
        return [name for name, result in self.results.items() if result.attributions is not None]

    def result(self, method: str) -> MethodResult:
        try:
            return self.results[method]
        except KeyError:
            raise KeyError(f"no result for method {method!r}; results: {sorted(self.results)}") from None

    def attributions(self, method: str | None = None) -> Matrix:
        """The attribution matrix of ``method``, by default of the first method that has one."""
        if method is None:
            methods = self.token_attribution_methods
            if not methods:
                raise ValueError(f"no result attributes to tokens; results: {sorted(self.results)}")
            method = methods[0]
        matrix = self.result(method).attributions
        if matrix is None:
            raise ValueError(f"method {method!r} does not attribute to tokens")
        return matrix

    def top_sources(self, target_index: int, k: int = 5, method: str | None = None) -> list[Source]:
        """The ``k`` tokens that most influenced target ``target_index``, strongest first.

        Only the target's causal prefix (positions before it) is ranked. Ranking is by
        absolute score; scores keep their sign. Ties keep the earlier position first.
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        scores = self.attributions(method).row(target_index)
        prefix = scores[: self.target_positions[target_index]]
        ranked = sorted(range(len(prefix)), key=lambda position: abs(prefix[position]), reverse=True)
        return [Source(position, self.tokens[position], float(prefix[position])) for position in ranked[:k]]

    def logit_lens(self, target_index: int, method: str = "logit_lens") -> list[LogitLensLayer]:
        """Per-layer predictions at target ``target_index``, from the method's documented extras."""
        extras = self.result(method).extras
        try:
            top_token_ids = extras["top_token_ids"]
            top_logprobs = extras["top_logprobs"]
            target_logprobs = extras["target_logprobs"]
        except KeyError as missing:
            raise KeyError(f"{method} result has no {missing} extra; extras: {sorted(extras)}") from None
        return [
            LogitLensLayer(
                layer=layer,
                top_token_ids=tuple(int(token_id) for token_id in top_token_ids.row(layer, target_index)),
                top_logprobs=tuple(float(logprob) for logprob in top_logprobs.row(layer, target_index)),
                target_logprob=float(target_logprobs.row(layer)[target_index]),
            )
            for layer in range(top_token_ids.shape[0])
        ]


def _optional_explanation(message: types_pb2.Explanation, present: bool) -> Explanation | None:
    return Explanation.from_proto(message) if present else None


@dataclass(frozen=True)
class Generation:
    request_id: str
    trace_id: str
    model: str
    text: str
    prompt_token_ids: tuple[int, ...]
    output_tokens: tuple[Token, ...]
    finish_reason: FinishReason
    usage: Usage
    explanation_id: str
    """Set when an explanation was requested."""
    explanation: Explanation | None
    """Attached in sync mode; in async mode fetch it with ``get_explanation(explanation_id)``."""
    raw: inference_pb2.GenerateResponse = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, response: inference_pb2.GenerateResponse) -> Generation:
        return cls(
            request_id=response.request_id,
            trace_id=response.trace_id,
            model=response.model,
            text=response.text,
            prompt_token_ids=tuple(response.prompt_token_ids),
            output_tokens=tuple(Token.from_proto(token) for token in response.output_tokens),
            finish_reason=_FINISH_REASONS.get(response.finish_reason, FinishReason.UNSPECIFIED),
            usage=Usage.from_proto(response.usage),
            explanation_id=response.explanation_id,
            explanation=_optional_explanation(response.explanation, response.HasField("explanation")),
            raw=response,
        )


@dataclass(frozen=True)
class StreamChunk:
    """One message of a generation stream: the tokens produced since the previous one."""

    request_id: str
    trace_id: str
    output_tokens: tuple[Token, ...]
    text_delta: str
    prompt_token_ids: tuple[int, ...]
    """Set on the first chunk only."""
    finish_reason: FinishReason | None
    """Set on the last chunk only, like ``usage`` and the explanation."""
    usage: Usage | None
    explanation_id: str
    explanation: Explanation | None
    raw: inference_pb2.GenerateStreamResponse = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, response: inference_pb2.GenerateStreamResponse) -> StreamChunk:
        return cls(
            request_id=response.request_id,
            trace_id=response.trace_id,
            output_tokens=tuple(Token.from_proto(token) for token in response.output_tokens),
            text_delta=response.text_delta,
            prompt_token_ids=tuple(response.prompt_token_ids),
            finish_reason=(
                _FINISH_REASONS.get(response.finish_reason, FinishReason.UNSPECIFIED)
                if response.finish_reason != types_pb2.FINISH_REASON_UNSPECIFIED
                else None
            ),
            usage=Usage.from_proto(response.usage) if response.HasField("usage") else None,
            explanation_id=response.explanation_id,
            explanation=_optional_explanation(response.explanation, response.HasField("explanation")),
            raw=response,
        )


@dataclass(frozen=True)
class MethodParam:
    name: str
    type: ParamType
    default_value: str
    """The default rendered as text."""
    description: str

    @classmethod
    def from_proto(cls, param: explanations_pb2.MethodParam) -> MethodParam:
        return cls(
            param.name, _PARAM_TYPES.get(param.type, ParamType.UNSPECIFIED), param.default_value, param.description
        )


@dataclass(frozen=True)
class MethodInfo:
    name: str
    description: str
    params: tuple[MethodParam, ...]
    needs_gradients: bool
    uses_cache: bool
    supports_contrastive_targets: bool
    multimodal: bool
    attributes_tokens: bool
    """Whether results carry a ``[targets, tokens - 1]`` attribution matrix."""
    raw: explanations_pb2.MethodInfo = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, info: explanations_pb2.MethodInfo) -> MethodInfo:
        return cls(
            name=info.name,
            description=info.description,
            params=tuple(MethodParam.from_proto(param) for param in info.params),
            needs_gradients=info.needs_gradients,
            uses_cache=info.uses_cache,
            supports_contrastive_targets=info.supports_contrastive_targets,
            multimodal=info.multimodal,
            attributes_tokens=info.attributes_tokens,
            raw=info,
        )
