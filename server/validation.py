"""Request validation: turn proto fields into checked values or precise INVALID_ARGUMENT errors."""

from __future__ import annotations

import math

from sightline.v1 import types_pb2

from common.jobs import ExplainOptions, SpanRequest
from server.errors import invalid_argument, shown
from server.vllm_client import Sampling

CHAT_ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256


def sampling_from_proto(params: types_pb2.SamplingParams, *, default_max_tokens: int, max_model_len: int) -> Sampling:
    max_tokens = params.max_tokens if params.HasField("max_tokens") else default_max_tokens
    if not 1 <= max_tokens < max_model_len:
        raise invalid_argument(
            f"sampling.max_tokens must be between 1 and {max_model_len - 1} "
            f"(the model's context window is {max_model_len} tokens); got {max_tokens}"
        )
    temperature = params.temperature if params.HasField("temperature") else 0.0
    if not math.isfinite(temperature) or not 0.0 <= temperature <= 100.0:
        raise invalid_argument(f"sampling.temperature must be between 0 and 100 (0 is greedy); got {temperature}")
    top_p = params.top_p if params.HasField("top_p") else 1.0
    if not math.isfinite(top_p) or not 0.0 < top_p <= 1.0:
        raise invalid_argument(f"sampling.top_p must be in (0, 1]; got {top_p}")
    top_k = params.top_k if params.HasField("top_k") else 0
    if top_k < 0:
        raise invalid_argument(f"sampling.top_k must be 0 (disabled) or positive; got {top_k}")
    if len(params.stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_LENGTH for s in params.stop):
        raise invalid_argument(
            f"sampling.stop takes at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_LENGTH} characters"
        )
    return Sampling(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k or None,
        seed=params.seed if params.HasField("seed") else None,
        stop=tuple(params.stop),
    )


def chat_messages(chat: types_pb2.ChatMessages) -> list[dict[str, str]]:
    if not chat.messages:
        raise invalid_argument("input.chat has no messages; send at least one user message")
    for index, message in enumerate(chat.messages):
        if message.role not in CHAT_ROLES:
            raise invalid_argument(
                f"input.chat.messages[{index}].role must be one of {', '.join(CHAT_ROLES)}; got {shown(message.role)}"
            )
    if all(not m.content.strip() for m in chat.messages):
        raise invalid_argument("input.chat messages are all empty; send some content")
    return [{"role": m.role, "content": m.content} for m in chat.messages]


def token_ids(ids: list[int], *, field: str, max_model_len: int, allow_empty: bool = False) -> list[int]:
    if not ids and not allow_empty:
        raise invalid_argument(f"{field} is empty; send at least one token id")
    negative = [t for t in ids if t < 0]
    if negative:
        raise invalid_argument(f"{field} holds negative token ids {negative[:5]}; token ids are >= 0")
    if len(ids) >= max_model_len:
        raise invalid_argument(
            f"{field} has {len(ids)} tokens; the model's context window is {max_model_len} tokens "
            "and must leave room for at least one generated token"
        )
    return list(ids)


def served_logprobs(values: list[float], num_outputs: int) -> list[float]:
    """The served log-probabilities an Explain request carries for the fidelity check: none, or one per output."""
    if values and len(values) != num_outputs:
        raise invalid_argument(
            f"output_logprobs has {len(values)} values for {num_outputs} output tokens; "
            "send one per output token or none"
        )
    not_finite = [index for index, value in enumerate(values) if not math.isfinite(value)]
    if not_finite:
        raise invalid_argument(
            f"output_logprobs[{not_finite[0]}] is {values[not_finite[0]]}; served log-probabilities are finite numbers"
        )
    return values


EXPLAIN_MODES = (types_pb2.EXPLAIN_MODE_UNSPECIFIED, types_pb2.EXPLAIN_MODE_SYNC, types_pb2.EXPLAIN_MODE_ASYNC)


def explain_mode(spec: types_pb2.ExplainSpec) -> types_pb2.ExplainMode:
    # Checked, not defaulted: a mode this gateway does not know could mean either, and SYNC holds the call open.
    if spec.mode not in EXPLAIN_MODES:
        raise invalid_argument(
            f"explain.mode {spec.mode} is not an ExplainMode value; use EXPLAIN_MODE_SYNC or EXPLAIN_MODE_ASYNC"
        )
    return spec.mode


MAX_STEP_SCORES_TOP_K = 50
TARGET_SCORES = {
    types_pb2.TARGET_SCORE_UNSPECIFIED: "logprob",
    types_pb2.TARGET_SCORE_LOGPROB: "logprob",
    types_pb2.TARGET_SCORE_PROBABILITY: "probability",
    types_pb2.TARGET_SCORE_LOGIT: "logit",
}
GRANULARITIES = {
    types_pb2.GRANULARITY_UNSPECIFIED: "token",
    types_pb2.GRANULARITY_TOKEN: "token",
    types_pb2.GRANULARITY_WORD: "word",
    types_pb2.GRANULARITY_SPAN: "span",
}
NORMALIZATIONS = {
    types_pb2.NORMALIZATION_UNSPECIFIED: "none",
    types_pb2.NORMALIZATION_NONE: "none",
    types_pb2.NORMALIZATION_L1: "l1",
    types_pb2.NORMALIZATION_MAX_ABS: "max_abs",
}


