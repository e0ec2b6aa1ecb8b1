"""What the gradient methods share: per-target gradients in batched backward passes, and the layer they read."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from sightline.v1 import types_pb2

from explainers.methods.base import (
    GRADIENT_COST,
    AttributionContext,
    AttributionMethod,
    InvalidParamsError,
    ParamSpec,
    prefix_only,
    tensor_proto,
)
from explainers.model import LoadedModel, readout_logits, residual_from_layer
from explainers.targets import Targets

TARGET_BATCH_SIZE = ParamSpec(
    "target_batch_size",
    int,
    16,
    "Generated tokens whose gradients are computed together in one batched backward pass; "
    "trades memory for speed and never changes the result.",
    minimum=1,
    maximum=1024,
)

LAYER = ParamSpec(
    "layer",
    int,
    0,
    "The residual-stream state attributed, indexed like logit_lens: 0 is the embedding output and l the output "
    "of decoder layer l, up to the model's number of layers.",
    minimum=0,
)


# Rows (targets x path points x positions) one batched backward pass carries at most, whatever target_batch_size
# asks for: its transient tensors hold rows x the MLP width (1,536 floats for SmolLM2), several alive at once, so
# 16,384 rows keep a backward pass within about 1 GiB. Chunking never changes the result.
MAX_BACKWARD_ROWS = 16384
# Rows (path points x positions) one forward pass runs when its activations are kept for a backward pass: about
# 1.2 MiB a row for SmolLM2 (30 layers), so about 1.2 GiB. A single sequence always runs whole.
MAX_GRAPH_ROWS = 1024


def _chunk_stop(positions: torch.Tensor, start: int, target_batch_size: int, num_points: int) -> int:
    """The end of the target chunk from `start`: at most target_batch_size targets and MAX_BACKWARD_ROWS rows, each
    target of it costing num_points x the chunk's prefix rows; at least one target."""
    stop = min(start + target_batch_size, len(positions))
    while stop > start + 1 and (stop - start) * num_points * int(positions[stop - 1]) > MAX_BACKWARD_ROWS:
        stop -= 1
    return stop


def score_gradients(
    loaded: LoadedModel,
    states: torch.Tensor,
    layer: int,
    targets: Targets,
    target_batch_size: int,
    point_weights: torch.Tensor | None = None,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Gradients of the targets' scores with respect to residual-stream states at `layer`, a chunk of targets at a
    time. For states [points, num_tokens, hidden] yields (chunk, gradients [len(chunk), points, prefix, hidden]):

        gradients[k, p] = point_weights[p] * d score_{chunk.start + k}(states[p]) / d states[p, :prefix]

    where prefix is the chunk's last target position: causality leaves the positions from there on without
    gradient, so they are not run at all. Each chunk costs one forward pass over its prefix and one batched
    backward pass (a vector-Jacobian product per target, vmapped) that starts below the readout: the readout's
    gradient, vocabulary-wide, is taken once for all targets together, as each score reads one position only.
    """
    num_points = states.shape[0]
    weights = torch.ones(num_points, dtype=states.dtype) if point_weights is None else point_weights
    start = 0
    while start < len(targets):
        stop = _chunk_stop(targets.positions, start, target_batch_size, num_points)
        chunk = targets[start:stop]
        prefix = int(chunk.positions[-1])
        inputs = states[:, :prefix].detach().requires_grad_(True)
        with torch.enable_grad():
            residual = residual_from_layer(loaded, inputs, layer)  # [points, prefix, hidden]
            predicting = residual[:, chunk.predicting_positions]  # [points, chunk, hidden]
            weighted_scores = weights @ chunk.score_logits(readout_logits(loaded, predicting))  # [chunk]
        (seed_rows,) = torch.autograd.grad(weighted_scores.sum(), predicting)  # [points, chunk, hidden]
        # Target k's backward pass starts from its own predicting position, every other position at zero.
        seeds = residual.new_zeros(len(chunk), *residual.shape)
        seeds[torch.arange(len(chunk)), :, chunk.predicting_positions] = seed_rows.transpose(0, 1)
        (gradients,) = torch.autograd.grad(residual, inputs, grad_outputs=seeds, is_grads_batched=True)
        yield slice(start, stop), gradients
        start = stop


def gradient_times_state(gradients: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """sum_h states[j, h] * gradients[i, j, h]: [chunk, prefix] from gradients [chunk, prefix, hidden] and states
    [prefix, hidden]."""
    return (gradients * states).sum(dim=-1)


def reduced_gradients(
    loaded: LoadedModel,
    states: torch.Tensor,
    layer: int,
    targets: Targets,
    target_batch_size: int,
    reduce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Per-position scores [num_targets, num_tokens] of d score_i / d states at `layer` for states [1, num_tokens,
    hidden], reduced over the hidden dimension by reduce(gradients [chunk, prefix, hidden], states [prefix,
    hidden]) -> [chunk, prefix]; 0 at and after each target's position."""
    scores = states.new_zeros(len(targets), states.shape[1])
    for chunk, gradients in score_gradients(loaded, states, layer, targets, target_batch_size):
        prefix = gradients.shape[2]
        scores[chunk, :prefix] = reduce(gradients[:, 0], states[0, :prefix])
    return scores


def cached_layer_states(ctx: AttributionContext, layer: int, method: str) -> torch.Tensor:
    """The cached residual stream at `layer` as [1, num_tokens, hidden]; the layer must exist in ctx's model."""
    if layer > ctx.loaded.num_layers:
        raise InvalidParamsError(
            f"parameter 'layer' of method {method!r} must be in 0..{ctx.loaded.num_layers} for this model, got {layer}"
        )
    return ctx.hidden_states[layer][None]


@dataclass(frozen=True)
class EmbeddingGradientParams:
    target_batch_size: int


class EmbeddingGradientMethod(AttributionMethod[EmbeddingGradientParams]):
    """A method that reduces d score_i / d embedding[j] over the hidden dimension, for every target i and source j.

    Per chunk of targets, one forward pass over their prefix and one batched vector-Jacobian product (see
    score_gradients); prefix_only makes the zeros at and after a target's own position exact.
    """

    params = (TARGET_BATCH_SIZE,)
    params_type = EmbeddingGradientParams
    needs_gradients = True
    uses_cache = False
    attributes_tokens = True
    cost = GRADIENT_COST
    supports_contrastive_targets = True

    @abstractmethod
    def reduce(self, gradients: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """Per-source scores [chunk, num_tokens] from gradients [chunk, num_tokens, hidden] and the embeddings
        [num_tokens, hidden]."""

    def attribute(self, ctx: AttributionContext, params: EmbeddingGradientParams) -> types_pb2.MethodResult:
        embeddings = ctx.loaded.embed(ctx.token_ids)  # [1, num_tokens, hidden]
        scores = reduced_gradients(ctx.loaded, embeddings, 0, ctx.targets, params.target_batch_size, self.reduce)
        return types_pb2.MethodResult(method=self.name, attributions=tensor_proto(prefix_only(scores, ctx.targets)))
