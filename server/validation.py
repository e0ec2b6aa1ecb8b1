"""Request validation: turn proto fields into checked values or precise INVALID_ARGUMENT errors."""

from __future__ import annotations

import math
from collections.abc import Sequence

from sightline.v1 import explanations_pb2, types_pb2

from common.explain_spec import (
    ParamSpec,
    check_explain_options,
    check_foil_token_ids,
    check_served_logprobs,
    check_token_ids,
    params_path,
    parse_params,
)
from common.jobs import ExplainOptions, MethodRequest, SpanRequest
from server.errors import invalid_argument, shown, spec_errors_as_invalid_argument
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
    with spec_errors_as_invalid_argument():
        check_token_ids(field, ids, allow_empty=allow_empty)
    if len(ids) >= max_model_len:
        raise invalid_argument(
            f"{field} has {len(ids)} tokens; the model's context window is {max_model_len} tokens "
            "and must leave room for at least one generated token"
        )
    return list(ids)


def served_logprobs(values: list[float], num_outputs: int) -> list[float]:
    """The served log-probabilities an Explain request carries for the fidelity check: none, or one per output."""
    if values:
        with spec_errors_as_invalid_argument():
            check_served_logprobs("output_logprobs", values, num_outputs)
    return values


# What an unset explain.step_scores_top_k means: ExplainOptions' default.
DEFAULT_STEP_SCORES_TOP_K = ExplainOptions.step_scores_top_k
EXPLAIN_MODES = (types_pb2.EXPLAIN_MODE_UNSPECIFIED, types_pb2.EXPLAIN_MODE_SYNC, types_pb2.EXPLAIN_MODE_ASYNC)


def explain_mode(spec: types_pb2.ExplainSpec) -> types_pb2.ExplainMode:
    # Checked, not defaulted: a mode this gateway does not know could mean either, and SYNC holds the call open.
    if spec.mode not in EXPLAIN_MODES:
        raise invalid_argument(
            f"explain.mode {spec.mode} is not an ExplainMode value; use EXPLAIN_MODE_SYNC or EXPLAIN_MODE_ASYNC"
        )
    return spec.mode


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
    """The spec's options, checked as far as they can be before generating (common/explain_spec.py)."""
    targets, aggregation = spec.targets, spec.aggregation
    if targets.score not in TARGET_SCORES:
        raise invalid_argument(f"explain.targets.score {targets.score} is not a TargetScore value")
    if aggregation.granularity not in GRANULARITIES:
        raise invalid_argument(f"explain.aggregation.granularity {aggregation.granularity} is not a Granularity value")
    if aggregation.normalization not in NORMALIZATIONS:
        raise invalid_argument(
            f"explain.aggregation.normalization {aggregation.normalization} is not a Normalization value"
        )
    options = ExplainOptions(
        output_indices=list(targets.output_indices),
        foil_token_ids=list(targets.foil_token_ids),
        score=TARGET_SCORES[targets.score],
        granularity=GRANULARITIES[aggregation.granularity],
        spans=[SpanRequest(span.start, span.end, span.label) for span in sorted(aggregation.spans, key=_start)],
        absolute=aggregation.absolute,
        normalization=NORMALIZATIONS[aggregation.normalization],
        faithfulness=spec.faithfulness,
        step_scores_top_k=spec.step_scores_top_k if spec.HasField("step_scores_top_k") else DEFAULT_STEP_SCORES_TOP_K,
        image_grid_rows=spec.images.grid_rows,
        image_grid_cols=spec.images.grid_cols,
    )
    with spec_errors_as_invalid_argument():
        check_explain_options(options)
    return options


def _start(span: types_pb2.Span) -> int:
    return span.start


def check_options_fit(options: ExplainOptions, num_tokens: int, num_generated: int) -> None:
    """The checks that need the generation's length."""
    with spec_errors_as_invalid_argument():
        check_explain_options(options, num_tokens=num_tokens, num_generated=num_generated)


def check_within_vocabulary(
    prompt_token_ids: Sequence[int], output_token_ids: Sequence[int], options: ExplainOptions, vocab_size: int
) -> None:
    """The token ids of an explanation, foils included, against the vocabulary of the model the workers hold."""
    with spec_errors_as_invalid_argument():
        check_token_ids("prompt_token_ids", prompt_token_ids, vocab_size)
        check_token_ids("output_token_ids", output_token_ids, vocab_size)
        check_foil_token_ids(options.foil_token_ids, vocab_size=vocab_size)


def method_request(method: types_pb2.MethodSpec, index: int, info: explanations_pb2.MethodInfo) -> MethodRequest:
    """The request's ``index``-th method with its parameters typed and checked against those the workers'
    catalogue declares for it (with the bounds their model gives them), as the workers will check them."""
    declared = [ParamSpec.from_info(param) for param in info.params]
    with spec_errors_as_invalid_argument():
        params = parse_params(info.name, declared, method_params(method, index), params_path(index))
    return MethodRequest(info.name, dict(params))


def method_params(method: types_pb2.MethodSpec, index: int) -> dict[str, object]:
    """A method's typed ``params`` as plain values (an int stays an int), refusing a non-finite number and a
    value with no kind set."""
    where = params_path(index)
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
