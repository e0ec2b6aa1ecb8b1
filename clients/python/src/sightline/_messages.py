"""Request building and response decoding shared by ``Client`` and ``AsyncClient``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import grpc
from sightline.catalog import MethodCatalog
from sightline.errors import SightlineError
from sightline.images import content_parts
from sightline.types import (
    ExplainMethods,
    ExplainModeName,
    ExplainOptions,
    Explanation,
    GranularityName,
    NormalizationName,
    ParamValue,
    Prompt,
    TargetScoreName,
)
from sightline.v1 import explanations_pb2, inference_pb2, types_pb2

Response = TypeVar("Response")
Result = TypeVar("Result")

_EXPLAIN_MODES = {"sync": types_pb2.EXPLAIN_MODE_SYNC, "async": types_pb2.EXPLAIN_MODE_ASYNC}
_TARGET_SCORES: dict[TargetScoreName, types_pb2.TargetScore] = {
    "logprob": types_pb2.TARGET_SCORE_LOGPROB,
    "probability": types_pb2.TARGET_SCORE_PROBABILITY,
    "logit": types_pb2.TARGET_SCORE_LOGIT,
}
_GRANULARITIES: dict[GranularityName, types_pb2.Granularity] = {
    "token": types_pb2.GRANULARITY_TOKEN,
    "word": types_pb2.GRANULARITY_WORD,
    "span": types_pb2.GRANULARITY_SPAN,
}
_NORMALIZATIONS: dict[NormalizationName, types_pb2.Normalization] = {
    "none": types_pb2.NORMALIZATION_NONE,
    "l1": types_pb2.NORMALIZATION_L1,
    "max_abs": types_pb2.NORMALIZATION_MAX_ABS,
}
_CHAT_MESSAGE_KEYS = frozenset({"role", "content"})
INT32 = range(-(2**31), 2**31)


def param_value(method: str, name: str, value: ParamValue) -> types_pb2.ParamValue:
    """A parameter's value, typed as the API carries it: a bool is never taken for an int, nor an int for a float."""
    if isinstance(value, bool):
        return types_pb2.ParamValue(bool_value=value)
    if isinstance(value, int):
        if value not in INT32:
            raise ValueError(f"parameter {name!r} of method {method!r} is {value}, outside the 32-bit integers")
        return types_pb2.ParamValue(int_value=value)
    if isinstance(value, float):
        return types_pb2.ParamValue(float_value=value)
    if isinstance(value, str):
        return types_pb2.ParamValue(string_value=value)
    raise TypeError(
        f"parameter {name!r} of method {method!r} must be a bool, int, float or str, got {type(value).__name__}"
    )


def generation_input(prompt: Prompt) -> inference_pb2.GenerationInput:
    if isinstance(prompt, str):
        return inference_pb2.GenerationInput(prompt=prompt)
    # bool is an int subclass, but True is never meant as a token id.
    token_ids = [item for item in prompt if isinstance(item, int) and not isinstance(item, bool)]
    if token_ids and len(token_ids) == len(prompt):
        return inference_pb2.GenerationInput(prompt_token_ids=types_pb2.TokenIds(ids=token_ids))
    messages = [item for item in prompt if isinstance(item, Mapping)]
    if messages and len(messages) == len(prompt):
        return inference_pb2.GenerationInput(
            chat=types_pb2.ChatMessages(messages=[_chat_message(message) for message in messages])
        )
    raise TypeError("prompt must be a string, a non-empty list of token ids, or a non-empty list of chat messages")


def _chat_message(message: Mapping[str, object]) -> types_pb2.ChatMessage:
    # Unknown keys are refused rather than dropped, so that nothing the caller wrote vanishes silently.
    if set(message) != _CHAT_MESSAGE_KEYS:
        raise ValueError(f"a chat message has exactly the keys 'role' and 'content', got {sorted(message)}")
    role, content = str(message["role"]), message["content"]
    if isinstance(content, str):
        return types_pb2.ChatMessage(role=role, content=content)
    if isinstance(content, Sequence):
        # Text mixed with pictures (sightline.images).
        return types_pb2.ChatMessage(role=role, parts=content_parts(content))
    raise TypeError(f"a chat message's content is a str or a list of text and pictures, not {type(content).__name__}")


def explain_spec(
    methods: ExplainMethods | None, mode: ExplainModeName, options: ExplainOptions | None
) -> types_pb2.ExplainSpec | None:
    """The explain spec for ``methods``, or None (no explanation) when there are none."""
    if mode not in _EXPLAIN_MODES:
        raise ValueError(f"mode must be 'sync' or 'async', got {mode!r}")
    if not methods:
        if options is not None:  # refused rather than dropped: they would explain nothing
            raise ValueError("explain options need at least one method to explain with")
        return None
    if isinstance(methods, str):  # one method's name, not a sequence of one-letter names
        methods = [methods]
    if isinstance(methods, Mapping):
        specs = [
            types_pb2.MethodSpec(
                name=name, params={key: param_value(name, key, value) for key, value in params.items()}
            )
            for name, params in methods.items()
        ]
    else:
        specs = [types_pb2.MethodSpec(name=name) for name in methods]
    spec = types_pb2.ExplainSpec(methods=specs, mode=_EXPLAIN_MODES[mode])
    if options is not None:
        spec.MergeFrom(_options_spec(options))
    return spec


