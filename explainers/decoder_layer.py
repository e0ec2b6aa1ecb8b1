"""The one decoder-layer skeleton the fast path computes by hand, its weights read from a Hugging Face module, and
the differences between families as options of it.

The skeleton: x + [post-norm] o(attend(rotate([norm] q(n)), rotate([norm] k(n)), v(n))), n = norm(x); then
h + [post-norm] down(act(gate(m)) * up(m)), m = norm(h). Llama's layer is the bare skeleton. The options:
q/k/v biases (Qwen2), fused projections (Phi-3), per-head q/k norms (Qwen3, Gemma 3), Gemma's (1 + w) RMSNorms
and its norms on each branch's output (four per layer), GELU-tanh gating (Gemma), the query scale
(Gemma's query_pre_attn_scalar), a sliding window per layer (Mistral, Gemma's local layers), soft-capped
attention scores (Gemma 2) and a rotary table per layer type (Gemma 3's local base frequency). Shared by the
hand-written passes (explainers.backprop) and the attention recompute (explainers.methods.attention_weights).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class Activation(enum.Enum):
    """The gate's activation in act(gate) * up."""

    SILU = "silu"  # Llama, Mistral, Qwen, Phi-3
    GELU_TANH = "gelu_tanh"  # Gemma: GELU with the tanh approximation

    def forward(self, gate: torch.Tensor, with_slope: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(act(gate), act'(gate) if with_slope, else None)."""
        if self is Activation.SILU:
            sigmoid = torch.sigmoid(gate)
            # silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
            return gate * sigmoid, sigmoid * (1 + gate * (1 - sigmoid)) if with_slope else None
        activation = F.gelu(gate, approximate="tanh")  # as transformers' GELUTanh computes it
        if not with_slope:
            return activation, None
        # gelu(g) = g / 2 * (1 + tanh(u)), u = sqrt(2 / pi) * (g + 0.044715 g^3), so
        # gelu'(g) = (1 + tanh(u)) / 2 + g / 2 * (1 - tanh(u)^2) * sqrt(2 / pi) * (1 + 3 * 0.044715 g^2).
        inner = math.sqrt(2 / math.pi)
        tanh = torch.tanh(inner * (gate + 0.044715 * gate.pow(3)))
        slope = 0.5 * (1 + tanh) + 0.5 * gate * (1 - tanh * tanh) * inner * (1 + 3 * 0.044715 * gate * gate)
        return activation, slope


# config.hidden_act / hidden_activation values, as transformers' ACT2FN names them, that the fast path computes.
ACTIVATIONS = {"silu": Activation.SILU, "swish": Activation.SILU, "gelu_pytorch_tanh": Activation.GELU_TANH}


@dataclass(frozen=True)
class LayerOptions:
    """How one decoder layer departs from Llama's, as the model's config says it (explainers.architectures reads
    them); what the module's own submodules show (biases, fused projections, q/k norms, four norms) is read from
    the module instead."""

    activation: Activation = Activation.SILU
    # Keys visible from a query: the `window` positions up to and including its own; None: every earlier one.
    window: int | None = None
    # Attention scores soft-capped before the softmax, tanh(s / cap) * cap (Gemma 2); None: not capped.
    softcap: float | None = None
    # The layer type the rotary embedding takes, where it keeps a table per type (Gemma 3); None: one table.
    rotary_type: str | None = None
    # Gemma's RMSNorms scale by (1 + w), Llama's by w.
    norm_offset: float = 0.0


@dataclass(frozen=True)
class Linear:
    weight: torch.Tensor  # [out, in], as nn.Linear keeps it
    bias: torch.Tensor | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


@dataclass(frozen=True)
class Norm:
    """An RMSNorm: weight * x / rms(x). For Gemma's (1 + w) norms the weight is 1 + w, added once at load."""

    weight: torch.Tensor
    eps: float


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's parameters, typed, and its options."""

    attention_norm: Norm
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    head_size: int
    scale: float  # of the query-key products: head_size^-0.5, or Gemma's query_pre_attn_scalar^-0.5
    mlp_norm: Norm
    gate: Linear
    up: Linear
    down: Linear
    options: LayerOptions = LayerOptions()
    # Per-head RMSNorms of each query and key head (over the head size), before the rotary embedding; None without.
    query_norm: Norm | None = None
    key_norm: Norm | None = None
    # Gemma's norms of the attention's and the MLP's output, before each joins the residual stream; None without.
    attention_output_norm: Norm | None = None
    mlp_output_norm: Norm | None = None

    @classmethod
    def of(cls, decoder_layer: nn.Module, options: LayerOptions) -> LayerWeights:
        attention = decoder_layer.get_submodule("self_attn")
        head_size = int(getattr(attention, "head_dim"))  # noqa: B009 (a plain attribute, not a submodule)
        offset = options.norm_offset
        has_head_norms = hasattr(attention, "q_norm")
        if hasattr(attention, "qkv_proj"):
            # Phi-3 fuses the projections: query heads, then key heads, then value heads along the output.
            query_size = int(getattr(attention, "config").num_attention_heads) * head_size  # noqa: B009
            key_size = int(getattr(attention, "num_key_value_heads")) * head_size  # noqa: B009
            q, k, v = _split_linear(attention, "qkv_proj", (query_size, key_size, key_size))
        else:
            q, k, v = (_linear(attention, f"{name}_proj") for name in "qkv")
        mlp = decoder_layer.get_submodule("mlp")
        if hasattr(mlp, "gate_up_proj"):
            # Phi-3 fuses gate and up: the gate is the first half of the output, as Phi3MLP chunks it.
            intermediate_size = int(getattr(mlp, "down_proj").in_features)  # noqa: B009
            gate, up = _split_linear(mlp, "gate_up_proj", (intermediate_size, intermediate_size))
        else:
            gate, up = _linear(mlp, "gate_proj"), _linear(mlp, "up_proj")
        # Gemma names its four norms by place: post_attention_layernorm normalises the attention's output there,
        # where Llama's normalises the MLP's input.
        sandwiched = hasattr(decoder_layer, "pre_feedforward_layernorm")
        return cls(
            attention_norm=_norm(decoder_layer, "input_layernorm", offset),
            q=q,
            k=k,
            v=v,
            o=_linear(attention, "o_proj"),
            head_size=head_size,
            scale=float(getattr(attention, "scaling")),  # noqa: B009
            mlp_norm=_norm(
                decoder_layer, "pre_feedforward_layernorm" if sandwiched else "post_attention_layernorm", offset
            ),
            gate=gate,
            up=up,
            down=_linear(mlp, "down_proj"),
            options=options,
            query_norm=_norm(attention, "q_norm", offset) if has_head_norms else None,
            key_norm=_norm(attention, "k_norm", offset) if has_head_norms else None,
            attention_output_norm=_norm(decoder_layer, "post_attention_layernorm", offset) if sandwiched else None,
            mlp_output_norm=_norm(decoder_layer, "post_feedforward_layernorm", offset) if sandwiched else None,
        )


def _linear(module: nn.Module, path: str) -> Linear:
    linear = module.get_submodule(path)
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"{path} is a {type(linear).__name__}, not an nn.Linear")
    return Linear(weight=linear.weight, bias=linear.bias)


def _split_linear(module: nn.Module, path: str, sizes: tuple[int, ...]) -> list[Linear]:
    """A fused nn.Linear as the linear layers whose outputs it concatenates, of those output sizes (views of the
    frozen weights, not copies)."""
    fused = _linear(module, path)
    if sum(sizes) != fused.weight.shape[0]:
        raise TypeError(f"{path} has {fused.weight.shape[0]} outputs, expected {' + '.join(map(str, sizes))}")
    starts = [sum(sizes[:index]) for index in range(len(sizes))]
    bias = fused.bias
    return [
        Linear(weight=fused.weight[start : start + size], bias=None if bias is None else bias[start : start + size])
        for start, size in zip(starts, sizes, strict=True)
    ]


def _norm(module: nn.Module, path: str, offset: float) -> Norm:
    """The RMSNorm at path; its epsilon is `variance_epsilon` (Llama's) or `eps` (Gemma's)."""
    norm = module.get_submodule(path)
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if not isinstance(weight, torch.Tensor) or not isinstance(eps, float):
        raise TypeError(f"{path} is a {type(norm).__name__}, not an RMSNorm with a weight and an epsilon")
    # Gemma adds 1 + w on every call; the fast path once here (a copy of the hidden size, in the weights' dtype).
    return Norm(weight=weight + offset if offset else weight, eps=eps)


def rms_norm(hidden: torch.Tensor, norm: Norm) -> torch.Tensor:
    """The RMSNorm's output: weight * hidden / rms(hidden), computed in at least float32, in hidden's dtype. The
    weight may carry leading dimensions, to normalise several layers' inputs at once."""
    normed, _ = rms_normalize(hidden, norm)
    return norm.weight * normed.to(hidden.dtype)


def rms_normalize(hidden: torch.Tensor, norm: Norm) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden / rms(hidden), 1 / rms(hidden)) as the RMSNorms compute them, in at least float32."""
    upcast = hidden.to(torch.promote_types(hidden.dtype, torch.float32))
    rstd = torch.rsqrt(upcast.pow(2).mean(dim=-1, keepdim=True) + norm.eps)
    return upcast * rstd, rstd


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding in the Llama (half-split) layout, as transformers applies it:
    x * cos + rotate_half(x) * sin, with tables that broadcast over x (positions along the same axis)."""
    return x * cos + rotate_half(x) * sin


