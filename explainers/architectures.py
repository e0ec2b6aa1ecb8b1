"""The decoder architectures the explainer knows, and which of its two paths explains each.

The fast path (explainers.backprop) writes a decoder layer's backward pass out by hand, so it covers one layer
skeleton (explainers.decoder_layer): Llama's, with the differences of Mistral, Qwen2, Qwen3, Phi-3, Gemma 2 and
Gemma 3 as options read from the config here (LayerOptions). The general path (explainers.general_path)
differentiates the Hugging Face module itself with autograd, so it is correct for any causal LM transformers loads,
at autograd's speed: GPT-NeoX and GPT-2, and any config of a fast family the skeleton does not cover. An
architecture is listed here when the tests prove every method on a tiny random model of it
(tests/explainers/test_families.py); anything else is refused when the model loads, before a job is taken.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from sightline.v1 import types_pb2

from explainers.decoder_layer import ACTIVATIONS, LayerOptions


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
    # Whether the hand-written backward pass covers this layer skeleton (then only for the ACTIVATIONS it knows).
    fast_path: bool = False
    # Gemma's RMSNorms scale by (1 + w).
    norm_offset: float = 0.0

    def path_for(self, config: object) -> ExplainPath:
        """The fastest path that is exact for a model of this architecture with this config: the fast path needs an
        activation it differentiates, rotary embeddings over whole heads and causal attention."""
        causal = not getattr(config, "use_bidirectional_attention", False)
        if self.fast_path and activation_of(config) in ACTIVATIONS and _rotates(config) and causal:
            return ExplainPath.FAST
        return ExplainPath.GENERAL

    def layer_options(self, config: object, index: int) -> LayerOptions:
        """Decoder layer `index`'s departures from Llama's, for the fast path (path_for is FAST)."""
        layer_types = getattr(config, "layer_types", None)
        layer_type = layer_types[index] if layer_types is not None else None
        rope = getattr(config, "rope_parameters", None)
        cap = getattr(config, "attn_logit_softcapping", None)
        name = activation_of(config)
        activation = ACTIVATIONS.get(name) if name is not None else None
        if activation is None:
            raise ValueError(f"the fast path does not differentiate the MLP activation {name!r}")
        return LayerOptions(
            activation=activation,
            window=layer_windows(config)[index],
            softcap=float(cap) if cap else None,
            # Gemma 3 keys its rope parameters by layer type (a local base frequency for sliding layers).
            rotary_type=layer_type if isinstance(rope, dict) and layer_type in rope else None,
            norm_offset=self.norm_offset,
        )


def activation_of(config: object) -> str | None:
    """The MLP's gate activation as the config names it: Gemma's hidden_activation, everyone else's hidden_act."""
    activation = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    return activation if isinstance(activation, str) else None


def _rotates(config: object) -> bool:
    """Whether the rotary embedding turns every dimension of a head (the fast path's rotate()), not a part."""
    rope = getattr(config, "rope_parameters", None) or {}
    factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    return factor is None or factor == 1.0


def layer_windows(config: object) -> list[int | None]:
    """Each decoder layer's sliding window (the positions up to a query's own that it attends to), None for a layer
    that attends to every earlier position, as transformers reads the config: per-layer layer_types where the
    family has them (Gemma, Qwen2, Qwen3), else one sliding_window for every layer (Mistral, Phi-3). A window no
    shorter than the model's positions is none."""
    num_layers = int(getattr(config, "num_hidden_layers", 0))
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or window >= getattr(config, "max_position_embeddings", window + 1):
        return [None] * num_layers
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return [window if layer_type == "sliding_attention" else None for layer_type in layer_types]
    return [window] * num_layers


def attends_fully(config: object) -> bool:
    """Whether every layer attends to every earlier position: no layer has a sliding window (layer_windows)."""
    return all(window is None for window in layer_windows(config))


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
        # (1 + w) norms, four a layer, GELU-tanh gating, query_pre_attn_scalar, alternating sliding-window layers,
        # embeddings scaled by sqrt(hidden) (in the embedding module), attention (Gemma 2) and logit soft-caps; and
        # q/k norms and a local rotary base for the sliding layers (Gemma 3).
        Architecture("gemma2", "Gemma 2", _LAYERS, _NORM, fast_path=True, norm_offset=1.0),
        Architecture("gemma3_text", "Gemma 3 text", _LAYERS, _NORM, fast_path=True, norm_offset=1.0),
        # And fused q/k/v and gate/up projections, which the fast path splits into views.
        Architecture("phi3", "Phi-3", _LAYERS, _NORM, fast_path=True),
        Architecture("gpt_neox", "GPT-NeoX, Pythia", "gpt_neox.layers", "gpt_neox.final_layer_norm"),
        Architecture("gpt2", "GPT-2", "transformer.h", "transformer.ln_f"),
    )
}


# Image-text models (config.model_type -> family), explained with the image methods over the Hugging Face module
# (explainers.vlm, explainers.image_methods): transformers' Idefics3 layout, which the constructed VLM has.
IMAGE_TEXT_ARCHITECTURES: dict[str, str] = {"idefics3": "Idefics3, SmolVLM (requests with pictures)"}


def supported_text() -> str:
    """Every supported architecture as a person reads the list: "llama: Llama 2/3, SmolLM2; mistral: Mistral; ..."."""
    families = [(arch.model_type, arch.family) for arch in ARCHITECTURES.values()]
    return "; ".join(f"{model_type}: {family}" for model_type, family in [*families, *IMAGE_TEXT_ARCHITECTURES.items()])


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