def _spec_or_default(
    methods: ExplainMethods | None, mode: ExplainModeName, options: ExplainOptions | None
) -> types_pb2.ExplainSpec:
    """The spec of Explain and EstimateExplanation, where naming no method asks for the server's default method
    (Generate's no method means no explanation instead)."""
    if methods:
        return explain_spec(methods, mode, options) or types_pb2.ExplainSpec()
    explain_spec(None, mode, None)  # checks the mode
    spec = types_pb2.ExplainSpec(mode=_EXPLAIN_MODES[mode])
    if options is not None:
        spec.MergeFrom(_options_spec(options))
    return spec


def _options_spec(options: ExplainOptions) -> types_pb2.ExplainSpec:
    """The spec fields ``options`` set, to merge into one that names the methods."""
    return types_pb2.ExplainSpec(
        targets=types_pb2.TargetSpec(
            output_indices=options.output_indices,
            foil_token_ids=options.foil_token_ids,
            score=_TARGET_SCORES[options.score],
        ),
        aggregation=types_pb2.AggregationSpec(
            granularity=_GRANULARITIES[options.granularity],
            spans=[types_pb2.Span(start=start, end=end, label=label) for start, end, label in options.spans],
            absolute=options.absolute,
            normalization=_NORMALIZATIONS[options.normalization],
        ),
        faithfulness=options.faithfulness,
        step_scores_top_k=options.step_scores_top_k,  # None leaves it unset, for the server's default
        keep_on_disconnect=options.keep_on_disconnect,
        images=(
            None
            if options.image_grid is None
            else types_pb2.ImageExplainOptions(grid_rows=options.image_grid[0], grid_cols=options.image_grid[1])
        ),
    )


def generate_request(
    prompt: Prompt,
    *,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    stop: str | Sequence[str] | None,
    explain: ExplainMethods | None,
    mode: ExplainModeName,
    options: ExplainOptions | None,
    model: str,
    request_id: str | None,
) -> inference_pb2.GenerateRequest:
    """The request of Generate and of GenerateStream."""
    # protobuf leaves a field passed as None unset, so the server applies its documented default.
    sampling = types_pb2.SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=[stop] if isinstance(stop, str) else stop,
    )
    return inference_pb2.GenerateRequest(
        model=model,
        input=generation_input(prompt),
        sampling=sampling,
        explain=explain_spec(explain, mode, options),
        request_id=request_id,
    )


def explain_request(
    prompt_token_ids: Sequence[int],
    output_token_ids: Sequence[int],
    methods: ExplainMethods | None,
    *,
    output_logprobs: Sequence[float] | None,
    mode: ExplainModeName,
    options: ExplainOptions | None,
    model: str,
    request_id: str | None,
) -> explanations_pb2.ExplainRequest:
    return explanations_pb2.ExplainRequest(
        model=model,
        prompt_token_ids=prompt_token_ids,
        output_token_ids=output_token_ids,
        output_logprobs=output_logprobs,
        explain=_spec_or_default(methods, mode, options),
        request_id=request_id,
    )


def list_explanations_request(page_size: int, page_token: str) -> explanations_pb2.ListExplanationsRequest:
    if page_size < 0:
        raise ValueError(f"page_size must be >= 0 (0 lets the server choose); got {page_size}")
    return explanations_pb2.ListExplanationsRequest(page_size=page_size, page_token=page_token)


def attached_explanation(message: types_pb2.Explanation, present: bool) -> Explanation:
    if not present:
        raise ValueError("the server attached no explanation")
    return Explanation.from_proto(message)


def explain_result(mode: ExplainModeName) -> Callable[[explanations_pb2.ExplainResponse], Explanation | str]:
    """How to read an ExplainResponse: the attached explanation in sync mode, else its id."""
    if mode == "async":
        return lambda response: response.explanation_id
    return lambda response: attached_explanation(response.explanation, response.HasField("explanation"))


def estimate_request(
    methods: ExplainMethods | None,
    prompt_tokens: int,
    output_tokens: int,
    options: ExplainOptions | None,
    model: str,
) -> explanations_pb2.EstimateExplanationRequest:
    return explanations_pb2.EstimateExplanationRequest(
        model=model,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        explain=_spec_or_default(methods, "async", options),
    )


def get_explanation_result(response: explanations_pb2.GetExplanationResponse) -> Explanation:
    return attached_explanation(response.explanation, response.HasField("explanation"))


def decode(convert: Callable[[Response], Result], response: Response) -> Result:
    """Convert a response, reporting a malformed one as a SightlineError like any other failed call."""
    try:
        return convert(response)
    except ValueError as error:
        raise SightlineError(grpc.StatusCode.INTERNAL, f"malformed response from the server: {error}") from error


def method_catalog(response: explanations_pb2.ListMethodsResponse) -> MethodCatalog:
    return MethodCatalog.from_proto(response)
