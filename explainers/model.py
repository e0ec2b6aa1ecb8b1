"""The explainer's PyTorch replica of the served weights, and the forward passes every method shares.

Each pass runs on one of two paths (explainers.architectures.ExplainPath): the fast path's hand-written layers
(explainers.backprop, one decoder-layer skeleton with each family's differences as options) or the general path's
Hugging Face module (explainers.general_path, any supported architecture). Both give the same residual stream:
hidden_states[0] is the first decoder layer's input (the embedding output, scaled or position-summed as the
architecture does it) and hidden_states[l] decoder layer l's output, all before the final norm.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from explainers import general_path
from explainers.architectures import IMAGE_TEXT_ARCHITECTURES, Architecture, ExplainPath, architecture_of
from explainers.backprop import RecordedLayers, run_layers
from explainers.decoder_layer import LayerWeights
from explainers.embedded_model import MANIFEST_FILE
from explainers.embedded_model import weights_digest as safetensors_digest
from explainers.targets import Targets, log_probs
from explainers.vlm import LoadedVlm, load_vlm

# Both "eager" and "sdpa" give exact batched vector-Jacobian products (`is_grads_batched`, no double backward;
# checked against a per-target loop) at about the same CPU speed. SDPA is chosen because eager keeps every layer's
# [heads, seq, seq] attention probabilities for the backward pass (plus their batched gradient), which rules out
# long sequences, and because eager rounds a float64 softmax through float32.
ATTN_IMPLEMENTATION = "sdpa"

# Rows read out to the vocabulary at once: 256 x the vocabulary (49,152 for SmolLM2) is 48 MiB a tensor.
READOUT_ROWS = 256

ModuleT = TypeVar("ModuleT", bound=nn.Module)


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM in eval mode with frozen weights, plus what identifies those weights."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    weights_digest: str
    model_name: str
    num_layers: int
    # The general path even where the fast path covers the architecture (to check one against the other).
    force_general_path: bool = False

    @functools.cached_property
    def architecture(self) -> Architecture:
        return architecture_of(self.model.config)

    @functools.cached_property
    def path(self) -> ExplainPath:
        """The path every pass over this model takes."""
        if self.force_general_path:
            return ExplainPath.GENERAL
        return self.architecture.path_for(self.model.config)

    @property
    def vocab_size(self) -> int:
        return int(self.input_embeddings.num_embeddings)

    @property
    def hidden_size(self) -> int:
        return int(self.input_embeddings.embedding_dim)

    @property
    def max_positions(self) -> int:
        return int(self.model.config.max_position_embeddings)

    @property
    def dtype(self) -> torch.dtype:
        return self.input_embeddings.weight.dtype

    @property
    def input_embeddings(self) -> nn.Embedding:
        embeddings = self.model.get_input_embeddings()
        if not isinstance(embeddings, nn.Embedding):
            raise TypeError(f"expected nn.Embedding input embeddings, got {type(embeddings).__name__}")
        return embeddings

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return _submodule(self.model, self.architecture.decoder_layers, nn.ModuleList)

    @functools.cached_property
    def layer_weights(self) -> list[LayerWeights]:
        """Each decoder layer's parameters, typed (the frozen weights themselves, not copies); built once, as the
        forward passes and the attention recompute read them on every call. Each with its layer's options (window,
        soft-cap, activation, norms), as the architecture reads them from the config."""
        config = self.model.config
        return [
            LayerWeights.of(decoder_layer, self.architecture.layer_options(config, index))
            for index, decoder_layer in enumerate(self.decoder_layers)
        ]

    @property
    def final_norm(self) -> nn.Module:
        return _submodule(self.model, self.architecture.final_norm, nn.Module)

    @property
    def unembedding(self) -> nn.Linear:
        unembedding = self.model.get_output_embeddings()  # type: ignore[no-untyped-call]
        if not isinstance(unembedding, nn.Linear):
            raise TypeError(f"expected an nn.Linear unembedding, got {type(unembedding).__name__}")
        return unembedding

    @property
    def final_logit_softcap(self) -> float | None:
        """Gemma's cap on the logits, tanh(logits / cap) * cap, applied after the unembedding (None: uncapped)."""
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return float(cap) if cap else None

    @property
    def rotary_embedding(self) -> nn.Module:
        return _submodule(self.model, "model.rotary_emb", nn.Module)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The residual stream at layer 0 [1, num_tokens, hidden] of token ids [num_tokens]: the first decoder
        layer's input, which is the input embeddings themselves for Llama, scaled by sqrt(hidden) for Gemma and
        summed with the position embeddings for GPT-2."""
        if self.path is ExplainPath.GENERAL:
            return general_path.decoder_input(self.model, self.decoder_layers, token_ids)
        with torch.no_grad():
            embeddings: torch.Tensor = self.input_embeddings(token_ids[None])
        return embeddings


def _submodule(model: PreTrainedModel, path: str, kind: type[ModuleT]) -> ModuleT:
    # The layout the architecture registry names, e.g. Llama's model.layers (decoder blocks) and model.norm.
    submodule = model.get_submodule(path)
    if not isinstance(submodule, kind):
        raise TypeError(f"{type(model).__name__}.{path} is a {type(submodule).__name__}, not a {kind.__name__}")
    return submodule


def attention_implementation(config: object) -> str:
    """ATTN_IMPLEMENTATION, but eager for a model that soft-caps its attention scores (Gemma 2), which SDPA would
    silently skip."""
    return general_path.EAGER if getattr(config, "attn_logit_softcapping", None) else ATTN_IMPLEMENTATION


def load_model(model_dir: Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a local Hugging Face causal LM directory (safetensors + tokenizer) for attribution.

    The architecture is checked first (UnsupportedArchitectureError names it and lists the supported ones), so an
    unsupported model fails before its weights are read. Every parameter is frozen, so gradients only ever flow to
    the states a method asks about.
    """
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    architecture_of(config)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation=attention_implementation(config), local_files_only=True
    )
    model.train(False)
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    weights_digest, model_name = _identity(model_dir)
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        weights_digest=weights_digest,
        model_name=model_name,
        num_layers=int(model.config.num_hidden_layers),
    )
    # Fail at load time, not on the first job, when the architecture lacks what the methods read.
    _ = loaded.decoder_layers, loaded.final_norm, loaded.unembedding, loaded.input_embeddings
    if loaded.path is ExplainPath.FAST:
        _ = loaded.layer_weights, loaded.rotary_embedding
    return loaded


