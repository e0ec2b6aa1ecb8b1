"""Per-target gradients through frozen decoder layers (explainers.decoder_layer's skeleton), with the backward pass
written out by hand.

Attributing every generated token takes one vector-Jacobian product per token, each over that token's prefix only.
Autograd can batch them (`is_grads_batched`), but its graph fixes the positions: a chunk of targets either runs
backward over the whole sequence or gets a forward pass of its own over its prefix. Written out, a decoder layer's
backward pass needs a handful of the forward pass's activations, recorded once for all targets (`record_forward`),
and each chunk of targets then runs backward over its own prefix only (`backward_to_layer`). The weights are
frozen, so the backward pass computes input gradients only: one matrix product per linear layer, the same work as
the forward pass. A target score reads one position of the last layer's output, so the top layer runs backward at
that position only (`Seeds`), but for its keys and values; the layers below run over the whole prefix. The
recording pass is the engine's own forward pass when a method differentiates the input embeddings (`run_layers`).

Shapes: P path points (batch), N positions, D hidden, H query heads in KV groups of G, hd head size, I the MLP width;
C targets in a chunk, b the chunk's prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, overload

import torch
import torch.nn.functional as F
from torch import nn

from explainers import progress
from explainers.decoder_layer import (
    LayerWeights,
    Linear,
    Norm,
    RotaryTable,
    attention_scores,
    rms_normalize,
    rotary_tables,
    rotate,
    rotate_half,
    visible_keys,
)

# A norm's input normalised and 1 / its rms, as recorded for the norm's backward pass ([..., size], [..., 1]).
Normalized = tuple[torch.Tensor, torch.Tensor]
# One layer's keys (after RoPE) and values [P, KV, N, hd].
KeysValues = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class LayerRecord:
    """What one decoder layer's backward pass reads from its forward pass; norms in at least float32."""

    attention_normed: torch.Tensor  # input x rstd, before the norm's weight [P, N, D]
    attention_rstd: torch.Tensor  # 1 / rms(input) [P, N, 1]
    queries: torch.Tensor  # after RoPE [P, H, N, hd]
    keys: torch.Tensor  # after RoPE [P, KV, N, hd]
    values: torch.Tensor  # [P, KV, N, hd]
    attention_output: torch.Tensor  # the heads' outputs before o_proj [P, H, N, hd]
    mlp_normed: torch.Tensor  # [P, N, D]
    mlp_rstd: torch.Tensor  # [P, N, 1]
    gate_activation: torch.Tensor  # act(gate) [P, N, I]
    up_times_gate_slope: torch.Tensor  # up * act'(gate) [P, N, I]
    # With head norms: each query and key head's ([P, H or KV, N, hd]).
    query_heads: Normalized | None = None
    key_heads: Normalized | None = None
    # With output norms (Gemma): the attention's output after o_proj and the MLP's after down ([P, N, D]).
    attention_branch: Normalized | None = None
    mlp_branch: Normalized | None = None


@dataclass(frozen=True)
class RecordedLayers:
    """The layers above `layer`, run forward once over every position: their records, the final residual stream
    [P, N, D], and the rotary tables [N, hd] of those positions, by the layer types that have their own."""

    weights: list[LayerWeights]
    records: list[LayerRecord]
    final_residual: torch.Tensor
    rotary: dict[str | None, RotaryTable]


@dataclass(frozen=True)
class Seeds:
    """A chunk of C cotangents of the final residual stream, each zero but at one position, as a target score's is
    (it reads the position that predicts its token): rows [C, P, D] at positions [C], within the chunk's first
    `prefix` positions. The top layer's MLP and output projections then run backward at those positions only."""

    rows: torch.Tensor
    positions: torch.Tensor
    prefix: int

    def dense(self) -> torch.Tensor:
        """The cotangents written out, [C, P, prefix, D]."""
        cotangents = self.rows.new_zeros(len(self.positions), self.rows.shape[1], self.prefix, self.rows.shape[-1])
        cotangents[torch.arange(len(self.positions)), :, self.positions] = self.rows
        return cotangents


# Runs one layer's backward pass over a group's chunks: map, or a thread pool's map.
ChunkMap = Callable[
    [Callable[[torch.Tensor | Seeds], torch.Tensor], Iterable[torch.Tensor | Seeds]], Iterable[torch.Tensor]
]


