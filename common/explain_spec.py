"""The explain spec's rules, one implementation for the gateway and the explainer workers.

The gateway checks a request against them before anything is generated or queued; a worker checks the job it takes
from Redis against them again (the queue is never trusted), with this same code, so the two cannot disagree about
what is valid and a person gets the same message from either. One function (or dataclass) per concern: method
parameters (ParamSpec), the methods named, target output indices, foils, the target score, aggregation and spans,
step scores, token ids within the vocabulary, sequence length, served log-probabilities. A rule whose bound is only
known later (the generation's length, the model's vocabulary) takes it as an optional argument and checks what it
can without it. Messages name the request's field and say what to change; they quote input only in part.

Imports neither torch nor numpy: the gateway runs without them (tests/deploy/test_packaging.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import TypeVar

from sightline.v1 import explanations_pb2, types_pb2

from common.jobs import ExplainOptions, SpanRequest
from common.quoting import shown

GRANULARITIES = ("token", "word", "span")
NORMALIZATIONS = ("none", "l1", "max_abs")
TARGET_SCORES = ("logprob", "probability", "logit")
MAX_STEP_SCORES_TOP_K = 50

ParamValue = int | float | str | bool
MethodT = TypeVar("MethodT")


class InvalidInputError(ValueError):
    """An explain request, or the job made of one, that breaks a rule of the spec: the gateway answers it with
    INVALID_ARGUMENT, a worker fails the job with it (the same on every worker, so it is not retried)."""


class InvalidParamsError(InvalidInputError):
    """Method parameters that are unknown, of the wrong type or out of range."""


class UnknownMethodError(InvalidInputError):
    """A method name that no worker offers."""


# --- method parameters ---

_PARAM_TYPES: dict[type[ParamValue], explanations_pb2.ParamType] = {
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


@dataclass(frozen=True)
class ParamSpec:
    """One method parameter: its Python type, default and inclusive bounds (numbers only).

    Workers declare them (explainers/methods/) and publish them in the catalogue (``info()``); the gateway reads
    them back from the catalogue (``from_info()``), so both parse a request's values with ``parse()``.
    """

    name: str
    type: type[ParamValue]
    default: ParamValue
    description: str
    minimum: float | None = None
    maximum: float | None = None
    # For string parameters: the accepted values.
    choices: tuple[str, ...] = ()
    # For numbers bounded by the model (a token id, a layer, a head): the name of the model bound that is the
    # maximum (see explainers.methods.base.ModelShape.bounds), filled in by for_model().
    maximum_from: str = ""

    def for_model(self, bounds: Mapping[str, int]) -> ParamSpec:
        """This parameter with the maximum the model's ``bounds`` give it, if it takes one from the model."""
        if not self.maximum_from:
            return self
        return dataclasses.replace(self, maximum=bounds[self.maximum_from])

    @property
    def range_text(self) -> str:
        """Inclusive bounds as "lo..hi" (an open side is left empty, as in "0.."), or "" when unbounded."""
        if self.minimum is None and self.maximum is None:
            return ""
        return f"{_render(self.minimum)}..{_render(self.maximum)}"

    def describe(self) -> str:
        bounds = f", {self.range_text}" if self.range_text else ""
        return f"{self.name} ({self.type.__name__}{bounds}, default {_render(self.default)})"

    def parse(self, method: str, value: object, where: str = "params") -> ParamValue:
        """``value`` as this parameter's type, within its bounds and choices; ``where`` is the path of the method's
        parameters in the request, which messages name (``explain.methods[0].params``)."""
        named = f"{shown(f'{where}.{self.name}')} of method {method!r}"
        parsed = _coerce(self.type, value)
        if parsed is None:
            raise InvalidParamsError(f"{named} must be {_TYPE_NAMES[self.type]}; got {_quoted(value)}")
        if isinstance(parsed, int | float) and not isinstance(parsed, bool) and not self._in_range(parsed):
            raise InvalidParamsError(f"{named} must be in {self.range_text}; got {_quoted(parsed)}")
        if self.choices and parsed not in self.choices:
            raise InvalidParamsError(f"{named} must be one of {', '.join(self.choices)}; got {shown(parsed)}")
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

    @classmethod
    def from_info(cls, info: explanations_pb2.MethodParam) -> ParamSpec:
        """The parameter a catalogue entry publishes (as ``info()`` wrote it), bounds included."""
        kind = next((kind for kind, number in _PARAM_TYPES.items() if number == info.type), None)
        if kind is None:
            raise ValueError(f"parameter {info.name!r} has type {info.type}, which this version does not know")
        given = info.default_value.WhichOneof("kind")
        default = _coerce(kind, getattr(info.default_value, given)) if given else None
        if default is None:
            raise ValueError(f"parameter {info.name!r} has default {info.default_value}, not {_TYPE_NAMES[kind]}")
        return cls(
            name=info.name,
            type=kind,
            default=default,
            description=info.description,
            minimum=info.minimum if info.HasField("minimum") else None,
            maximum=info.maximum if info.HasField("maximum") else None,
            choices=tuple(info.choices),
        )


