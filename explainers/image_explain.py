"""Explain one generated sequence whose prompt holds pictures: rebuild the model inputs from the job's messages and
pictures (checked against the ids vLLM used), read the generated tokens' log-probabilities out of one forward pass
(cached under the pictures' digests) for fidelity, run each image method over the grid the request asked for, and
report cells per picture, text scores, each method's modality share and the pictures' grids.

The image methods explain the log-probability of each explained token; contrastive targets, other target scores
and faithfulness are refused for requests with pictures (common/explain_spec.check_image_options).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from sightline.v1 import types_pb2
from torch import nn

from common.costs import method_passes
from common.explain_spec import (
    ParamValue,
    check_distinct_methods,
    check_explained_sequence,
    check_image_options,
    params_path,
)
from common.jobs import ExplanationJob
from explainers.hidden_cache import LAST_LAYER_DTYPE, HiddenStateCache
from explainers.image_methods.grid import CellGrid
from explainers.image_methods.methods import ImageAttribution
from explainers.image_methods.passes import ImageQuestion, image_text_forward, token_grid
from explainers.image_methods.registry import ImageMethod, get_image_method
from explainers.methods.base import tensor_proto
from explainers.progress import JobProgress, Tracking, checkpoint
from explainers.telemetry import SPAN_KIND, tracer
from explainers.vlm import LoadedVlm, RebuiltInputs, rebuild_inputs

# transformers' Idefics3 layout: the text model's final norm and the unembedding.
FINAL_NORM = "model.text_model.norm"
LM_HEAD = "lm_head"


@dataclass(frozen=True)
class _Readout:
    logprobs: torch.Tensor  # [num_generated]: the generated tokens' log-probabilities
    cache_hit: bool


def explain_images(
    vlm: LoadedVlm, cache: HiddenStateCache | None, job: ExplanationJob, tracking: Tracking | None = None
) -> types_pb2.Explanation:
    """The explanation of ``job`` (which carries pictures). Raises InvalidInputError (a ValueError) before any model
    work for what the spec refuses, and when the rebuilt prompt is not the one vLLM generated from."""
    options = job.options
    check_image_options(options)
    check_explained_sequence(
        job.prompt_token_ids,
        job.output_token_ids,
        job.served_logprobs,
        options,
        context_window=vlm.max_positions,
        vocab_size=vlm.vocab_size,
    )
    check_distinct_methods([method.name for method in job.methods])
    requested = [
        (method, method.parse_params(request.params, params_path(index)))
        for index, request in enumerate(job.methods)
        for method in (get_image_method(request.name),)
    ]
    inputs = rebuild_inputs(vlm, job.image_messages or [], job.images, job.prompt_token_ids)
    sequence = [*job.prompt_token_ids, *job.output_token_ids]
    prompt_length = len(job.prompt_token_ids)
    indices = options.output_indices or list(range(len(job.output_token_ids)))
    question = ImageQuestion(
        token_ids=torch.tensor(sequence, dtype=torch.long),
        pixel_values=inputs.pixel_values,
        target_positions=tuple(prompt_length + index for index in indices),
    )
    model_grid = token_grid(vlm.model, question)
    grid = model_grid
    if options.image_grid_rows:
        grid = CellGrid(options.image_grid_rows, options.image_grid_cols, model_grid.height, model_grid.width)
    digests = [hashlib.sha256(image).hexdigest() for image in job.images]
    progress = _progress(requested, tracking, len(sequence), len(indices))

    with progress.forward_pass() if progress else contextlib.nullcontext([False]) as forward_hit:
        readout = _generated_logprobs(vlm, cache, question, prompt_length, digests)
        forward_hit[0] = readout.cache_hit
    explanation = types_pb2.Explanation(
        model=vlm.model_name,
        weights_digest=vlm.weights_digest,
        tokens=_tokens(vlm, sequence, prompt_length, inputs),
        prompt_length=prompt_length,
        target_positions=question.target_positions,
        target_score=types_pb2.TARGET_SCORE_LOGPROB,
        cache_hit=readout.cache_hit,
        explain_path=types_pb2.EXPLAIN_PATH_GENERAL,
        architecture=vlm.architecture,
        image_grids=_image_grids(grid, inputs, digests),
    )
    for index, (method, params) in enumerate(requested):
        with (
            progress.method(index) if progress else contextlib.nullcontext(),
            tracer.start_as_current_span(
                f"method {method.name}", attributes={"sightline.method": method.name, SPAN_KIND: "EVALUATOR"}
            ),
        ):
            started = time.perf_counter()
            attribution = method.run(vlm.model, question, grid, params, vlm.normalise)
            result = _method_result(attribution, question)
            result.seconds = time.perf_counter() - started
        explanation.results.append(result)
    if tracking is not None and progress is not None:
        tracking.seconds_per_pass = progress.seconds_per_pass

    explanation.fidelity.recomputed_logprobs.extend(readout.logprobs.tolist())
    if job.served_logprobs is not None:
        served = torch.tensor(job.served_logprobs, dtype=readout.logprobs.dtype)
        explanation.fidelity.max_abs_logprob_diff = float((readout.logprobs - served).abs().max())
    return explanation


def _progress(
    requested: Sequence[tuple[ImageMethod, dict[str, ParamValue]]],
    tracking: Tracking | None,
    num_tokens: int,
    num_targets: int,
) -> JobProgress | None:
    if tracking is None:
        return None
    planned = [
        (
            method.name,
            method_passes(
                method.cost,
                num_tokens=num_tokens,
                num_targets=num_targets,
                scale=float(params.get(method.cost.scaled_by_param, 1)) if method.cost.scaled_by_param else 1.0,
            ),
        )
        for method, params in requested
    ]
    return JobProgress(
        planned, tracking.publish, seconds_per_pass=tracking.seconds_per_pass, interval=tracking.interval
    )


def _generated_logprobs(
    vlm: LoadedVlm, cache: HiddenStateCache | None, question: ImageQuestion, prompt_length: int, digests: list[str]
) -> _Readout:
    """The generated tokens' log-probabilities from the last layer's states (before the final norm): from the cache
    when it holds this sequence with these pictures, else from one forward pass whose states it then keeps."""
    sequence = question.token_ids.tolist()
    last_layer = None if cache is None else cache.get_last_layer(vlm.weights_digest, sequence, digests)
    hit = last_layer is not None
    if last_layer is None:
        states = _hidden_states(vlm, question)
        last_layer = states[-1]
        # A job cancelled meanwhile writes nothing.
        checkpoint()
        if cache is not None and cache.put(vlm.weights_digest, sequence, states, digests):
            cache.put_last_layer(vlm.weights_digest, sequence, last_layer, digests)
    norm: nn.Module = vlm.model.get_submodule(FINAL_NORM)
    lm_head: nn.Module = vlm.model.get_submodule(LM_HEAD)
    predicting = torch.arange(prompt_length - 1, len(sequence) - 1)
    with torch.no_grad():
        normed = norm(last_layer[predicting].to(LAST_LAYER_DTYPE))
        log_probs = torch.log_softmax(lm_head(normed).float(), dim=-1)
    generated = question.token_ids[prompt_length:]
    return _Readout(log_probs.gather(-1, generated[:, None])[:, 0], hit)


def _hidden_states(vlm: LoadedVlm, question: ImageQuestion) -> torch.Tensor:
    """The residual stream [num_layers + 1, num_tokens, hidden], every layer BEFORE the final norm as the cache
    keeps it (transformers' last hidden state is after it, so the norm's input is taken instead)."""
    captured: list[torch.Tensor] = []
    handle = vlm.model.get_submodule(FINAL_NORM).register_forward_hook(
        lambda _module, args, _output: captured.append(args[0].detach())
    )
    try:
        with torch.no_grad():
            outputs = image_text_forward(
                vlm.model, question.token_ids[None], question.pixel_values[None], output_hidden_states=True
            )
    finally:
        handle.remove()
    return torch.cat([*outputs.hidden_states[:-1], captured[-1]])


def _method_result(attribution: ImageAttribution, question: ImageQuestion) -> types_pb2.MethodResult:
    result = types_pb2.MethodResult(method=attribution.method)
    for image in range(attribution.cells.shape[1]):
        result.image_attributions.append(
            types_pb2.ImageAttribution(image_index=image, cells=tensor_proto(attribution.cells[:, image]))
        )
    if attribution.text is not None:
        # As every method's token matrix: [targets, num_tokens - 1], zero at and after each target's own position.
        sources = torch.arange(attribution.text.shape[1] - 1)
        positions = torch.tensor(question.target_positions)
        prefix = torch.where(sources[None, :] < positions[:, None], attribution.text[:, :-1], 0.0)
        result.attributions.CopyFrom(tensor_proto(prefix))
    if attribution.convergence_delta is not None:
        result.extras["convergence_delta"].CopyFrom(tensor_proto(attribution.convergence_delta))
    share = attribution.image_share()
    if share is not None:
        image_share = [float(value) for value in share]
        result.modality.CopyFrom(
            types_pb2.ModalityShare(image=image_share, text=[1.0 - value for value in image_share])
        )
    return result


def _tokens(vlm: LoadedVlm, sequence: list[int], prompt_length: int, inputs: RebuiltInputs) -> list[types_pb2.Token]:
    """Each token with its text and role: output, a picture's placeholder (with the message holding the picture),
    or prompt."""
    texts = vlm.tokenizer.batch_decode([[token] for token in sequence], clean_up_tokenization_spaces=False)
    tokens = [types_pb2.Token(id=token, text=text) for token, text in zip(sequence, texts, strict=True)]
    per_picture = sum(1 for token in sequence[:prompt_length] if token == vlm.image_token_id) // max(
        len(inputs.pictures), 1
    )
    seen = 0
    for position, token in enumerate(tokens):
        if position >= prompt_length:
            token.role = types_pb2.TOKEN_ROLE_OUTPUT
        elif token.id == vlm.image_token_id:
            token.role = types_pb2.TOKEN_ROLE_IMAGE
            token.message_index = inputs.picture_messages[min(seen // max(per_picture, 1), len(inputs.pictures) - 1)]
            seen += 1
        else:
            token.role = types_pb2.TOKEN_ROLE_PROMPT
    return tokens


def _image_grids(grid: CellGrid, inputs: RebuiltInputs, digests: list[str]) -> list[types_pb2.ImageGrid]:
    return [
        types_pb2.ImageGrid(
            image_index=index,
            rows=grid.rows,
            cols=grid.cols,
            height=grid.height,
            width=grid.width,
            row_edges=grid.row_edges(),
            col_edges=grid.col_edges(),
            original_height=picture.height,
            original_width=picture.width,
            digest=digest,
        )
        for index, (picture, digest) in enumerate(zip(inputs.pictures, digests, strict=True))
    ]
