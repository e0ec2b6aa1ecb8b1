"""Fixtures for the explainer tests: a tiny random Llama with a word-level tokenizer, and a real Redis server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from sightline.v1 import types_pb2
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel, PreTrainedTokenizerFast
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from explainers.methods.base import AttributionContext
from explainers.model import ATTN_IMPLEMENTATION, LoadedModel, forward_with_hidden_states
from explainers.targets import Targets

# Every method the registry offers, as its error messages list them.
REGISTERED_METHODS = (
    "attention, attention_rollout, gradient_x_activation, input_x_gradient, integrated_gradients, "
    "layer_integrated_gradients, logit_lens, occlusion, saliency, shapley_sampling"
)
VOCAB_SIZE = 64
NUM_LAYERS = 2
# Fixed, so every test explains the same sequence: 6 prompt tokens, then 8 generated ones.
PROMPT_IDS = [3, 17, 42, 8, 61, 25]
OUTPUT_IDS = [9, 33, 50, 2, 47, 14, 30, 58]


class Float64RMSNorm(LlamaRMSNorm):
    """LlamaRMSNorm without its float32 round trip, which it takes even in a float64 model: the float64 tiny model
    is then float64 throughout, and two correct computations of a gradient agree to float64 precision, not to the
    float32 rounding of each norm."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        rstd = torch.rsqrt(hidden_states.pow(2).mean(dim=-1, keepdim=True) + self.variance_epsilon)
        normed: torch.Tensor = self.weight * (hidden_states * rstd)
        return normed


def build_tiny_llama(dtype: torch.dtype, seed: int = 0) -> PreTrainedModel:
    """A random 2-layer Llama with grouped-query attention. Weights are drawn wider than a real initialisation
    (std 0.3, not 0.02) so the next-token distribution is far from uniform and attributions are far from zero."""
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.3,
    )
    torch.manual_seed(seed)
    # Initialised in float32 and then cast, so every dtype holds the same weights.
    model: PreTrainedModel = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
        config, attn_implementation=ATTN_IMPLEMENTATION
    )
    model.to(dtype)  # type: ignore[arg-type]  # mypy cannot see through transformers' decorator on .to
    if dtype == torch.float64:
        for module in model.modules():
            if isinstance(module, LlamaRMSNorm):
                module.__class__ = Float64RMSNorm
    model.train(False)
    model.requires_grad_(False)
    return model


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Token id i is the word "w{i}"; built in memory, nothing downloaded."""
    word_level = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(VOCAB_SIZE)}, unk_token="w0"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # transformers' tokenizer __init__s are unannotated.
    return PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="w0")  # type: ignore[no-untyped-call]


def tiny_loaded_model(dtype: torch.dtype) -> LoadedModel:
    return LoadedModel(
        model=build_tiny_llama(dtype),
        tokenizer=word_tokenizer(),
        weights_digest=f"tiny-llama-{dtype}".replace("torch.", ""),
        model_name="tiny-llama",
        num_layers=NUM_LAYERS,
    )


@pytest.fixture(scope="package", autouse=True)
def two_torch_threads() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_model() -> LoadedModel:
    """float64, so comparisons against independent computations can be tight."""
    return tiny_loaded_model(torch.float64)


@pytest.fixture(scope="session")
def tiny_model_float32() -> LoadedModel:
    """The same weights in float32, the dtype the explainer serves with."""
    return tiny_loaded_model(torch.float32)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face directory (config, safetensors, tokenizer) holding the tiny Llama in float32."""
    model_dir = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(torch.float32).save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    return model_dir


@pytest.fixture
def token_ids() -> torch.Tensor:
    return torch.tensor(PROMPT_IDS + OUTPUT_IDS)


@pytest.fixture
def target_positions() -> torch.Tensor:
    return torch.arange(len(PROMPT_IDS), len(PROMPT_IDS) + len(OUTPUT_IDS))


@pytest.fixture
def make_context(
    token_ids: torch.Tensor, target_positions: torch.Tensor
) -> Callable[[LoadedModel], AttributionContext]:
    """An AttributionContext over the fixed sequence, with fresh (full-precision) hidden states."""

    def make(loaded: LoadedModel) -> AttributionContext:
        recorded = forward_with_hidden_states(loaded, token_ids)
        return AttributionContext(
            loaded=loaded,
            token_ids=token_ids,
            prompt_length=len(PROMPT_IDS),
            targets=Targets(positions=target_positions, token_ids=token_ids[target_positions], foil_ids=None),
            hidden_states=recorded.hidden_states,
        )

    return make


@pytest.fixture(scope="session")
def read_tensor() -> Callable[[types_pb2.Tensor], np.ndarray]:
    """The numpy array a packed sightline.v1.Tensor holds."""

    def read(packed: types_pb2.Tensor) -> np.ndarray:
        element = {types_pb2.DTYPE_FLOAT32: np.float32, types_pb2.DTYPE_INT32: np.int32}[packed.dtype]
        values = packed.float_values if packed.dtype == types_pb2.DTYPE_FLOAT32 else packed.int_values
        return np.array(values, dtype=element).reshape(tuple(packed.shape))

    return read
