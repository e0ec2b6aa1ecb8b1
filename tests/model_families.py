"""Tiny random models of every supported decoder family, built from configs and saved as model directories (config,
safetensors, a word-level tokenizer built in memory): what tests/explainers/test_families.py proves every method on,
and what tests/e2e/test_family_serving.py serves with vLLM and explains on the real stack.

Two layers, grouped-query attention where the family has it, weights drawn wide (std 0.3) so next-token
distributions are far from uniform, and sliding-window layers (Gemma) shorter than the explained sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)

from explainers.model import attention_implementation
from tests.explainers.conftest import NUM_LAYERS, VOCAB_SIZE, word_tokenizer


@dataclass(frozen=True)
class AttentionShape:
    """Query heads, key/value heads and head size; the hidden size is heads x head size (which GPT-2, GPT-NeoX and
    Phi-3 require, and the others accept)."""

    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.head_dim


# 4 query heads of size 8 in 2 key/value groups: the explainer tests' float64 references stay cheap.
EXPLAINER_SHAPE = AttentionShape(num_attention_heads=4, num_key_value_heads=2, head_dim=8)
# vLLM CPU 0.32's attention kernels take head sizes of 32, 64, 80, 96, 112, 128, 160, 192, 224, 256 and 512 only
# (`CPUAttentionBackend.get_supported_head_sizes`; head size 8 fails the first request with "Unsupported CPU
# attention configuration"): 2 query heads of size 32 sharing 1 key/value head.
SERVABLE_SHAPE = AttentionShape(num_attention_heads=2, num_key_value_heads=1, head_dim=32)
MAX_POSITIONS = 64


def _sizes(shape: AttentionShape) -> dict[str, Any]:
    return {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": shape.hidden_size,
        "intermediate_size": 2 * shape.hidden_size,
        "num_hidden_layers": NUM_LAYERS,
    }


def _heads(shape: AttentionShape) -> dict[str, Any]:
    return {
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "head_dim": shape.head_dim,
        "max_position_embeddings": MAX_POSITIONS,
    }


def _gemma(shape: AttentionShape) -> dict[str, Any]:
    """Gemma's sliding-window layers see 4 positions, fewer than the 14 the explainer tests explain."""
    return {
        "sliding_window": 4,
        "query_pre_attn_scalar": shape.head_dim,
        "layer_types": ["sliding_attention", "full_attention"],
    }


def _gpt_neox(shape: AttentionShape) -> PretrainedConfig:
    """LayerNorm, parallel residual, partial rotary."""
    return GPTNeoXConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=shape.hidden_size,
        intermediate_size=2 * shape.hidden_size,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=shape.num_attention_heads,
        max_position_embeddings=MAX_POSITIONS,
    )


def _gpt2(shape: AttentionShape) -> PretrainedConfig:
    """LayerNorm, learned absolute positions, Conv1D projections."""
    return GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_embd=shape.hidden_size,
        n_layer=NUM_LAYERS,
        n_head=shape.num_attention_heads,
        n_positions=MAX_POSITIONS,
        bos_token_id=1,
        eos_token_id=1,
    )


# Each supported family (config model_type) -> its tiny config in a given attention shape.
FAMILIES: dict[str, Callable[[AttentionShape], PretrainedConfig]] = {
    "llama": lambda shape: LlamaConfig(**_sizes(shape), **_heads(shape)),
    "mistral": lambda shape: MistralConfig(**_sizes(shape), **_heads(shape), sliding_window=None),
    "qwen2": lambda shape: Qwen2Config(**_sizes(shape), **_heads(shape)),  # bias on q, k and v
    "qwen3": lambda shape: Qwen3Config(**_sizes(shape), **_heads(shape)),  # q and k norms
    # (1 + w) norms, four a layer, embedding scale, GELU-tanh, query_pre_attn_scalar, soft-caps that bite
    "gemma2": lambda shape: Gemma2Config(
        **_sizes(shape), **_heads(shape), **_gemma(shape), attn_logit_softcapping=3.0, final_logit_softcapping=4.0
    ),
    # and q and k norms, and a rotary base of its own for the sliding layers (10^4 against 10^6)
    "gemma3_text": lambda shape: Gemma3TextConfig(**_sizes(shape), **_heads(shape), **_gemma(shape)),
    # fused qkv and gate/up
    "phi3": lambda shape: Phi3Config(**_sizes(shape), **_heads(shape), pad_token_id=0, eos_token_id=2),
    "gpt_neox": _gpt_neox,
    "gpt2": _gpt2,
}


# Variants the explainer tests prove beside the families themselves (not served: vLLM would only repeat the family).
EXPLAINER_VARIANTS: dict[str, Callable[[AttentionShape], PretrainedConfig]] = {
    # Every layer sees 4 positions; and tied embeddings.
    "mistral_sliding": lambda shape: MistralConfig(
        **_sizes(shape), **_heads(shape), sliding_window=4, tie_word_embeddings=True
    ),
}


def build_family_model(
    model_type: str, shape: AttentionShape = EXPLAINER_SHAPE, initializer_range: float = 0.3, seed: int = 0
) -> PreTrainedModel:
    """A random float32 model of the family (a key of FAMILIES or EXPLAINER_VARIANTS); the same arguments give the
    same weights. The default weight scale
    (std 0.3, not a real model's 0.02) makes next-token distributions far from uniform and attributions far from
    zero."""
    config = {**FAMILIES, **EXPLAINER_VARIANTS}[model_type](shape)
    config.initializer_range = initializer_range
    torch.manual_seed(seed)
    model: PreTrainedModel = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
        config, attn_implementation=attention_implementation(config)
    )
    return model


def save_family_model(
    model_type: str, model_dir: Path, shape: AttentionShape = EXPLAINER_SHAPE, initializer_range: float = 0.3
) -> Path:
    """The family's tiny model saved as a model directory, as a served one is: config, safetensors, tokenizer."""
    build_family_model(model_type, shape, initializer_range).save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    return model_dir
