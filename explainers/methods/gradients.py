"""What the gradient methods share: per-target gradients from one recording forward pass, and the layer they read."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from sightline.v1 import types_pb2

from explainers import general_path, progress
from explainers.architectures import ExplainPath
from explainers.backprop import RecordedLayers, Seeds, backward_to_layer, record_forward
from explainers.methods.base import (
    GRADIENT_COST,
    AttributionContext,
    AttributionMethod,
    InvalidParamsError,
    ParamSpec,
    prefix_only,
    tensor_proto,
)
from explainers.model import READOUT_ROWS, LoadedModel, readout_logits
from explainers.targets import Targets

TARGET_BATCH_SIZE = ParamSpec(
    "target_batch_size",
    int,
    64,
    "Generated tokens whose backward passes run together, one layer at a time, so that each layer's weights are "
    "read once for all of them; trades memory for speed and never changes the result.",
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
    maximum_from="num_layers",
)


# Rows (targets x path points x positions) of a group of targets whose backward passes run together, layer by
# layer, whatever target_batch_size asks for: the group's gradients are held at once, hidden floats a row (2.3 KiB
# for SmolLM2), so 65,536 rows hold 150 MiB. Grouping never changes the result.
MAX_GROUP_ROWS = 65536
# Rows of a chunk, the unit one thread runs through one layer. From about 128 rows a matrix product runs at the same
# FLOP rate on one core, and padding each target to its chunk's longest prefix costs k(k - 1)/2 rows for k
# consecutive targets: 256 rows keep that waste near 5% for short prompts and the chunk's transients (rows x the
# MLP width, a few at once) small.
CHUNK_ROWS = 256
# Rows (path points x positions) of one forward pass whose activations are kept for the backward pass: about
# 0.7 MiB a row for SmolLM2 (23 KiB a layer), so about 0.7 GiB. A single sequence always runs whole.
MAX_GRAPH_ROWS = 1024


def plan_chunks(positions: torch.Tensor, target_batch_size: int, num_points: int) -> list[list[slice]]:
    """score_gradients' groups of chunks of consecutive targets. A group holds at most target_batch_size targets
    and MAX_GROUP_ROWS rows (at least one chunk); a chunk closes once it reaches CHUNK_ROWS rows, each of its targets
    costing num_points x the chunk's prefix (its last target's position) rows."""

    def rows(chunk: slice) -> int:
        return int(chunk.stop - chunk.start) * num_points * int(positions[chunk.stop - 1])

    groups: list[list[slice]] = []
    start = 0
    while start < len(positions):
        group_end = min(start + target_batch_size, len(positions))
        group: list[slice] = []
        group_rows = 0
        while start < group_end:
            chunk = slice(start, start + 1)
            while chunk.stop < group_end and rows(chunk) < CHUNK_ROWS:
                chunk = slice(start, chunk.stop + 1)
            if group and group_rows + rows(chunk) > MAX_GROUP_ROWS:
                break
            group.append(chunk)
            group_rows += rows(chunk)
            start = chunk.stop
        groups.append(group)
    return groups


def score_gradients(
    loaded: LoadedModel,
    states: torch.Tensor,
    layer: int,
    targets: Targets,
    target_batch_size: int,
    point_weights: torch.Tensor | None = None,
    recorded: RecordedLayers | None = None,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Gradients of the targets' scores with respect to residual-stream states at `layer`, a chunk of targets at a
    time. For states [points, num_tokens, hidden] yields (chunk, gradients [len(chunk), points, prefix, hidden]):

        gradients[k, p] = point_weights[p] * d score_{chunk.start + k}(states[p]) / d states[p, :prefix]

    where prefix is the chunk's last target position: causality leaves the positions from there on without
    gradient, so they are not run at all. One forward pass records every layer's activations for all targets
    (explainers.backprop), unless `recorded` is that pass, already run over `states` (or a longer prefix of them).
    Then each group of chunks (plan_chunks) runs backward, a vector-Jacobian product per target over its chunk's
    prefix, started below the readout: the readout's gradient, vocabulary-wide, is taken for a group's targets
    together, as each score reads one position only. A group goes through one layer at a time,
    its chunks side by side, one per torch thread, each op on a single thread: independent matrix products on
    separate cores beat one product split across them, and the layer's weights stay in cache for all the chunks.
    On the general path (explainers.general_path) autograd takes the vector-Jacobian products instead, batched.
    """
    weights = torch.ones(states.shape[0], dtype=states.dtype) if point_weights is None else point_weights
    if loaded.path is ExplainPath.GENERAL:
        yield from general_path.score_gradients(
            loaded.model, loaded.decoder_layers, loaded.final_norm, states, layer, targets, target_batch_size, weights
        )
        return
    # The last target is predicted from the position before its own: nothing from there on is needed.
    if recorded is None:
        recorded = record_forward(loaded, states[:, : int(targets.positions[-1])], layer)
    groups = plan_chunks(targets.positions, target_batch_size, states.shape[0])
    with progress.steps(len(groups)):
        yield from _group_gradients(loaded, recorded, groups, targets, weights)