def explain_options(spec: types_pb2.ExplainSpec) -> ExplainOptions:
    """The checks that need no generation: everything but the bounds that depend on the output length."""
    targets, aggregation = spec.targets, spec.aggregation
    indices = list(targets.output_indices)
    if any(i < 0 for i in indices) or indices != sorted(set(indices)):
        raise invalid_argument(
            f"explain.targets.output_indices must be distinct, ascending and >= 0 (0 is the first generated "
            f"token); got {indices[:10]}"
        )
    foils = list(targets.foil_token_ids)
    if any(f < 0 for f in foils):
        raise invalid_argument(f"explain.targets.foil_token_ids must be token ids >= 0; got {foils[:10]}")
    if targets.score not in TARGET_SCORES:
        raise invalid_argument(f"explain.targets.score {targets.score} is not a TargetScore value")
    if aggregation.granularity not in GRANULARITIES:
        raise invalid_argument(f"explain.aggregation.granularity {aggregation.granularity} is not a Granularity value")
    if aggregation.normalization not in NORMALIZATIONS:
        raise invalid_argument(
            f"explain.aggregation.normalization {aggregation.normalization} is not a Normalization value"
        )
    granularity = GRANULARITIES[aggregation.granularity]
    if aggregation.spans and granularity != "span":
        raise invalid_argument("explain.aggregation.spans are only used with GRANULARITY_SPAN; set granularity")
    if granularity == "span" and not aggregation.spans:
        raise invalid_argument("GRANULARITY_SPAN needs explain.aggregation.spans")
    spans = sorted(aggregation.spans, key=lambda span: span.start)
    for index, span in enumerate(spans):
        if not 0 <= span.start < span.end:
            raise invalid_argument(f"aggregation span [{span.start}, {span.end}) must satisfy 0 <= start < end")
        if index and span.start < spans[index - 1].end:
            raise invalid_argument(f"aggregation spans overlap at token {span.start}; spans must be disjoint")
    top_k = spec.step_scores_top_k if spec.HasField("step_scores_top_k") else 5
    if not 1 <= top_k <= MAX_STEP_SCORES_TOP_K:
        raise invalid_argument(f"explain.step_scores_top_k must be between 1 and {MAX_STEP_SCORES_TOP_K}; got {top_k}")
    return ExplainOptions(
        output_indices=indices,
        foil_token_ids=foils,
        score=TARGET_SCORES[targets.score],
        granularity=granularity,
        spans=[SpanRequest(span.start, span.end, span.label) for span in spans],
        absolute=aggregation.absolute,
        normalization=NORMALIZATIONS[aggregation.normalization],
        faithfulness=spec.faithfulness,
        step_scores_top_k=top_k,
    )


def check_options_fit(options: ExplainOptions, num_tokens: int, num_generated: int) -> None:
    """The checks that need the generation's length."""
    if options.output_indices and options.output_indices[-1] >= num_generated:
        raise invalid_argument(
            f"explain.targets.output_indices go up to {options.output_indices[-1]}, but only {num_generated} "
            "tokens were generated"
        )
    explained = len(options.output_indices) or num_generated
    if len(options.foil_token_ids) not in (0, 1, explained):
        raise invalid_argument(
            f"explain.targets.foil_token_ids has {len(options.foil_token_ids)} ids; give one for every target "
            f"or one per explained token ({explained})"
        )
    if options.spans and options.spans[-1].end > num_tokens:
        raise invalid_argument(
            f"aggregation span ends at {options.spans[-1].end}, past the sequence's {num_tokens} tokens"
        )


def method_params(method: types_pb2.MethodSpec, index: int) -> dict[str, object]:
    """A method's typed ``params`` as plain values (an int stays an int), refusing a non-finite number and a
    value with no kind set."""
    where = f"explain.methods[{index}].params"
    return {key: _param_value(value, f"{where}.{key}", method.name) for key, value in method.params.items()}


def _param_value(value: types_pb2.ParamValue, where: str, method: str) -> object:
    kind = value.WhichOneof("kind")
    if kind is None:
        raise invalid_argument(
            f"{shown(where)} of method {shown(method)} has no value; set one of int_value, float_value, "
            "string_value or bool_value"
        )
    if kind == "float_value" and not math.isfinite(value.float_value):
        raise invalid_argument(
            f"{shown(where)} of method {shown(method)} is {value.float_value}; parameters must be finite numbers"
        )
    return getattr(value, kind)