class FastDecoder(Protocol):
    """What the fast path reads of a loaded model (explainers.model.LoadedModel is one): each decoder layer's
    weights and the rotary embedding. A protocol, so that this module needs nothing from explainers.model."""

    @property
    def layer_weights(self) -> list[LayerWeights]: ...

    @property
    def rotary_embedding(self) -> nn.Module: ...


@overload
def run_layers(
    loaded: FastDecoder,
    states: torch.Tensor,
    layer: int,
    record: Literal[True],
    past: Sequence[KeysValues] | None = None,
) -> tuple[list[torch.Tensor], RecordedLayers]: ...
@overload
def run_layers(
    loaded: FastDecoder,
    states: torch.Tensor,
    layer: int,
    record: bool,
    past: Sequence[KeysValues] | None = None,
) -> tuple[list[torch.Tensor], RecordedLayers | None]: ...
def run_layers(
    loaded: FastDecoder,
    states: torch.Tensor,
    layer: int,
    record: bool,
    past: Sequence[KeysValues] | None = None,
) -> tuple[list[torch.Tensor], RecordedLayers | None]:
    """Run the decoder layers above `layer` on residual-stream states [P, N, D] as the module runs them, without
    gradients. Returns the residual stream (states, then each layer's output) and, with record, what
    backward_to_layer needs.

    With past (one (keys, values) [P, KV, S, hd] per layer run, as layer_keys_values gives them), the states are
    positions S.. of a sequence whose first S positions those keys and values are: causality makes the states the
    same as a pass over the whole sequence would give. Nothing is recorded then."""
    if past is not None and record:
        raise ValueError("a pass resumed from past keys and values records nothing for a backward pass")
    weights = loaded.layer_weights[layer:]
    offset = past[0][0].shape[2] if past else 0
    rotary_types = {w.options.rotary_type for w in weights}
    rotary = rotary_tables(loaded.rotary_embedding, states, rotary_types, offset)
    residual_stream = [states]
    records = []
    with torch.no_grad():
        for index, layer_weights in enumerate(weights):
            # A long pass is a long stretch without a step: a cancelled job may stop between its layers.
            progress.tick()
            table = rotary[layer_weights.options.rotary_type]
            layer_past = None if past is None else past[index]
            layer_record, hidden = _layer_forward(layer_weights, residual_stream[-1], table, record, layer_past)
            residual_stream.append(hidden)
            if layer_record is not None:
                records.append(layer_record)
    if not record:
        return residual_stream, None
    return residual_stream, RecordedLayers(
        weights=weights, records=records, final_residual=residual_stream[-1], rotary=rotary
    )


def layer_keys_values(loaded: FastDecoder, residual_stream: torch.Tensor) -> list[KeysValues]:
    """Every decoder layer's keys (after RoPE) and values [P, KV, N, hd] from the residual stream [L + 1, P, N, D]
    that a pass over positions 0..N - 1 gave (residual_stream[l] is layer l + 1's input): what run_layers' past
    takes for a pass over later positions of the same sequence."""
    weights = loaded.layer_weights
    rotary = rotary_tables(loaded.rotary_embedding, residual_stream[0], {w.options.rotary_type for w in weights})
    with torch.no_grad():
        return [
            _keys_values(
                layer_weights, _attention_input(layer_weights, hidden)[2], rotary[layer_weights.options.rotary_type]
            )[1:]
            for layer_weights, hidden in zip(weights, residual_stream, strict=False)
        ]


def record_forward(loaded: FastDecoder, states: torch.Tensor, layer: int) -> RecordedLayers:
    """Run the decoder layers above `layer` on residual-stream states [P, N, D], keeping what backward_to_layer
    needs."""
    return run_layers(loaded, states, layer, record=True)[1]