def _group_gradients(
    loaded: LoadedModel, recorded: RecordedLayers, groups: list[list[slice]], targets: Targets, weights: torch.Tensor
) -> Iterator[tuple[slice, torch.Tensor]]:
    """score_gradients' backward passes, a group of chunks at a time: each group a progress step."""
    for group in groups:
        first = group[0].start
        seed_rows = _seed_rows(loaded, recorded.final_residual, targets[first : group[-1].stop], weights)
        with _one_thread_per_op() as threads, ThreadPoolExecutor(max_workers=threads) as pool:
            # The seeds are handed over, not kept: each layer's gradients replace the last's in memory.
            gradients = backward_to_layer(
                recorded,
                [_seeds(targets[chunk], seed_rows[:, chunk.start - first : chunk.stop - first]) for chunk in group],
                pool.map,
            )
        yield from zip(group, gradients, strict=True)
        progress.step()


def _seed_rows(loaded: LoadedModel, final: torch.Tensor, targets: Targets, weights: torch.Tensor) -> torch.Tensor:
    """d (weights @ score_i) / d final[:, predicting position of i]: [points, targets, hidden], from the last
    layer's output final [points, positions, hidden]. Each score reads one position, so one backward pass through
    the readout serves all targets; READOUT_ROWS at a time bound its [rows, vocabulary] tensors."""
    per_slice = max(1, READOUT_ROWS // final.shape[0])
    rows = []
    for start in range(0, len(targets), per_slice):
        some = targets[start : start + per_slice]
        predicting = final[:, some.predicting_positions].requires_grad_(True)  # [points, some, hidden]
        with torch.enable_grad():
            weighted_scores = weights @ some.score_logits(readout_logits(loaded, predicting))  # [some]
        rows.append(torch.autograd.grad(weighted_scores.sum(), predicting)[0])
    return torch.cat(rows, dim=1)


def _seeds(chunk: Targets, seed_rows: torch.Tensor) -> Seeds:
    """The cotangents of the last layer's output that start the chunk's backward passes, from its seed rows [points,
    len(chunk), hidden]: target k's at its own predicting position, zero at every other."""
    return Seeds(rows=seed_rows.transpose(0, 1), positions=chunk.predicting_positions, prefix=int(chunk.positions[-1]))


@contextmanager
def _one_thread_per_op() -> Iterator[int]:
    """Set torch's intra-op threads to 1 for the block; yields how many there were."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


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
    recorded: RecordedLayers | None = None,
) -> torch.Tensor:
    """Per-position scores [num_targets, num_tokens] of d score_i / d states at `layer` for states [1, num_tokens,
    hidden], reduced over the hidden dimension by reduce(gradients [chunk, prefix, hidden], states [prefix,
    hidden]) -> [chunk, prefix]; 0 at and after each target's position. `recorded`: as score_gradients takes it."""
    scores = states.new_zeros(len(targets), states.shape[1])
    for chunk, gradients in score_gradients(loaded, states, layer, targets, target_batch_size, recorded=recorded):
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

    One recording forward pass, then a vector-Jacobian product per target over its prefix (see score_gradients);
    prefix_only makes the zeros at and after a target's own position exact.
    """

    params = (TARGET_BATCH_SIZE,)
    params_type = EmbeddingGradientParams
    needs_gradients = True
    uses_cache = False
    attributes_tokens = True
    cost = GRADIENT_COST
    supports_contrastive_targets = True
    reuses_embedding_recording = True

    @abstractmethod
    def reduce(self, gradients: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """Per-source scores [chunk, num_tokens] from gradients [chunk, num_tokens, hidden] and the embeddings
        [num_tokens, hidden]."""

    def attribute(self, ctx: AttributionContext, params: EmbeddingGradientParams) -> types_pb2.MethodResult:
        embeddings = ctx.loaded.embed(ctx.token_ids)  # [1, num_tokens, hidden]
        # Without the engine's recording, the same pass over the whole sequence: a cache hit then computes exactly
        # what a miss computes.
        fast = ctx.loaded.path is ExplainPath.FAST
        recording = (ctx.embedding_recording or record_forward(ctx.loaded, embeddings, 0)) if fast else None
        scores = reduced_gradients(
            ctx.loaded, embeddings, 0, ctx.targets, params.target_batch_size, self.reduce, recording
        )
        return types_pb2.MethodResult(method=self.name, attributions=tensor_proto(prefix_only(scores, ctx.targets)))
