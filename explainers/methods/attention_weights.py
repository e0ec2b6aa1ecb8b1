"""Attention probabilities recomputed from the cached hidden states.

The model runs SDPA, which never materialises its attention probabilities, so the attention methods recompute them
from each decoder layer's input exactly as the layer does: input norm, query/key projections, rotary embeddings,
grouped-query key sharing, scaled dot product, causal mask, softmax. Only the query rows a method asks for are
computed, so explaining T targets costs [heads, T, num_tokens] per layer, not [heads, num_tokens, num_tokens].
"""

from __future__ import annotations

import torch

from explainers.backprop import rotate
from explainers.model import LoadedModel

FUSIONS = ("mean", "max", "min")


def attention_probabilities(
    loaded: LoadedModel, hidden_states: torch.Tensor, layer: int, query_positions: torch.Tensor
) -> torch.Tensor:
    """Attention probabilities [heads, num_queries, num_tokens] of decoder layer `layer` (1-based) for the queries
    at query_positions [num_queries], from hidden_states [num_layers + 1, num_tokens, hidden] (the layer's input is
    hidden_states[layer - 1]). Keys after a query's position get exactly 0."""
    config = loaded.model.config
    num_heads, num_kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    decoder_layer = loaded.decoder_layers[layer - 1]
    input_norm = decoder_layer.get_submodule("input_layernorm")
    query_projection = decoder_layer.get_submodule("self_attn.q_proj")
    key_projection = decoder_layer.get_submodule("self_attn.k_proj")
    num_tokens = hidden_states.shape[1]
    with torch.no_grad():
        normed = input_norm(hidden_states[layer - 1])  # [num_tokens, hidden]
        positions = torch.arange(num_tokens)
        cos, sin = loaded.rotary_embedding(normed[None], positions[None])  # [1, num_tokens, head_dim] each
        cos, sin = cos[0, :, None], sin[0, :, None]  # [num_tokens, 1, head_dim]: broadcast over heads
        queries = query_projection(normed[query_positions]).view(len(query_positions), num_heads, head_dim)
        keys = key_projection(normed).view(num_tokens, num_kv_heads, head_dim)
        queries = rotate(queries, cos[query_positions], sin[query_positions])
        # Grouped-query attention: consecutive query heads share one key head.
        keys = rotate(keys, cos, sin).repeat_interleave(num_heads // num_kv_heads, dim=1)
        logits = torch.einsum("qhd,khd->hqk", queries, keys) * head_dim**-0.5
        causal = positions[None, :] <= query_positions[:, None]  # [num_queries, num_tokens]
        probabilities: torch.Tensor = logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    return probabilities


def fuse(stacked: torch.Tensor, how: str) -> torch.Tensor:
    """stacked reduced over its first dimension (heads or layers) by "mean", "max" or "min"."""
    if how == "mean":
        return stacked.mean(dim=0)
    if how == "max":
        return stacked.amax(dim=0)
    if how == "min":
        return stacked.amin(dim=0)
    raise ValueError(f"unknown fusion {how!r}; use one of {', '.join(FUSIONS)}")