def backward_to_layer(
    recorded: RecordedLayers, output_gradients: Sequence[torch.Tensor | Seeds], map_chunks: ChunkMap = map
) -> list[torch.Tensor]:
    """Gradients [C, P, b, D] with respect to the recorded states for chunks of C cotangents [C, P, b, D] of the final
    residual stream (b may differ between chunks), each zero from its b on: causality keeps them zero there, so
    those positions are not run. A chunk given as Seeds (b = its prefix) skips the top layer's work at its zero
    positions. Layer by layer, all chunks through one layer before the next, so that a layer's weights are read from
    memory once for all of them; map_chunks runs a layer over the chunks (map, or a thread pool's). A caller that
    keeps no reference to the sequence has its tensors freed once the top layer has run."""
    gradients = list(output_gradients)
    del output_gradients  # so that each layer's gradients replace the last's in memory
    with progress.steps(len(recorded.records)):
        gradients = _layers_backward(recorded, gradients, map_chunks)
    return [chunk.dense() if isinstance(chunk, Seeds) else chunk for chunk in gradients]


def _layers_backward(
    recorded: RecordedLayers, gradients: list[torch.Tensor | Seeds], map_chunks: ChunkMap
) -> list[torch.Tensor | Seeds]:
    """backward_to_layer's layers, top down, each a progress step."""
    for weights, record in zip(reversed(recorded.weights), reversed(recorded.records), strict=True):
        table = recorded.rotary[weights.options.rotary_type]

        def layer_backward(chunk: torch.Tensor | Seeds) -> torch.Tensor:
            # weights, record and table are this iteration's: map_chunks calls this within it.
            if isinstance(chunk, Seeds):
                cos, sin = table.cos[: chunk.prefix], table.sin[: chunk.prefix]  # noqa: B023
                return _seeded_layer_backward(weights, record, chunk, cos, sin)  # noqa: B023
            cos, sin = table.cos[: chunk.shape[2]], table.sin[: chunk.shape[2]]  # noqa: B023
            return _layer_backward(weights, record, chunk, cos, sin)  # noqa: B023

        gradients = list(map_chunks(layer_backward, gradients))
        progress.step()
    return gradients


