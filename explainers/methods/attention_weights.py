"""Attention probabilities recomputed from the cached hidden states.

The model runs SDPA, which never materialises its attention probabilities, so the attention methods recompute them
from each decoder layer's input exactly as the layer does: input norm, query/key projections (and head norms),
rotary embeddings (the layer type's table), grouped-query key sharing, scaled dot product (soft-capped where the
layer caps it), causal mask (cut to the layer's sliding window), softmax. Only the query rows a method asks for are
computed, so explaining T targets costs [heads, T, num_tokens] per layer, not [heads, num_tokens, num_tokens].
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from explainers import general_path
from explainers.architectures import ExplainPath
from explainers.decoder_layer import LayerWeights, Norm, RotaryTable, rms_norm, rotary_tables, rotate, visible_keys
from explainers.model import LoadedModel

FUSIONS = ("mean", "max", "min")
# Probabilities ([layers, heads, queries, tokens] floats) computed at once: 32 MiB.
MAX_GROUP_PROBABILITIES = 1 << 23


def attention_probabilities(
    loaded: LoadedModel, hidden_states: torch.Tensor, layers: Iterable[int], query_positions: torch.Tensor
) -> Iterator[torch.Tensor]:
    """For each decoder layer in `layers` (1-based), in that order, its attention probabilities [heads, num_queries,
    num_tokens] for the queries at query_positions [num_queries], from hidden_states [num_layers + 1, num_tokens,
    hidden] (a layer's input is hidden_states[layer - 1]). Keys after a query's position get exactly 0.

    Layers are computed a group at a time, every elementwise step once for the group: a layer's few hundred
    thousand probabilities are too small a job for a step of its own. A group holds at most MAX_GROUP_PROBABILITIES
    (one layer, if a layer has more). On the general path they are the module's own `output_attentions`, from one
    pass in which every layer reads its cached input (explainers.general_path).
    """
    if loaded.path is ExplainPath.GENERAL:
        every_layer = general_path.attention_probabilities(loaded.model, loaded.decoder_layers, hidden_states[:-1])
        for layer in layers:
            yield every_layer[layer - 1][:, query_positions]
        return
    num_heads = int(loaded.model.config.num_attention_heads)
    num_tokens = hidden_states.shape[1]
    ordered = list(layers)
    rotary_types = {loaded.layer_weights[layer - 1].options.rotary_type for layer in ordered}
    # Grad mode is switched off around each group's work, not across a yield, where it would leak to the caller.
    tables = rotary_tables(loaded.rotary_embedding, hidden_states[:1], rotary_types)  # [num_tokens, head_dim] each
    per_group = max(1, MAX_GROUP_PROBABILITIES // (num_heads * len(query_positions) * num_tokens))
    for start in range(0, len(ordered), per_group):
        with torch.no_grad():
            probabilities = _layer_group(
                loaded, hidden_states, ordered[start : start + per_group], query_positions, tables
            )
        yield from probabilities


def _layer_group(
    loaded: LoadedModel,
    hidden_states: torch.Tensor,
    layers: list[int],
    query_positions: torch.Tensor,
    tables: dict[str | None, RotaryTable],
) -> torch.Tensor:
    """attention_probabilities of `layers` [len(layers), heads, num_queries, num_tokens]; tables: the rotary tables
    [num_tokens, head_dim] by layer type."""
    config = loaded.model.config
    weights = [loaded.layer_weights[layer - 1] for layer in layers]
    # The attention module's head size: some configs (Qwen2) leave head_dim to be derived.
    num_heads, num_kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, weights[0].head_size
    group, num_queries, num_tokens = len(layers), len(query_positions), hidden_states.shape[1]
    stacked_norm = Norm(
        weight=torch.stack([w.attention_norm.weight for w in weights])[:, None], eps=weights[0].attention_norm.eps
    )
    normed = rms_norm(hidden_states[[layer - 1 for layer in layers]], stacked_norm)  # [group, num_tokens, hidden]
    queries = torch.stack([w.q(rows[query_positions]) for w, rows in zip(weights, normed, strict=True)])
    keys = torch.stack([w.k(rows) for w, rows in zip(weights, normed, strict=True)])
    # Grouped-query attention: consecutive query heads share one key head, so queries are laid out
    # [group, num_queries, kv heads, heads per kv head, head_dim] against keys [group, num_tokens, kv heads, head_dim];
    # the rotary tables [group or 1, num_tokens, head_dim] broadcast over heads.
    # Scaled before the product, not after: [queries, hidden] products instead of [heads, queries, tokens]; the
    # same bits when the scale is a power of two (head_dim 64: 1/8).
    cos, sin = _stacked_tables(tables, weights)
    queries = rotate(
        _head_normed(queries.view(group, num_queries, num_kv_heads, -1, head_dim), [w.query_norm for w in weights]),
        cos[:, query_positions, None, None],
        sin[:, query_positions, None, None],
    ).mul_(_scales(weights))
    keys = rotate(
        _head_normed(keys.view(group, num_tokens, num_kv_heads, head_dim), [w.key_norm for w in weights]),
        cos[:, :, None],
        sin[:, :, None],
    )
    logits = torch.einsum("lqkgd,lnkd->lkgqn", queries, keys).reshape(group, num_heads, num_queries, num_tokens)
    for layer_logits, layer_weights in zip(logits, weights, strict=True):
        cap = layer_weights.options.softcap
        if cap is not None:
            layer_logits.div_(cap).tanh_().mul_(cap)
    windows = {w.options.window for w in weights}
    visible = (
        visible_keys(query_positions, num_tokens, windows.pop())  # [num_queries, num_tokens]
        if len(windows) == 1
        else torch.stack([visible_keys(query_positions, num_tokens, w.options.window) for w in weights])[:, None]
    )
    probabilities: torch.Tensor = logits.masked_fill_(~visible, float("-inf")).softmax(dim=-1)
    return probabilities


def _stacked_tables(
    tables: dict[str | None, RotaryTable], weights: list[LayerWeights]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layers' rotary tables (cos, sin) [group, num_tokens, head_dim], or [1, ...] when they share one."""
    types = [w.options.rotary_type for w in weights]
    if len(set(types)) == 1:
        table = tables[types[0]]
        return table.cos[None], table.sin[None]
    return torch.stack([tables[t].cos for t in types]), torch.stack([tables[t].sin for t in types])


def _scales(weights: list[LayerWeights]) -> float | torch.Tensor:
    """The layers' query scales, one number when they share it, else [group, 1, 1, 1, 1]."""
    scales = {w.scale for w in weights}
    if len(scales) == 1:
        return scales.pop()
    return torch.tensor([w.scale for w in weights], dtype=weights[0].q.weight.dtype).view(-1, 1, 1, 1, 1)


def _head_normed(heads: torch.Tensor, norms: list[Norm | None]) -> torch.Tensor:
    """heads [group, ..., head_dim] through each layer's per-head RMSNorm (Qwen3, Gemma 3), or as they are without
    one."""
    present = [norm for norm in norms if norm is not None]
    if not present:
        return heads
    weight = torch.stack([norm.weight for norm in present]).view(len(present), *[1] * (heads.dim() - 2), -1)
    return rms_norm(heads, Norm(weight=weight, eps=present[0].eps))


def fuse(stacked: torch.Tensor, how: str) -> torch.Tensor:
    """stacked reduced over its first dimension (heads or layers) by "mean", "max" or "min"."""
    if how == "mean":
        return stacked.mean(dim=0)
    if how == "max":
        return stacked.amax(dim=0)
    if how == "min":
        return stacked.amin(dim=0)
    raise ValueError(f"unknown fusion {how!r}; use one of {', '.join(FUSIONS)}")
