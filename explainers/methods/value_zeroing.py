"""Value zeroing (Mohebbi et al. 2023): how much a decoder layer's output at one position changes when another
position's value vector is zeroed in that layer's attention, every head at once.

For layer l and positions i >= j, with x_i the layer's output at i and x_i^(-j) the same output with v_j = 0:

    C_l[i, j] = 1 - cos(x_i, x_i^(-j)),   rows normalised to sum to 1

Each layer runs on its own input from the cached residual stream (explainers.general_path.layer_outputs), so a
zeroed value reaches its own layer's output and nothing above it, and one batched pass of the model gives every
layer's scores for a chunk of zeroed positions. Per generated token the attribution is the row of the position
that predicts it, of the rollout C_L ... C_1 (as the paper combines layers, without an added identity: zeroing a
value already leaves the residual path in place) or of one layer's C_l.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from sightline.v1 import types_pb2
from torch import nn

from explainers import general_path
from explainers.methods.attention_rollout import rollout
from explainers.methods.base import (
    AttributionContext,
    AttributionMethod,
    CostModel,
    InvalidParamsError,
    ParamSpec,
    prefix_only,
    tensor_proto,
)
from explainers.model import LoadedModel

# Rows (zeroed positions x positions) of one batched pass: its MLP activations are the largest transient, 6 KiB a
# row for SmolLM2, so about 100 MiB.
MAX_PASS_ROWS = 16384


@dataclass(frozen=True)
class ValueProjection:
    """Where a family's attention computes its value vectors: the linear map (relative to a decoder layer) and which
    of its output features are values, for projections fused with the queries and keys."""

    module: str
    values: Callable[[Any, int], torch.Tensor]  # (config, output width) -> bool [output width]


def _all(_config: Any, width: int) -> torch.Tensor:
    return torch.ones(width, dtype=torch.bool)


def _last(count: Callable[[Any], int]) -> Callable[[Any, int], torch.Tensor]:
    """The last count(config) features: values after the queries and keys, as Phi-3 and GPT-2 concatenate them."""

    def values(config: Any, width: int) -> torch.Tensor:
        mask = torch.zeros(width, dtype=torch.bool)
        mask[width - count(config) :] = True
        return mask

    return values


def _per_head_thirds(config: Any, width: int) -> torch.Tensor:
    """GPT-NeoX's query_key_value: [heads, 3 * head_dim], each head's query, key, value in turn."""
    heads = int(config.num_attention_heads)
    mask = torch.zeros(heads, 3, width // (3 * heads), dtype=torch.bool)
    mask[:, 2] = True
    flat: torch.Tensor = mask.flatten()
    return flat


def _kv_width(config: Any) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(config.num_key_value_heads) * int(head_dim)


_SEPARATE = ValueProjection("self_attn.v_proj", _all)
VALUE_PROJECTIONS: dict[str, ValueProjection] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"), _SEPARATE),
    "phi3": ValueProjection("self_attn.qkv_proj", _last(_kv_width)),
    "gpt2": ValueProjection("attn.c_attn", _last(lambda config: int(config.hidden_size))),
    "gpt_neox": ValueProjection("attention.query_key_value", _per_head_thirds),
}


@contextmanager
def _zeroing_values(loaded: LoadedModel, zeroed: torch.Tensor) -> Iterator[None]:
    """While active, batch row b of a forward pass has the value vector at position zeroed[b] set to 0 in every
    decoder layer (every head); a row whose position is -1 is left as it is."""
    model_type = loaded.architecture.model_type
    projection = VALUE_PROJECTIONS.get(model_type)
    if projection is None:
        raise InvalidParamsError(
            f"method 'value_zeroing' does not know where a {model_type!r} model computes its value vectors; it "
            f"supports {', '.join(sorted(VALUE_PROJECTIONS))}"
        )
    rows = torch.nonzero(zeroed >= 0)[:, 0]

    def zero(_: nn.Module, _args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        keep = torch.ones_like(output)
        keep[rows, zeroed[rows]] = (~projection.values(loaded.model.config, output.shape[-1])).to(output.dtype)
        return output * keep

    handles = [layer.get_submodule(projection.module).register_forward_hook(zero) for layer in loaded.decoder_layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def value_zeroing_scores(loaded: LoadedModel, hidden_states: torch.Tensor) -> torch.Tensor:
    """C [num_layers, num_tokens, num_tokens] from the residual stream [num_layers + 1, num_tokens, hidden]: C[l - 1,
    i, j] for decoder layer l, rows normalised (0 after a row's own position). The last position, which no other
    position reads, is zeroed too, so that every row sums over the same positions the model attends to."""
    layer_inputs = hidden_states[:-1]
    num_tokens = layer_inputs.shape[1]
    with _zeroing_values(loaded, torch.tensor([-1])):
        clean = general_path.layer_outputs(loaded.model, loaded.decoder_layers, layer_inputs, 1)  # [L, 1, T, H]
    distances = clean.new_zeros(len(layer_inputs), num_tokens, num_tokens)  # [L, i, j]
    per_pass = max(1, MAX_PASS_ROWS // num_tokens)
    for start in range(0, num_tokens, per_pass):
        zeroed = torch.arange(start, min(start + per_pass, num_tokens))
        with _zeroing_values(loaded, zeroed):
            altered = general_path.layer_outputs(loaded.model, loaded.decoder_layers, layer_inputs, len(zeroed))
        # [L, zeroed j, i] -> [L, i, zeroed j]
        cosine = torch.nn.functional.cosine_similarity(altered, clean, dim=-1)
        distances[:, :, zeroed] = (1 - cosine).transpose(1, 2)
    # Causality makes the scores of later positions 0 up to rounding; zero them exactly.
    causal = torch.ones(num_tokens, num_tokens, dtype=torch.bool).tril()
    distances = torch.where(causal, distances.clamp_min(0), 0.0)
    return distances / distances.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(distances.dtype).tiny)


@dataclass(frozen=True)
class ValueZeroingParams:
    aggregation: str
    layer: int


class ValueZeroing(AttributionMethod[ValueZeroingParams]):
    """attribution[i, j] = row target_i - 1 of value zeroing's rollout (or one layer's scores): how much the state
    that predicts target i depends on what position j contributes through attention, measured by the change in the
    layer's output when j's value vector is zeroed. Extras: layer_scores [num_layers, num_targets, num_tokens - 1],
    every layer's normalised scores of the same rows."""

    name = "value_zeroing"
    description = (
        "Value zeroing (Mohebbi et al. 2023): per decoder layer, the cosine distance between a position's output and "
        "the same output with a source position's value vector zeroed in every head, rows normalised; combined over "
        "the layers by rollout (default) or read at one layer. Recomputed from the cached hidden states, one "
        "batched forward pass per chunk of source positions, no gradients. Extras: layer_scores [num_layers, "
        "num_targets, num_tokens - 1]."
    )
    params = (
        ParamSpec(
            "aggregation",
            str,
            "rollout",
            "'rollout' multiplies every layer's scores, last layer first, as the paper does; 'layer' returns the "
            "scores of decoder layer `layer` alone.",
            choices=("rollout", "layer"),
        ),
        ParamSpec(
            "layer",
            int,
            0,
            "With aggregation 'layer': the decoder layer, 1 to the model's number of layers; 0 is the last.",
            minimum=0,
            maximum_from="num_layers",
        ),
    )
    params_type = ValueZeroingParams
    needs_gradients = False
    uses_cache = True
    attributes_tokens = True
    cost = CostModel(passes=1, per_token=1)

    def attribute(self, ctx: AttributionContext, params: ValueZeroingParams) -> types_pb2.MethodResult:
        if params.layer > ctx.loaded.num_layers:
            raise InvalidParamsError(
                f"parameter 'layer' of method {self.name!r} must be in 0..{ctx.loaded.num_layers} for this model, "
                f"got {params.layer}"
            )
        scores = value_zeroing_scores(ctx.loaded, ctx.hidden_states)  # [L, T, T]
        predicting = ctx.targets.predicting_positions
        if params.aggregation == "rollout":
            last_layer_first = (layer_scores[None] for layer_scores in scores.flip(0))
            rows = rollout(last_layer_first, predicting, head_fusion="mean", residual=False)
        else:
            rows = scores[(params.layer or ctx.loaded.num_layers) - 1, predicting]
        per_layer = torch.stack([prefix_only(layer_scores[predicting], ctx.targets) for layer_scores in scores])
        return types_pb2.MethodResult(
            method=self.name,
            attributions=tensor_proto(prefix_only(rows, ctx.targets)),
            extras={"layer_scores": tensor_proto(per_layer)},
        )