def parse_params(
    method: str, specs: Iterable[ParamSpec], values: Mapping[str, object], where: str = "params"
) -> dict[str, ParamValue]:
    """The request's parameter values typed and checked against the method's ``specs``: only those given, since
    each side fills in defaults where it needs them. Unknown names are refused listing the valid ones."""
    declared = {spec.name: spec for spec in specs}
    unknown = [name for name in values if name not in declared]
    if unknown:
        valid = "; ".join(spec.describe() for spec in declared.values()) or "none"
        raise InvalidParamsError(
            f"{shown(f'{where}.{unknown[0]}')} is not a parameter of method {method!r}; its parameters: {valid}"
        )
    return {name: declared[name].parse(method, value, where) for name, value in values.items()}


def params_path(index: int) -> str:
    """Where the parameters of the request's ``index``-th method are, as messages name them."""
    return f"explain.methods[{index}].params"


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
    # google.protobuf.Struct carries every number as a double, so 16.0 is a valid int.
    return int(value) if float(value).is_integer() else None


def param_value(value: ParamValue) -> types_pb2.ParamValue:
    """A parameter value as the API carries it, typed (a bool is never taken for an int)."""
    if isinstance(value, bool):
        return types_pb2.ParamValue(bool_value=value)
    if isinstance(value, int):
        return types_pb2.ParamValue(int_value=value)
    if isinstance(value, float):
        return types_pb2.ParamValue(float_value=value)
    return types_pb2.ParamValue(string_value=value)


