"""Explain one generated sequence: validate, fetch or compute the hidden states once, run each method, check
fidelity against what was served.

Precision: methods always see the hidden states at the cache's bfloat16 precision, also on a miss, so a cache
hit reproduces a miss's results exactly. Step scores and fidelity are read out (final norm + unembedding) of the
forward pass's last layer at full precision, which the cache keeps beside the states, so a hit reports the miss's
numbers for any prompt/output split; only if that entry has gone do they come from the cached bfloat16 last layer
(~1e-2 in log-probability). The cache also keeps what was read out for each split, so a hit on the same split (the
usual re-explanation: another method for the same answer) skips the readout, the unembedding of every generated
token, altogether.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from sightline.v1 import types_pb2

from common.costs import method_passes

# Re-exported: what explain() raises for a request the spec refuses; the worker fails such a job without retrying.
from common.explain_spec import InvalidInputError as InvalidInputError
from common.explain_spec import (
    check_contrastive_support,
    check_distinct_methods,
    check_explained_sequence,
    params_path,
)
from common.jobs import ExplainOptions
from explainers.aggregation import TokenGroup, aggregate, source_groups
from explainers.backprop import RecordedLayers
from explainers.faithfulness import faithfulness_of
from explainers.hidden_cache import LAST_LAYER_DTYPE, STORAGE_DTYPE, DerivedTensors, HiddenStateCache
from explainers.methods.base import AttributionContext, AttributionMethod, ModelShape, tensor_array, tensor_proto
from explainers.methods.registry import get_method
from explainers.model import LoadedModel, forward_with_hidden_states
from explainers.progress import JobProgress, Tracking, checkpoint
from explainers.step_scores import Readout, read_out
from explainers.targets import Targets, TargetScore
from explainers.telemetry import SPAN_KIND, describe_faithfulness, describe_method, tracer
from explainers.token_roles import assign_roles

logger = logging.getLogger(__name__)

TARGET_SCORES = {
    TargetScore.LOGPROB: types_pb2.TARGET_SCORE_LOGPROB,
    TargetScore.PROBABILITY: types_pb2.TARGET_SCORE_PROBABILITY,
    TargetScore.LOGIT: types_pb2.TARGET_SCORE_LOGIT,
}


def explain(
    loaded: LoadedModel,
    cache: HiddenStateCache | None,
    prompt_ids: list[int],
    output_ids: list[int],
    methods: list[tuple[str, dict[str, object]]],
    served_logprobs: list[float] | None,
    options: ExplainOptions | None = None,
    tracking: Tracking | None = None,
    chat: Sequence[Mapping[str, str]] | None = None,
) -> types_pb2.Explanation:
    """Attribute the generated tokens of prompt_ids + output_ids that options select with each (method, params).

    Raises InvalidInputError (a ValueError; UnknownMethodError and InvalidParamsError are kinds of it) before any
    model work, for anything the explain spec refuses: the worker re-checks every job it takes from the queue with
    the rules the gateway checked it with (common/explain_spec.py), against the model it holds.
    Fills the computed fields; the caller owns id, state, timestamps, trace id and attempts. With ``tracking``,
    publishes progress as it goes and raises JobCancelled at the first checkpoint after the job was cancelled.
    ``chat``: the messages a chat prompt was rendered from, which tell each prompt token's role.
    """
    options = options or ExplainOptions()
    requested = _parse_methods(methods, ModelShape.of(loaded))
    check_explained_sequence(
        prompt_ids,
        output_ids,
        served_logprobs,
        options,
        context_window=loaded.max_positions,
        vocab_size=loaded.vocab_size,
    )
    check_contrastive_support(
        options.foil_token_ids, {method.name: method.supports_contrastive_targets for method, _ in requested}
    )
    sequence = [*prompt_ids, *output_ids]
    token_ids = torch.tensor(sequence, dtype=torch.long)
    generated_positions = torch.arange(len(prompt_ids), len(sequence))
    targets = _targets(token_ids, generated_positions, options)
    tokens = _tokens(loaded, sequence, len(prompt_ids), served_logprobs)
    assign_roles(loaded.tokenizer, tokens, len(prompt_ids), chat)
    groups = _source_groups(loaded, sequence, tokens, options)

    progress = _job_progress(requested, tracking, len(sequence), len(targets.positions))
    record = any(method.reuses_embedding_recording for method, _ in requested)
    derived = None if cache is None else cache.derived(loaded.weights_digest, sequence)
    with progress.forward_pass() if progress else contextlib.nullcontext([False]) as forward_hit:
        states = _hidden_states(
            loaded, cache, derived, token_ids, len(prompt_ids), targets, options.step_scores_top_k, record
        )
        forward_hit[0] = states.cache_hit
    ctx = AttributionContext(
        loaded=loaded,
        token_ids=token_ids,
        prompt_length=len(prompt_ids),
        targets=targets,
        hidden_states=states.hidden_states,
        embedding_recording=states.embedding_recording,
        derived=derived,
    )
    # Only ctx holds the recording from here on: it is freed once no method still to run reuses it.
    step_scores, recomputed_logprobs, cache_hit = states.step_scores, states.recomputed_logprobs, states.cache_hit
    del states
    explanation = types_pb2.Explanation(
        model=loaded.model_name,
        weights_digest=loaded.weights_digest,
        tokens=tokens,
        prompt_length=len(prompt_ids),
        target_positions=targets.positions.tolist(),
        foil_token_ids=[] if targets.foil_ids is None else targets.foil_ids.tolist(),
        target_score=TARGET_SCORES[targets.score],
        step_scores=step_scores,
        cache_hit=cache_hit,
        source_groups=[types_pb2.SourceGroup(start=g.start, end=g.end, label=g.label) for g in groups],
        explain_path=loaded.path.proto,
        architecture=loaded.architecture.model_type,
    )
    measured: dict[str, torch.Tensor] = {}  # the attributions whose faithfulness is asked for, by method
    for index, (method, params) in enumerate(requested):
        if not any(later.reuses_embedding_recording for later, _ in requested[index:]):
            ctx = replace(ctx, embedding_recording=None)
        with (
            progress.method(index) if progress else contextlib.nullcontext(),
            tracer.start_as_current_span(
                f"method {method.name}", attributes={"sightline.method": method.name, SPAN_KIND: "EVALUATOR"}
            ) as method_span,
        ):
            started = time.perf_counter()
            result = method.attribute(ctx, params)
            result.seconds = time.perf_counter() - started
            describe_method(method_span, explanation, result)
        if result.HasField("attributions"):
            matrix = _float_matrix(result.attributions)
            aggregated = aggregate(matrix, groups, targets.positions, options.absolute, options.normalization)
            result.aggregated.CopyFrom(tensor_proto(aggregated))
            if options.faithfulness:
                measured[method.name] = matrix
        explanation.results.append(result)
    if measured:
        # All methods at once, so that the perturbations they share are scored once (explainers.faithfulness).
        with tracer.start_as_current_span("faithfulness"):
            measures = faithfulness_of(loaded, token_ids, targets, measured)
            for result in explanation.results:
                if result.method in measures:
                    with tracer.start_as_current_span(f"faithfulness {result.method}") as faithfulness_span:
                        result.faithfulness.CopyFrom(measures[result.method])
                        describe_faithfulness(faithfulness_span, result.faithfulness)
    if tracking is not None and progress is not None:
        tracking.seconds_per_pass = progress.seconds_per_pass

    with tracer.start_as_current_span("fidelity") as span:
        explanation.fidelity.recomputed_logprobs.extend(recomputed_logprobs.tolist())
        if served_logprobs is not None:
            served = torch.tensor(served_logprobs, dtype=recomputed_logprobs.dtype)
            explanation.fidelity.max_abs_logprob_diff = float((recomputed_logprobs - served).abs().max())
            # As the response carries it (a float32 field), so that trace and response agree.
            span.set_attribute("sightline.fidelity.max_abs_logprob_diff", explanation.fidelity.max_abs_logprob_diff)
    return explanation


def _job_progress(
    requested: list[tuple[AttributionMethod[Any], Any]], tracking: Tracking | None, num_tokens: int, num_targets: int
) -> JobProgress | None:
    """The tracker of a job's methods, weighted by their predicted passes; None without ``tracking``."""
    if tracking is None:
        return None
    planned = [
        (
            method.name,
            method_passes(
                method.cost.info(),
                num_tokens=num_tokens,
                num_targets=num_targets,
                scale=float(getattr(params, method.cost.scaled_by, 1)) if method.cost.scaled_by else 1.0,
            ),
        )
        for method, params in requested
    ]
    return JobProgress(
        planned, tracking.publish, seconds_per_pass=tracking.seconds_per_pass, interval=tracking.interval
    )


