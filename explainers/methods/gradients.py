"""What the gradient methods share: per-target gradients in batched backward passes, and the layer they read."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from sightline.v1 import types_pb2

from explainers.methods.base import (
    GRADIENT_COST,
    AttributionContext,
    AttributionMethod,
    InvalidParamsError,
    ParamSpec,
    prefix_only,
    tensor_proto,
)
from explainers.targets import target_scores

TARGET_BATCH_SIZE = ParamSpec(
    "target_batch_size",
    int,
    16,
    "Generated tokens whose gradients are computed together in one batched backward pass; "
    "trades memory for speed and never changes the result.",
    minimum=1,
    maximum=1024,
)

LAYER = ParamSpec(
    "layer",
    int,
    0,
    "The residual-stream state attributed, indexed like logit_lens: 0 is the embedding output and l the output "
    "of decoder layer l, up to the model's number of layers.",
    minimum=0,
)


def gradient_chunks(scores: torch.Tensor, inputs: torch.Tensor, target_batch_size: int) -> Iterator[torch.Tensor]:
    """d scores[i] / d inputs for every target i, in order, in chunks of at most target_batch_size targets: each
    chunk is [chunk, *inputs.shape].

    scores [num_targets] come from one graph over inputs. Each chunk costs one batched backward pass: a
    vector-Jacobian product per target, vmapped over one-hot selectors; the graph is kept until the last chunk.
    """
    num_targets = len(scores)
    for start in range(0, num_targets, target_batch_size):
        stop = min(start + target_batch_size, num_targets)
        # Row k of the one-hot selects target start + k.
        selector = torch.nn.functional.one_hot(torch.arange(start, stop), num_targets).to(scores.dtype)
        (gradients,) = torch.autograd.grad(
            scores, inputs, grad_outputs=selector, is_grads_batched=True, retain_graph=stop < num_targets
        )
        yield gradients


def cached_layer_states(ctx: AttributionContext, layer: int, method: str) -> torch.Tensor:
    """The cached residual stream at `layer` as [1, num_tokens, hidden]; the layer must exist in ctx's model."""
    if layer > ctx.loaded.num_layers:
        raise InvalidParamsError(
            f"parameter 'layer' of method {method!r} must be in 0..{ctx.loaded.num_layers} for this model, got {layer}"
        )
    return ctx.hidden_states[layer][None]


@dataclass(frozen=True)
class EmbeddingGradientParams:
    target_batch_size: int


class EmbeddingGradientMethod(AttributionMethod[EmbeddingGradientParams]):
    """A method that reduces d score_i / d embedding[j] over the hidden dimension, for every target i and source j.

    One forward pass, then one batched vector-Jacobian product per chunk of targets; causality already makes the
    gradient vanish at and after a target's own position, and prefix_only makes that exact.
    """

    params = (TARGET_BATCH_SIZE,)
    params_type = EmbeddingGradientParams
    needs_gradients = True
    uses_cache = False
    attributes_tokens = True
    cost = GRADIENT_COST
    supports_contrastive_targets = True

    @abstractmethod
    def reduce(self, gradients: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """Per-source scores [chunk, num_tokens] from gradients [chunk, num_tokens, hidden] and the embeddings
        [num_tokens, hidden]."""

    def attribute(self, ctx: AttributionContext, params: EmbeddingGradientParams) -> types_pb2.MethodResult:
        embeddings = ctx.loaded.embed(ctx.token_ids).requires_grad_(True)  # [1, num_tokens, hidden]
        with torch.enable_grad():
            scores = target_scores(ctx.loaded, embeddings, ctx.targets)[0]
        chunks = gradient_chunks(scores, embeddings, params.target_batch_size)  # each [chunk, 1, num_tokens, hidden]
        rows = [self.reduce(gradients[:, 0], embeddings.detach()[0]) for gradients in chunks]
        return types_pb2.MethodResult(
            method=self.name, attributions=tensor_proto(prefix_only(torch.cat(rows), ctx.targets))
        )