def _attention_input(weights: LayerWeights, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input x rstd, rstd, the attention's input after the norm's weight) of hidden [P, N, D]."""
    attention_normed, attention_rstd = rms_normalize(hidden, weights.attention_norm)
    return attention_normed, attention_rstd, weights.attention_norm.weight * attention_normed.to(hidden.dtype)


def _keys_values(
    weights: LayerWeights, attention_input: torch.Tensor, rotary: RotaryTable
) -> tuple[Normalized | None, torch.Tensor, torch.Tensor]:
    """(the key heads' norm record or None, keys after RoPE [P, KV, N, hd], values [P, KV, N, hd])."""
    key_heads, keys = _optional_norm(_split_heads(weights.k(attention_input), weights.head_size), weights.key_norm)
    values = _split_heads(weights.v(attention_input), weights.head_size)
    return key_heads, rotate(keys, rotary.cos, rotary.sin), values


def _layer_forward(
    weights: LayerWeights,
    hidden: torch.Tensor,
    rotary: RotaryTable,
    record: bool,
    past: KeysValues | None = None,
) -> tuple[LayerRecord | None, torch.Tensor]:
    """The decoder layer's forward pass on hidden [P, N, D] (explainers.decoder_layer's skeleton), with its
    activations if record; with past, the keys and values [P, KV, S, hd] of the S positions before hidden's."""
    attention_normed, attention_rstd, attention_input = _attention_input(weights, hidden)
    query_heads, queries = _optional_norm(
        _split_heads(weights.q(attention_input), weights.head_size), weights.query_norm
    )
    queries = rotate(queries, rotary.cos, rotary.sin)
    key_heads, keys, values = _keys_values(weights, attention_input, rotary)
    if past is not None:
        keys, values = torch.cat((past[0], keys), dim=2), torch.cat((past[1], values), dim=2)
    attention_output = _attend(weights, queries, keys, values)
    attention_branch, attention_added = _optional_norm(
        weights.o(_merge_heads(attention_output)), weights.attention_output_norm
    )
    hidden = hidden + attention_added

    mlp_normed, mlp_rstd = rms_normalize(hidden, weights.mlp_norm)
    mlp_input = weights.mlp_norm.weight * mlp_normed.to(hidden.dtype)
    gate, up = weights.gate(mlp_input), weights.up(mlp_input)
    gate_activation, gate_slope = weights.options.activation.forward(gate, with_slope=record)
    mlp_branch, mlp_added = _optional_norm(weights.down(gate_activation * up), weights.mlp_output_norm)
    hidden = hidden + mlp_added
    if gate_slope is None:
        return None, hidden
    layer_record = LayerRecord(
        attention_normed=attention_normed,
        attention_rstd=attention_rstd,
        queries=queries,
        keys=keys,
        values=values,
        attention_output=attention_output,
        mlp_normed=mlp_normed,
        mlp_rstd=mlp_rstd,
        gate_activation=gate_activation,
        up_times_gate_slope=up * gate_slope,
        query_heads=query_heads,
        key_heads=key_heads,
        attention_branch=attention_branch,
        mlp_branch=mlp_branch,
    )
    return layer_record, hidden


def _attend(weights: LayerWeights, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The heads' outputs [P, H, n, hd] of causal attention of queries [P, H, n, hd] over keys and values
    [P, KV, N, hd] (n <= N: the queries are the last n positions), masked to the layer's window: SDPA, or written
    out where the layer caps its scores."""
    options, num_queries, num_keys = weights.options, queries.shape[-2], keys.shape[-2]
    query_positions = torch.arange(num_keys - num_queries, num_keys)
    if options.softcap is None:
        windowed = options.window is not None and options.window < num_keys
        masked = windowed or num_queries < num_keys
        mask = visible_keys(query_positions, num_keys, options.window) if masked else None
        return F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask, is_causal=mask is None, scale=weights.scale, enable_gqa=True
        )
    num_points, num_heads, _, head_size = queries.shape
    num_groups = keys.shape[1]
    # Each group's query heads stacked along the query axis, as _attention_backward lays them out.
    grouped_queries = queries.reshape(num_points, num_groups, -1, head_size)  # [P, KV, G * n, hd]
    visible = visible_keys(query_positions.repeat(num_heads // num_groups), num_keys, options.window)
    probabilities, _ = attention_scores(grouped_queries, keys, visible, options, weights.scale)
    return (probabilities @ values).reshape(queries.shape)


def _optional_norm(x: torch.Tensor, norm: Norm | None) -> tuple[Normalized | None, torch.Tensor]:
    """((normalised x, 1 / rms) or None, x after the norm) for x [..., size]: an RMSNorm that a layer may lack
    (per-head q/k norms, Gemma's output norms), or x itself without one."""
    if norm is None:
        return None, x
    normed, rstd = rms_normalize(x, norm)
    return (normed, rstd), norm.weight * normed.to(x.dtype)


def _optional_norm_backward(
    gradients: torch.Tensor,
    norm: Norm | None,
    recorded: Normalized | None,
    rows: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """d/d x before an _optional_norm from d/d x after it, whose rows rows() picks out of the recorded
    (normalised x, 1 / rms). The identity without a norm."""
    if norm is None or recorded is None:
        return gradients
    normed, rstd = recorded
    return _rms_backward(gradients, norm, rows(normed), rows(rstd))


def _layer_backward(
    weights: LayerWeights, record: LayerRecord, output_gradients: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """d/d input [C, P, b, D] of one decoder layer from d/d output [C, P, b, D]; cos, sin [b, hd]."""
    b = output_gradients.shape[2]

    def prefix(activations: torch.Tensor) -> torch.Tensor:  # [P, N, ...] -> [P, b, ...]
        return activations[:, :b]

    mid_gradients = _mlp_backward(weights, record, prefix, output_gradients)

    # Attention branch: mid = input + [norm] o(attend(q(n), k(n), v(n))), n = norm(input).
    branch_gradients = _optional_norm_backward(
        mid_gradients, weights.attention_output_norm, record.attention_branch, prefix
    )
    head_gradients = _split_heads(branch_gradients @ weights.o.weight, weights.head_size)  # [C, P, H, b, hd]
    query_gradients, key_gradients, value_gradients = _attention_backward(
        head_gradients,
        record.queries[None, :, :, :b],
        torch.arange(b)[None],
        record.keys[:, :, :b],
        record.values[:, :, :b],
        record.attention_output[None, :, :, :b],
        weights,
    )

    def head_prefix(activations: torch.Tensor) -> torch.Tensor:  # [P, heads, N, ...] -> [P, heads, b, ...]
        return activations[:, :, :b]

    query_gradients = _optional_norm_backward(
        _rotate_backward(query_gradients, cos, sin), weights.query_norm, record.query_heads, head_prefix
    )
    key_gradients = _optional_norm_backward(
        _rotate_backward(key_gradients, cos, sin), weights.key_norm, record.key_heads, head_prefix
    )
    attention_input_gradients = _linear_input_gradients(
        (_merge_heads(query_gradients), weights.q),
        (_merge_heads(key_gradients), weights.k),
        (_merge_heads(value_gradients), weights.v),
    )
    return _rms_backward(
        attention_input_gradients, weights.attention_norm, record.attention_normed[:, :b], record.attention_rstd[:, :b]
    ).add_(mid_gradients)


def _seeded_layer_backward(
    weights: LayerWeights, record: LayerRecord, seeds: Seeds, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """_layer_backward for cotangents that are zero but at one position each: the MLP, output and query projections
    run backward at those positions only, keys and values over the prefix. d/d input [C, P, b, D]; cos, sin [b, hd].
    """
    positions = seeds.positions
    targets = torch.arange(len(positions))

    def at_positions(activations: torch.Tensor) -> torch.Tensor:  # [P, N, ...] -> [C, P, ...]
        return activations[:, positions].transpose(0, 1)

    def heads_at_positions(activations: torch.Tensor) -> torch.Tensor:  # [P, H, N, hd] -> [C, P, H, 1, hd]
        return activations[:, :, positions].permute(2, 0, 1, 3).unsqueeze(3)

    mid_gradients = _mlp_backward(weights, record, at_positions, seeds.rows)  # [C, P, D]
    branch_gradients = _optional_norm_backward(
        mid_gradients, weights.attention_output_norm, record.attention_branch, at_positions
    )
    head_gradients = _split_heads((branch_gradients @ weights.o.weight).unsqueeze(2), weights.head_size)
    query_gradients, key_gradients, value_gradients = _attention_backward(
        head_gradients,  # [C, P, H, 1, hd]
        heads_at_positions(record.queries),
        positions[:, None],
        record.keys[:, :, : seeds.prefix],
        record.values[:, :, : seeds.prefix],
        heads_at_positions(record.attention_output),
        weights,
    )

    def head_prefix(activations: torch.Tensor) -> torch.Tensor:  # [P, heads, N, ...] -> [P, heads, b, ...]
        return activations[:, :, : seeds.prefix]

    key_gradients = _optional_norm_backward(
        _rotate_backward(key_gradients, cos, sin), weights.key_norm, record.key_heads, head_prefix
    )
    attention_input_gradients = _linear_input_gradients(
        (_merge_heads(key_gradients), weights.k),
        (_merge_heads(value_gradients), weights.v),
    )  # [C, P, b, D]
    # Each target's query row at its own position: the rotary tables broadcast over points and heads.
    query_cos, query_sin = cos[positions, None, None, None], sin[positions, None, None, None]
    query_gradients = _optional_norm_backward(
        _rotate_backward(query_gradients, query_cos, query_sin),
        weights.query_norm,
        record.query_heads,
        heads_at_positions,
    )
    query_input_gradients = _merge_heads(query_gradients) @ weights.q.weight
    attention_input_gradients[targets, :, positions] += query_input_gradients[:, :, 0]
    gradients = _rms_backward(
        attention_input_gradients,
        weights.attention_norm,
        record.attention_normed[:, : seeds.prefix],
        record.attention_rstd[:, : seeds.prefix],
    )
    gradients[targets, :, positions] += mid_gradients
    return gradients


def _mlp_backward(
    weights: LayerWeights,
    record: LayerRecord,
    rows: Callable[[torch.Tensor], torch.Tensor],
    output_gradients: torch.Tensor,
) -> torch.Tensor:
    """d/d mid of output = mid + [norm] down(act(gate(n)) * up(n)), n = norm(mid), from d/d output [..., D], whose
    rows are the positions rows() picks out of the record's [P, N, ...] activations."""
    branch_gradients = _optional_norm_backward(output_gradients, weights.mlp_output_norm, record.mlp_branch, rows)
    product_gradients = branch_gradients @ weights.down.weight  # [..., I]
    gate_gradients = product_gradients * rows(record.up_times_gate_slope)
    up_gradients = product_gradients.mul_(rows(record.gate_activation))
    mlp_input_gradients = _linear_input_gradients((gate_gradients, weights.gate), (up_gradients, weights.up))
    return _rms_backward(mlp_input_gradients, weights.mlp_norm, rows(record.mlp_normed), rows(record.mlp_rstd)).add_(
        output_gradients
    )


def _attention_backward(
    output_gradients: torch.Tensor,
    queries: torch.Tensor,
    query_positions: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    outputs: torch.Tensor,
    weights: LayerWeights,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (queries [C, P, H, n, hd], keys and values [C, P, KV, b, hd]) of the layer's causal softmax
    attention, from those of its outputs [C, P, H, n, hd] at n query rows. queries and outputs [C or 1, P, H, n, hd]
    are those rows' (1: shared by the chunk), at query_positions [C or 1, n]; keys and values [P, KV, b, hd] the first
    b positions'. The probabilities are recomputed from queries and keys: [P, H, n, b] is cheap to recompute and too
    big to keep for every layer of a long sequence. Query heads share their group's key and value head as
    transformers' repeat_kv lays them out: heads g * G .. g * G + G - 1 read key head g."""
    chunk, num_points, num_heads, _, head_size = output_gradients.shape
    num_groups = keys.shape[1]
    group_size = num_heads // num_groups
    # Each group's query heads stacked along the query axis: [C or 1, P, KV, G * n, hd].
    grouped_queries = queries.reshape(len(queries), num_points, num_groups, -1, head_size)
    grouped_output_gradients = output_gradients.reshape(chunk, num_points, num_groups, -1, head_size)
    # [C or 1, 1, 1, G * n, b]
    visible = visible_keys(query_positions.repeat(1, group_size), keys.shape[2], weights.options.window)[:, None, None]
    probabilities, cap_slope = attention_scores(grouped_queries, keys, visible, weights.options, weights.scale)

    value_gradients = probabilities.transpose(-1, -2) @ grouped_output_gradients  # [C, P, KV, b, hd]
    probability_gradients = grouped_output_gradients @ values.transpose(-1, -2)  # [C, P, KV, G * n, b]
    # softmax backward: p * (dp - sum_k p dp), and sum_k p dp = dout . out row by row.
    row_terms = (output_gradients * outputs).sum(dim=-1).reshape(chunk, num_points, num_groups, -1, 1)
    score_gradients = probability_gradients.sub_(row_terms).mul_(probabilities)
    if cap_slope is not None:
        score_gradients.mul_(cap_slope)  # through the soft-cap, tanh' = 1 - tanh^2
    score_gradients.mul_(weights.scale)
    query_gradients = (score_gradients @ keys).reshape(output_gradients.shape)
    key_gradients = score_gradients.transpose(-1, -2) @ grouped_queries  # [C, P, KV, b, hd]
    return query_gradients, key_gradients, value_gradients


def _linear_input_gradients(*products: tuple[torch.Tensor, Linear]) -> torch.Tensor:
    """sum_i gradients_i @ weight_i: the input gradient of linear layers that all read one input."""
    (first_gradients, first), *rest = products
    total = first_gradients @ first.weight
    for gradients, linear in rest:
        total = total.add_(gradients @ linear.weight)
    return total


def _rms_backward(output_gradients: torch.Tensor, norm: Norm, normed: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """d/d x of weight * x / rms(x): rstd * (g - normed * mean(g * normed)), g = weight * output gradient."""
    weighted = (output_gradients * norm.weight).to(normed.dtype)
    projection = (weighted * normed).mean(dim=-1, keepdim=True)
    return ((weighted - normed * projection) * rstd).to(output_gradients.dtype)


def _rotate_backward(gradients: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The transpose of rotate: rotate_half is antisymmetric, so it is g * cos - rotate_half(g * sin)."""
    return gradients * cos - rotate_half(gradients * sin)


def _split_heads(x: torch.Tensor, head_size: int) -> torch.Tensor:
    """[..., N, heads * hd] -> [..., heads, N, hd]."""
    return x.view(*x.shape[:-1], -1, head_size).transpose(-2, -3)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[..., heads, N, hd] -> [..., N, heads * hd]."""
    return x.transpose(-2, -3).flatten(-2)