class RotaryTable(NamedTuple):
    cos: torch.Tensor  # [num_tokens, head_size]
    sin: torch.Tensor


def rotary_tables(
    rotary_embedding: nn.Module, states: torch.Tensor, rotary_types: set[str | None], offset: int = 0
) -> dict[str | None, RotaryTable]:
    """The rotary embedding's tables for states' positions [.., num_tokens, ..] (offset.. of their sequence), one
    per layer type it keeps a table for (LayerOptions.rotary_type), computed once for every layer of that type."""
    positions = torch.arange(offset, offset + states.shape[-2], device=states.device)[None]
    tables = {}
    with torch.no_grad():
        for rotary_type in rotary_types:
            args = () if rotary_type is None else (rotary_type,)
            cos, sin = rotary_embedding(states, positions, *args)
            tables[rotary_type] = RotaryTable(cos[0], sin[0])
    return tables


def visible_keys(query_positions: torch.Tensor, num_keys: int, window: int | None) -> torch.Tensor:
    """Which keys each query attends to, [..., num_keys] booleans for query_positions [...]: every key up to its own
    position, and with a window only the `window` positions up to it (transformers' sliding-window mask)."""
    keys = torch.arange(num_keys, device=query_positions.device)
    queries = query_positions[..., None]
    visible = keys <= queries
    if window is not None and window < num_keys:
        visible &= keys > queries - window
    return visible


def attention_scores(
    queries: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor, options: LayerOptions, scale: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(softmax probabilities [..., queries, keys], d capped / d scores or None uncapped) of queries [..., n, hd]
    against keys [..., b, hd], masked where `visible` (broadcast) is false: scaled scores, soft-capped if the layer
    caps them, masked, softmax."""
    scores = (queries @ keys.transpose(-1, -2)) * scale
    slope = None
    if options.softcap is not None:
        capped = torch.tanh(scores / options.softcap)
        slope = 1 - capped * capped
        scores = capped * options.softcap
    probabilities = torch.softmax(scores.masked_fill(~visible, -torch.inf), dim=-1)
    return probabilities, slope