def load_explained_model(model_dir: Path) -> LoadedModel | LoadedVlm:
    """The model in model_dir as the explainer holds it: an image-text model (IMAGE_TEXT_ARCHITECTURES) with its
    processor, for the image methods, or else a causal LM (load_model)."""
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    if getattr(config, "model_type", None) in IMAGE_TEXT_ARCHITECTURES:
        return load_vlm(model_dir, *_identity(model_dir))
    return load_model(model_dir)


def _identity(model_dir: Path) -> tuple[str, str]:
    """(weights digest, model name): from sightline_manifest.json when present, else hashed from the weights."""
    manifest_path = model_dir / MANIFEST_FILE
    manifest: dict[str, Any] = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    digest = manifest.get("weights_digest")
    if not isinstance(digest, str) or not digest:
        # The same digest the model dir's builder writes, so jobs and cache keys agree on it either way.
        digest = safetensors_digest(model_dir)
    name = manifest.get("model_name")
    if not isinstance(name, str) or not name:
        name = model_dir.resolve().name
    return digest, name


def residual_from_layer(loaded: LoadedModel, hidden: torch.Tensor, layer: int) -> torch.Tensor:
    """The last decoder layer's output [batch, num_tokens, hidden] (before the final norm) from residual-stream
    states hidden [batch, num_tokens, hidden] at ``layer`` (indexed like hidden_states: 0 is the embedding output,
    l the output of decoder layer l), without gradients. Runs decoder layers layer + 1..L only on the fast path (its
    hand-written layers); the general path runs the module whole, the states standing in for layer's output.
    """
    with torch.no_grad():
        if loaded.path is ExplainPath.GENERAL:
            return general_path.final_residual(loaded.model, loaded.decoder_layers, loaded.final_norm, hidden, layer)
        return run_layers(loaded, hidden, layer, record=False)[0][-1]


def readout_logits(loaded: LoadedModel, residual: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits [..., vocab] from last-layer residual states [..., hidden]: final norm, then unembedding.
    The final norm is per position, so reading out only some positions changes nothing."""
    return logits_from_normed(loaded, loaded.final_norm(residual))


def logits_from_normed(loaded: LoadedModel, normed: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits [..., vocab] from the final norm's output [..., hidden]: the unembedding, then the
    architecture's logit soft-cap if it has one."""
    logits: torch.Tensor = loaded.unembedding(normed)
    cap = loaded.final_logit_softcap
    return logits if cap is None else torch.tanh(logits / cap) * cap


def forward_from_layer(loaded: LoadedModel, hidden: torch.Tensor, layer: int, targets: Targets) -> torch.Tensor:
    """``targets.score`` [batch, num_targets] from residual-stream states hidden [batch, num_tokens, hidden] at
    ``layer``, without gradients: decoder layers layer + 1..L, then the readout at the predicting positions only."""
    residual = residual_from_layer(loaded, hidden, layer)
    with torch.no_grad():
        return targets.score_logits(readout_logits(loaded, residual[:, targets.predicting_positions]))


def readout_log_probs(loaded: LoadedModel, residual: torch.Tensor) -> torch.Tensor:
    """Vocabulary log-probs [..., vocab] from residual-stream states [..., hidden]: final norm, then unembedding."""
    return log_probs(readout_logits(loaded, residual))


@dataclass(frozen=True)
class RecordedForward:
    hidden_states: torch.Tensor  # [num_layers + 1, num_tokens, hidden], model dtype
    # What the backward pass to the input embeddings reads (explainers.backprop), when asked for.
    recorded: RecordedLayers | None


def forward_with_hidden_states(loaded: LoadedModel, token_ids: torch.Tensor, record: bool = False) -> RecordedForward:
    """One no-grad forward pass over token_ids [num_tokens] that keeps the residual stream after the embedding and
    after every layer, and with `record` the activations the input-embedding gradients' backward pass reads.

    hidden_states[0] is the embedding output and hidden_states[l] the output of decoder layer l, all BEFORE the
    final norm (transformers' `output_hidden_states` ends with the state after it). The layers run as the gradient
    methods' own recording pass runs them (explainers.backprop), so that a recording made here serves them. The
    general path records nothing: its gradients come from autograd over a pass of their own.
    """
    if loaded.path is ExplainPath.GENERAL:
        states = general_path.hidden_states(loaded.model, loaded.decoder_layers, token_ids)
        return RecordedForward(hidden_states=states, recorded=None)
    residual_stream, recorded = run_layers(loaded, loaded.embed(token_ids), 0, record)
    return RecordedForward(hidden_states=torch.cat(residual_stream), recorded=recorded)