def _quoted(value: object) -> str:
    """A refused value as a message quotes it: a number in full when short, else in scientific notation (never 300
    digits); anything else in part."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        text = repr(value)
        return text if len(text) <= 24 else f"{float(value):.6g}"
    return shown(value)


def _render(value: ParamValue | None) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# --- the methods named ---

# What Explain and EstimateExplanation run when a request names no method, chosen from the plausibility and
# faithfulness benchmark (benchmarks/plausibility.py; docs/methods.md, "Which method should I use"): AttnLRP where
# its rules cover the architecture (explainers/methods/attn_lrp.py refuses the others, saying why), else the method
# the benchmark supports among those that run on every architecture.
DEFAULT_METHOD = "attn_lrp"
ATTN_LRP_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
DEFAULT_METHOD_ELSEWHERE = "saliency"


def default_method(architecture: str) -> str:
    """The method a call that names none gets on a model of ``architecture`` (its Hugging Face model type)."""
    return DEFAULT_METHOD if architecture in ATTN_LRP_FAMILIES else DEFAULT_METHOD_ELSEWHERE


def with_default_method(spec: types_pb2.ExplainSpec, architecture: str) -> types_pb2.ExplainSpec:
    """``spec`` itself when it names methods, else a copy that names the default method for ``architecture`` with
    its default parameters."""
    if spec.methods:
        return spec
    defaulted = types_pb2.ExplainSpec()
    defaulted.CopyFrom(spec)
    defaulted.methods.add(name=default_method(architecture))
    return defaulted


def check_distinct_methods(names: Sequence[str]) -> None:
    repeated = [name for name, count in Counter(names).items() if count > 1]
    if repeated:
        raise InvalidInputError(
            f"explain methods must be distinct; named more than once: {shown(repeated)}; request each method once"
        )


def method_named(name: str, available: Mapping[str, MethodT]) -> MethodT:
    """The method called ``name`` among those ``available``; refused naming them all."""
    method = available.get(name)
    if method is None:
        raise UnknownMethodError(
            f"unknown explain method {shown(name)}; available methods: {', '.join(sorted(available))}"
        )
    return method


def check_contrastive_support(foil_token_ids: Sequence[int], supports_contrastive: Mapping[str, bool]) -> None:
    """Foils only with methods that explain a contrast (``supports_contrastive``: method name -> whether it does)."""
    unsupported = [name for name, supported in supports_contrastive.items() if not supported]
    if foil_token_ids and unsupported:
        raise InvalidInputError(
            f"methods {shown(unsupported)} do not support contrastive (foil) targets; drop "
            "explain.targets.foil_token_ids or those methods"
        )


# --- pictures ---

# The largest grid side a request may ask its pictures to be explained on (ExplainSpec.images); a worker also
# refuses a grid with more rows or columns than the picture it sees has pixels.
MAX_IMAGE_GRID_SIDE = 64


def check_image_grid(rows: int, cols: int) -> None:
    """Both 0 (the model's own grid of image tokens) or both between 1 and MAX_IMAGE_GRID_SIDE."""
    if (rows, cols) == (0, 0):
        return
    if not (1 <= rows <= MAX_IMAGE_GRID_SIDE and 1 <= cols <= MAX_IMAGE_GRID_SIDE):
        raise InvalidInputError(
            f"explain.images grid_rows and grid_cols must both be 0 (the model's own grid) or both between 1 and "
            f"{MAX_IMAGE_GRID_SIDE}; got {_quoted(rows)} x {_quoted(cols)}"
        )


def check_image_methods(asked: Sequence[str], multimodal: Mapping[str, bool]) -> None:
    """A request with pictures is explained only by methods that explain pictures; ``multimodal`` is the
    catalogue's method name -> whether it does (MethodInfo.multimodal), and names the allowed ones."""
    unsupported = [name for name in asked if not multimodal.get(name, False)]
    if unsupported:
        allowed = sorted(name for name, supported in multimodal.items() if supported)
        raise InvalidInputError(
            f"methods {shown(unsupported)} do not explain requests with pictures; "
            + (f"those that do: {', '.join(allowed)}" if allowed else "no method offered here does")
            + " (ListMethods: multimodal)"
        )


def check_image_options(options: ExplainOptions) -> None:
    """What the image methods explain: the log-probability of each explained token, without foils or faithfulness
    (not measured over pictures)."""
    if options.foil_token_ids:
        raise InvalidInputError(
            "requests with pictures are explained without contrastive (foil) targets; drop "
            "explain.targets.foil_token_ids"
        )
    if options.score != "logprob":
        raise InvalidInputError(
            f"requests with pictures are explained as log-probabilities; explain.targets.score {shown(options.score)} "
            "is not offered for them (use TARGET_SCORE_LOGPROB or leave it unset)"
        )
    if options.faithfulness:
        raise InvalidInputError(
            "faithfulness is not measured for requests with pictures yet; drop explain.faithfulness"
        )


# --- targets ---


def check_output_indices(indices: Sequence[int], num_generated: int | None = None) -> None:
    if any(i < 0 for i in indices) or list(indices) != sorted(set(indices)):
        raise InvalidInputError(
            f"explain.targets.output_indices must be distinct, ascending and >= 0 (0 is the first generated "
            f"token); got {list(indices[:10])}"
        )
    if num_generated is not None and indices and indices[-1] >= num_generated:
        raise InvalidInputError(
            f"explain.targets.output_indices go up to {indices[-1]}, but only {num_generated} tokens were generated"
        )


def check_foil_token_ids(
    foils: Sequence[int], *, num_explained: int | None = None, vocab_size: int | None = None
) -> None:
    """None, one foil for every target, or one per explained token; each a token id of the model."""
    check_token_ids("explain.targets.foil_token_ids", foils, vocab_size, allow_empty=True)
    if num_explained is not None and len(foils) not in (0, 1, num_explained):
        raise InvalidInputError(
            f"explain.targets.foil_token_ids has {len(foils)} ids; give one for every target or one per explained "
            f"token ({num_explained})"
        )


def check_score(score: str) -> None:
    if score not in TARGET_SCORES:
        raise InvalidInputError(f"unknown target score {shown(score)}; use one of {', '.join(TARGET_SCORES)}")


# --- aggregation ---


def check_aggregation(
    granularity: str, normalization: str, spans: Sequence[SpanRequest], num_tokens: int | None = None
) -> None:
    """Known granularity and normalization; spans with granularity "span" only, each inside the sequence's
    ``num_tokens`` tokens (prompt and output) when known, none overlapping another."""
    if granularity not in GRANULARITIES:
        raise InvalidInputError(f"unknown granularity {shown(granularity)}; use one of {', '.join(GRANULARITIES)}")
    if normalization not in NORMALIZATIONS:
        raise InvalidInputError(f"unknown normalization {shown(normalization)}; use one of {', '.join(NORMALIZATIONS)}")
    if granularity != "span":
        if spans:
            raise InvalidInputError(
                f"explain.aggregation.spans are only used with granularity 'span', not {granularity!r}; drop them "
                "or set the granularity to span"
            )
        return
    if not spans:
        raise InvalidInputError("granularity 'span' needs at least one span in explain.aggregation.spans")
    end = "end" if num_tokens is None else f"end <= {num_tokens}, the number of tokens (prompt and output)"
    for span in spans:
        if not 0 <= span.start < span.end or (num_tokens is not None and span.end > num_tokens):
            raise InvalidInputError(
                f"aggregation span [{span.start}, {span.end}) is out of range: spans need 0 <= start < {end}"
            )
    for before, after in pairwise(sorted(spans, key=lambda span: span.start)):
        if after.start < before.end:
            raise InvalidInputError(
                f"aggregation spans [{before.start}, {before.end}) and [{after.start}, {after.end}) overlap; "
                "spans must be disjoint"
            )


def check_step_scores_top_k(top_k: int) -> None:
    if not 1 <= top_k <= MAX_STEP_SCORES_TOP_K:
        raise InvalidInputError(
            f"explain.step_scores_top_k must be between 1 and {MAX_STEP_SCORES_TOP_K}; got {_quoted(top_k)}"
        )


def check_explain_options(
    options: ExplainOptions,
    *,
    num_tokens: int | None = None,
    num_generated: int | None = None,
    vocab_size: int | None = None,
) -> None:
    """Every rule about an explanation besides its methods, as far as the bounds given allow: the gateway checks
    before generating without them, then again with the generation's length and the model's vocabulary; a worker
    checks the job it took with all of them."""
    check_output_indices(options.output_indices, num_generated)
    explained = len(options.output_indices) or num_generated
    check_foil_token_ids(options.foil_token_ids, num_explained=explained, vocab_size=vocab_size)
    check_score(options.score)
    check_aggregation(options.granularity, options.normalization, options.spans, num_tokens)
    check_step_scores_top_k(options.step_scores_top_k)
    check_image_grid(options.image_grid_rows, options.image_grid_cols)


# --- the sequence ---


def check_token_ids(
    field: str, ids: Sequence[int], vocab_size: int | None = None, *, allow_empty: bool = False
) -> None:
    """Token ids are >= 0 and, when the model's ``vocab_size`` is known, below it."""
    if not ids and not allow_empty:
        raise InvalidInputError(f"{field} is empty; send at least one token id")
    if vocab_size is None:
        negative = [t for t in ids if t < 0]
        if negative:
            raise InvalidInputError(f"{field} holds negative token ids {negative[:5]}; token ids are >= 0")
        return
    outside = [(index, t) for index, t in enumerate(ids) if not 0 <= t < vocab_size]
    if outside:
        raise InvalidInputError(
            f"{field} holds token ids outside the model's vocabulary (ids 0 to {vocab_size - 1}): "
            f"{[t for _, t in outside[:5]]}, the first at index {outside[0][0]} ({len(outside)} such ids)"
        )


def check_sequence_length(num_prompt: int, num_output: int, context_window: int) -> None:
    """An explained sequence has a prompt and an output, and fits the model's context window."""
    if num_prompt < 1 or num_output < 1:
        raise InvalidInputError(
            f"an explained sequence needs at least one prompt token and one output token; got {num_prompt} and "
            f"{num_output}"
        )
    if num_prompt + num_output > context_window:
        raise InvalidInputError(
            f"prompt and output together have {num_prompt + num_output} tokens; the model's context window is "
            f"{context_window}"
        )


def check_served_logprobs(field: str, values: Sequence[float], num_outputs: int) -> None:
    """The served log-probabilities the fidelity check compares with: one finite number per output token."""
    if len(values) != num_outputs:
        raise InvalidInputError(
            f"{field} has {len(values)} values for {num_outputs} output tokens; send one per output token or none"
        )
    not_finite = [index for index, value in enumerate(values) if not math.isfinite(value)]
    if not_finite:
        raise InvalidInputError(
            f"{field}[{not_finite[0]}] is {values[not_finite[0]]}; served log-probabilities are finite numbers"
        )


def check_explained_sequence(
    prompt_ids: Sequence[int],
    output_ids: Sequence[int],
    served_logprobs: Sequence[float] | None,
    options: ExplainOptions,
    *,
    context_window: int,
    vocab_size: int,
) -> None:
    """Everything about one explained sequence and its options, with the model's bounds: what a worker checks on
    every job it takes from the queue, and what the gateway has checked piecemeal by the time it enqueues one."""
    check_sequence_length(len(prompt_ids), len(output_ids), context_window)
    check_token_ids("prompt_token_ids", prompt_ids, vocab_size)
    check_token_ids("output_token_ids", output_ids, vocab_size)
    if served_logprobs is not None:
        check_served_logprobs("served_logprobs", served_logprobs, len(output_ids))
    check_explain_options(
        options, num_tokens=len(prompt_ids) + len(output_ids), num_generated=len(output_ids), vocab_size=vocab_size
    )