def _targets(token_ids: torch.Tensor, generated_positions: torch.Tensor, options: ExplainOptions) -> Targets:
    """The targets ``options`` select, which check_explained_sequence has checked."""
    indices = options.output_indices or list(range(len(generated_positions)))
    positions = generated_positions[indices]
    foils = options.foil_token_ids
    foil_ids = torch.tensor(foils * len(positions) if len(foils) == 1 else foils) if foils else None
    return Targets(
        positions=positions, token_ids=token_ids[positions], foil_ids=foil_ids, score=TargetScore(options.score)
    )


def _source_groups(
    loaded: LoadedModel, sequence: list[int], tokens: list[types_pb2.Token], options: ExplainOptions
) -> list[TokenGroup]:
    special_ids = set(loaded.tokenizer.all_special_ids)
    special_positions = {position for position, token in enumerate(sequence) if token in special_ids}
    return source_groups([token.text for token in tokens], special_positions, options)


def _float_matrix(packed: types_pb2.Tensor) -> torch.Tensor:
    """The float32 tensor a MethodResult's attributions hold."""
    return torch.from_numpy(tensor_array(packed))


def _parse_methods(
    methods: Sequence[tuple[str, Mapping[str, object]]], shape: ModelShape
) -> list[tuple[AttributionMethod[Any], Any]]:
    check_distinct_methods([name for name, _ in methods])
    return [
        (method, method.parse_params(params, shape, params_path(index)))
        for index, (name, params) in enumerate(methods)
        for method in (get_method(name),)
    ]


