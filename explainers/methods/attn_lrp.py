"""AttnLRP (Achtibat et al. 2024): layer-wise relevance propagation through attention, norms and gated MLPs, as
gradient x input under modified gradients, one backward pass per explained token.

The rules, each a change to the backward pass only (the forward values are the model's own):
- norms: the identity rule, the normaliser taken as a constant (the gradient of y = x * c(x) * w is c * w);
- the MLP's activation: the identity rule, act(g) passed on as act(g) / g times g;
- the MLP's gate x up product and attention's softmax(q k) v products: the uniform rule, relevance halved between
  the factors (the gradients at the queries and keys divided by 4, at the values and at gate x up by 2);
- linear maps and the softmax keep their gradients (the epsilon rule without epsilon, and AttnLRP's softmax rule).
The relevance of source j for a target is sum_h h0[j, h] * d logit / d h0[j, h] at the first layer's input h0. It
explains the target's logit (or logit difference from its foil): LRP conserves through linear maps, not through a
log-softmax. Conservation is exact but for the softmax's and the biases' share, reported as conservation_delta.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from sightline.v1 import types_pb2
from torch import nn

# The families the rules cover; kept in common/, where the gateway reads it to choose the default method.
from common.explain_spec import ATTN_LRP_FAMILIES as COVERED
from explainers import general_path
from explainers.methods.base import (
    GRADIENT_COST,
    AttributionContext,
    AttributionMethod,
    InvalidParamsError,
    prefix_only,
    tensor_proto,
)
from explainers.methods.gradients import TARGET_BATCH_SIZE, gradient_times_state
from explainers.model import LoadedModel, forward_from_layer
from explainers.targets import TargetScore

# The families whose layers the rules below cover: separate query, key and value projections, a gated MLP
# (gate_proj, up_proj, down_proj, act_fn) and RMSNorms. Why the others are refused, by family.
NOT_COVERED = {
    "gemma2": "its soft-capped attention scores (tanh) have no AttnLRP rule here",
    "phi3": "its fused qkv_proj and gate_up_proj projections are not split into the rules' factors",
    "gpt2": "its LayerNorms, ungated MLP and fused c_attn projection are not covered",
    "gpt_neox": "its LayerNorms, ungated MLP and fused query_key_value projection are not covered",
}


def divide_gradient(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """tensor itself, with the gradient through it divided by factor (the uniform rule)."""
    return tensor / factor + (tensor - tensor / factor).detach()


def identity_rule(function: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    """function(inputs), with the gradient of an elementwise-scaled copy: function(x) / x, held constant, times x.
    For a norm that is the normaliser (and weight) taken as a constant; for an activation, the identity rule."""
    outputs = function(inputs)
    ratio = torch.where(inputs != 0, outputs / inputs, torch.zeros_like(outputs))
    return inputs * ratio.detach()


def _gated_mlp(mlp: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    gate_proj, up_proj, down_proj = (mlp.get_submodule(name) for name in ("gate_proj", "up_proj", "down_proj"))
    activation: Callable[[torch.Tensor], torch.Tensor] = getattr(mlp, "act_fn")  # noqa: B009  # a module, untyped

    def forward(x: torch.Tensor) -> torch.Tensor:
        gate = identity_rule(activation, gate_proj(x))
        down: torch.Tensor = down_proj(divide_gradient(gate * up_proj(x), 2))
        return down

    return forward


def _norm(norm: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    original = type(norm).forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        return identity_rule(lambda inputs: original(norm, inputs), x)

    return forward


def _divide_output(factor: float) -> Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]:
    def hook(_: nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
        return divide_gradient(output, factor)

    return hook


@contextmanager
def _replaced_forward(module: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """The module's forward replaced on this instance only, for the block."""
    module.forward = forward
    try:
        yield
    finally:
        del module.forward


@contextmanager
def lrp_rules(loaded: LoadedModel) -> Iterator[None]:
    """While active, gradients through loaded's module follow the AttnLRP rules (the forward values do not change)."""
    model_type = loaded.architecture.model_type
    if model_type not in COVERED:
        reason = NOT_COVERED.get(model_type, "no rules are written for it")
        raise InvalidParamsError(f"method 'attn_lrp' does not support {model_type!r} models: {reason}")
    if loaded.final_logit_softcap is not None:
        raise InvalidParamsError("method 'attn_lrp' does not support a soft-capped final logit (tanh)")
    with ExitStack() as stack:
        for layer in loaded.decoder_layers:
            for name, factor in (("q_proj", 4), ("k_proj", 4), ("v_proj", 2)):
                projection = layer.get_submodule(f"self_attn.{name}")
                stack.callback(projection.register_forward_hook(_divide_output(factor)).remove)
            mlp = layer.get_submodule("mlp")
            stack.enter_context(_replaced_forward(mlp, _gated_mlp(mlp)))
        norms = [module for module in loaded.model.modules() if type(module).__name__.endswith("RMSNorm")]
        for norm in norms:
            stack.enter_context(_replaced_forward(norm, _norm(norm)))
        yield


@dataclass(frozen=True)
class AttnLrpParams:
    target_batch_size: int


class AttnLrp(AttributionMethod[AttnLrpParams]):
    """attribution[i, j] = the relevance of source j for target i's logit. Extras: conservation_delta
    [num_targets], sum_j relevance[i, j] - logit_i (what the softmax and the biases do not pass on)."""

    name = "attn_lrp"
    description = (
        "AttnLRP (Achtibat et al. 2024): layer-wise relevance propagation through attention, norms and gated MLPs, "
        "as gradient x input under AttnLRP's rules (identity rule on norms and activations, uniform rule on the "
        "attention and gating products), one backward pass per generated token. Explains the token's logit (its "
        "logit difference with a foil), whatever score the request asks for. Llama, Mistral, Qwen2, Qwen3 and Gemma "
        "3 families. Extras: conservation_delta [num_targets], relevance sum minus logit."
    )
    params = (TARGET_BATCH_SIZE,)
    params_type = AttnLrpParams
    needs_gradients = True
    uses_cache = False
    attributes_tokens = True
    cost = GRADIENT_COST
    supports_contrastive_targets = True

    def attribute(self, ctx: AttributionContext, params: AttnLrpParams) -> types_pb2.MethodResult:
        loaded = ctx.loaded
        targets = dataclasses.replace(ctx.targets, score=TargetScore.LOGIT)
        embeddings = loaded.embed(ctx.token_ids)  # [1, num_tokens, hidden]
        relevance = embeddings.new_zeros(len(targets), embeddings.shape[1])
        ones = torch.ones(1, dtype=embeddings.dtype)
        with lrp_rules(loaded):
            # The rules live on the module, so the general path's autograd runs them whichever path the model has.
            for chunk, gradients in general_path.score_gradients(
                loaded.model, loaded.decoder_layers, loaded.final_norm, embeddings, 0, targets,
                params.target_batch_size, ones,
            ):  # fmt: skip
                prefix = gradients.shape[2]
                relevance[chunk, :prefix] = gradient_times_state(gradients[:, 0], embeddings[0, :prefix])
        with torch.no_grad():
            logits = forward_from_layer(loaded, embeddings, 0, targets)[0]
        return types_pb2.MethodResult(
            method=self.name,
            attributions=tensor_proto(prefix_only(relevance, targets)),
            extras={"conservation_delta": tensor_proto(relevance.sum(dim=-1) - logits)},
        )
