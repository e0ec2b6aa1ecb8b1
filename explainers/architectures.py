"""The decoder architectures the explainer knows, and which of its two paths explains each.

The fast path (explainers.backprop) writes a decoder layer's backward pass out by hand, so it covers one layer
skeleton: Llama's, which Mistral, Qwen2, Qwen3 and Phi-3 share when no layer has a sliding window. The general path
(explainers.general_path) differentiates the Hugging Face module itself with autograd, so it is correct for any
causal LM transformers loads, at autograd's speed. An architecture is listed here when the tests prove every method
on a tiny random model of it (tests/explainers/test_families.py); anything else is refused when the model loads,
before a job is taken.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from sightline.v1 import types_pb2

# The MLP activation the fast path differentiates by hand (LlamaMLP's SiLU gate).
FAST_PATH_ACTIVATIONS = ("silu", "swish")


class ExplainPath(enum.Enum):
    FAST = "fast"
    GENERAL = "general"

    @property
    def proto(self) -> types_pb2.ExplainPath:
        """As Explanation.explain_path and ListMethodsResponse.explain_path carry it."""
        return types_pb2.EXPLAIN_PATH_FAST if self is ExplainPath.FAST else types_pb2.EXPLAIN_PATH_GENERAL


class UnsupportedArchitectureError(ValueError):
    """A model whose architecture no explainer path has been proven on."""


@dataclass(frozen=True)
class Architecture:
    """Where a family keeps what the methods read, by module path, as transformers lays it out."""

    model_type: str  # config.model_type
    family: str  # as a person names it
    decoder_layers: str  # the nn.ModuleList of decoder blocks
    final_norm: str  # the norm between the last block and the unembedding
    # Whether the hand-written backward pass covers this layer skeleton (then only for a SiLU-gated MLP).
    fast_path: bool = False

    def path_for(self, config: object) -> ExplainPath:
        """The fastest path that is exact for a model of this architecture with this config: the fast path needs
        SiLU gating and every layer attending to every earlier position (no sliding window)."""
        activation = getattr(config, "hidden_act", None)
        if self.fast_path and activation in FAST_PATH_ACTIVATIONS and attends_fully(config) and _rotates(config):
            return ExplainPath.FAST
        return ExplainPath.GENERAL


def _rotates(config: object) -> bool:
    """Whether the rotary embedding turns every dimension of a head (the fast path's rotate()), not a part."""
    rope = getattr(config, "rope_parameters", None) or {}
    factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    return factor is None or factor == 1.0


def attends_fully(config: object) -> bool:
    """Whether every layer attends to every earlier position: no layer of a sliding window, as config says it
    (per-layer layer_types where the family has them, else one sliding_window for all layers), or a window no
    shorter than the model's positions."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(layer_type == "full_attention" for layer_type in layer_types)
    window = getattr(config, "sliding_window", None)
    return window is None or window >= getattr(config, "max_position_embeddings", window + 1)


# Llama's layout, which most families copy: the decoder blocks and the final norm.
_LAYERS, _NORM = "model.layers", "model.norm"

ARCHITECTURES: dict[str, Architecture] = {
    architecture.model_type: architecture
    for architecture in (
        Architecture("llama", "Llama 2/3, SmolLM2", _LAYERS, _NORM, fast_path=True),
        # Llama's skeleton but for a sliding window (Mistral v0.1) and q/k/v biases (Qwen2), which the fast path's
        # forward adds and its backward needs no term for.
        Architecture("mistral", "Mistral", _LAYERS, _NORM, fast_path=True),
        Architecture("qwen2", "Qwen2 / Qwen2.5", _LAYERS, _NORM, fast_path=True),
        # And q/k norms per head before the rotary embedding, which the fast path differentiates.
        Architecture("qwen3", "Qwen3", _LAYERS, _NORM, fast_path=True),
        Architecture("gemma2", "Gemma 2", _LAYERS, _NORM),
        Architecture("gemma3_text", "Gemma 3 text", _LAYERS, _NORM),
        # And fused q/k/v and gate/up projections, which the fast path splits into views.
        Architecture("phi3", "Phi-3", _LAYERS, _NORM, fast_path=True),
        Architecture("gpt_neox", "GPT-NeoX, Pythia", "gpt_neox.layers", "gpt_neox.final_layer_norm"),
        Architecture("gpt2", "GPT-2", "transformer.h", "transformer.ln_f"),
    )
}


def supported_text() -> str:
    """Every supported architecture as a person reads the list: "llama: Llama 2/3, SmolLM2; mistral: Mistral; ..."."""
    return "; ".join(f"{arch.model_type}: {arch.family}" for arch in ARCHITECTURES.values())


def architecture_of(config: object) -> Architecture:
    """The Architecture of a transformers config, or UnsupportedArchitectureError naming it and what is supported."""
    model_type = getattr(config, "model_type", None)
    architecture = ARCHITECTURES.get(model_type) if isinstance(model_type, str) else None
    if architecture is None:
        classes = getattr(config, "architectures", None) or []
        named = f"{model_type!r}" + (f" ({', '.join(classes)})" if classes else "")
        raise UnsupportedArchitectureError(
            f"model architecture {named} is not supported by the explainer; supported: {supported_text()}"
        )
    return architecture
