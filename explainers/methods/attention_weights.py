"""Attention probabilities recomputed from the cached hidden states.

The model runs SDPA, which never materialises its attention probabilities, so the attention methods recompute them
from each decoder layer's input exactly as the layer does: input norm, query/key projections, rotary embeddings,
grouped-query key sharing, scaled dot product, causal mask, softmax. Only the query rows a method asks for are
computed, so explaining T targets costs [heads, T, num_tokens] per layer, not [heads, num_tokens, num_tokens].
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from explainers.backprop import rotate
from explainers.model import LoadedModel

FUSIONS = ("mean", "max", "min")


def attention_probabilities(
    loaded: LoadedModel, hidden_states: torch.Tensor, layers: Iterable[int], query_positions: torch.Tensor
) -> Iterator[torch.Tensor]:
    """For each decoder layer in `layers` (1-based), in that order, its attention probabilities [heads, num_queries,
    num_tokens] for the queries at query_positions [num_queries], from hidden_states [num_layers + 1, num_tokens,
    hidden] (a layer's input is hidden_states[layer - 1]). Keys after a query's position get exactly 0. One layer's
    probabilities are held at a time; the rotary tables are computed once for all of them."""
    config = loaded.model.config
    num_heads, num_kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    num_queries, num_tokens = len(query_positions), hidden_states.shape[1]
    positions = torch.arange(num_tokens)
    causal = positions[None, :] <= query_positions[:, None]  # [num_queries, num_tokens]
    # Grad mode is switched off around each layer's work, not across a yield, where it would leak to the caller.
    with torch.no_grad():
        cos, sin = loaded.rotary_embedding(hidden_states[:1], positions[None])  # [1, num_tokens, head_dim] each
    cos, sin = cos[0, :, None], sin[0, :, None]  # [num_tokens, 1, head_dim]: broadcast over heads
    query_cos, query_sin = cos[query_positions, None], sin[query_positions, None]  # broadcast over groups too
    for layer in layers:
        decoder_layer = loaded.decoder_layers[layer - 1]
        with torch.no_grad():
            normed = decoder_layer.get_submodule("input_layernorm")(hidden_states[layer - 1])  # [num_tokens, hidden]
            queries = decoder_layer.get_submodule("self_attn.q_proj")(normed[query_positions])
            keys = decoder_layer.get_submodule("self_attn.k_proj")(normed).view(num_tokens, num_kv_heads, head_dim)
            # Grouped-query attention: consecutive query heads share one key head, so queries are laid out
            # [num_queries, kv heads, group, head_dim] against keys [num_tokens, kv heads, head_dim].
            queries = rotate(queries.view(num_queries, num_kv_heads, -1, head_dim), query_cos, query_sin)
            keys = rotate(keys, cos, sin)
            logits = torch.einsum("qkgd,nkd->kgqn", queries, keys).reshape(num_heads, num_queries, num_tokens)
            probabilities = (logits * head_dim**-0.5).masked_fill(~causal, float("-inf")).softmax(dim=-1)
        yield probabilities


def fuse(stacked: torch.Tensor, how: str) -> torch.Tensor:
    """stacked reduced over its first dimension (heads or layers) by "mean", "max" or "min"."""
    if how == "mean":
        return stacked.mean(dim=0)
    if how == "max":
        return stacked.amax(dim=0)
    if how == "min":
        return stacked.amin(dim=0)
    raise ValueError(f"unknown fusion {how!r}; use one of {', '.join(FUSIONS)}")