@dataclass(frozen=True)
class _States:
    """The hidden states and what one readout of their last layer gives, from the cache or a forward pass."""

    hidden_states: torch.Tensor  # at cache precision, in the model's dtype
    cache_hit: bool
    step_scores: types_pb2.StepScores
    recomputed_logprobs: torch.Tensor  # the generated tokens', for the fidelity check
    embedding_recording: RecordedLayers | None  # the forward pass's recording, when asked for and not a hit


def _hidden_states(
    loaded: LoadedModel,
    cache: HiddenStateCache | None,
    derived: DerivedTensors | None,
    token_ids: torch.Tensor,
    prompt_length: int,
    targets: Targets,
    top_k: int,
    record: bool,
) -> _States:
    """The hidden states from the cache or from one forward pass (recorded for the backward pass if `record`),
    with step scores and fidelity log-probabilities from one readout of the last layer at full precision: on a hit,
    the one the cache kept for this split if it has as many alternatives as top_k asks for."""
    sequence = token_ids.tolist()
    expected_shape = (loaded.num_layers + 1, len(sequence), loaded.hidden_size)
    generated = len(sequence) - prompt_length
    scored = torch.isin(torch.arange(prompt_length, len(sequence)), targets.positions)
    readout_name = f"readout:{prompt_length}"
    if cache is not None and derived is not None:
        with tracer.start_as_current_span("cache lookup") as span:
            cached = cache.get(loaded.weights_digest, sequence)
            if cached is not None and tuple(cached.shape) != expected_shape:
                logger.warning("ignoring cached hidden states of shape %s, expected %s", cached.shape, expected_shape)
                cached = None
            span.set_attribute("sightline.cache.hit", cached is not None)
        if cached is not None:
            stored_readout = derived.get(readout_name)
            readout = None if stored_readout is None else Readout.from_tensors(stored_readout, generated)
            if readout is None or readout.top_k < top_k:
                last_layer = cache.get_last_layer(loaded.weights_digest, sequence)
                if last_layer is None or tuple(last_layer.shape) != expected_shape[1:]:
                    # Stored apart, it can expire first: the bfloat16 last layer then serves.
                    last_layer = cached[-1]
                readout = _read_out(loaded, last_layer, token_ids, prompt_length, top_k)
                derived.put(readout_name, readout.tensors())
            return _States(cached.to(loaded.dtype), True, readout.step_scores(scored, top_k), readout.logprobs, None)

    with tracer.start_as_current_span("forward"):
        forward = forward_with_hidden_states(loaded, token_ids, record)
        stored = forward.hidden_states.to(STORAGE_DTYPE)
        # Read out at the precision a hit reads it back at.
        last_layer = forward.hidden_states[-1].to(LAST_LAYER_DTYPE)
        readout = _read_out(loaded, last_layer, token_ids, prompt_length, top_k)
    # A job cancelled meanwhile writes nothing: what it would cache is for a result nobody will read.
    checkpoint()
    if cache is not None and derived is not None and cache.put(loaded.weights_digest, sequence, stored):
        cache.put_last_layer(loaded.weights_digest, sequence, last_layer)
        derived.put(readout_name, readout.tensors())
    step_scores = readout.step_scores(scored, top_k)
    return _States(stored.to(loaded.dtype), False, step_scores, readout.logprobs, forward.recorded)


def _read_out(
    loaded: LoadedModel, last_layer: torch.Tensor, token_ids: torch.Tensor, prompt_length: int, top_k: int
) -> Readout:
    """The Readout of the last layer's states [num_tokens, hidden] at the positions predicting the generated
    tokens."""
    generated_positions = torch.arange(prompt_length, len(token_ids))
    rows = last_layer[generated_positions - 1].to(loaded.dtype)
    return read_out(loaded, rows, token_ids[generated_positions], top_k)


def _tokens(
    loaded: LoadedModel, sequence: list[int], prompt_length: int, served_logprobs: list[float] | None
) -> list[types_pb2.Token]:
    # Each token decoded on its own: the text it contributes, not a word piece like "Ġthe" or "▁the".
    texts = loaded.tokenizer.batch_decode([[token] for token in sequence], clean_up_tokenization_spaces=False)
    tokens = [types_pb2.Token(id=token, text=text) for token, text in zip(sequence, texts, strict=True)]
    if served_logprobs is not None:
        for token, logprob in zip(tokens[prompt_length:], served_logprobs, strict=True):
            token.logprob = logprob
    return tokens
