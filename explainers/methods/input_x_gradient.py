"""Input x gradient: how much each preceding token's input embedding pushes each generated token's log-probability."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sightline.v1 import types_pb2

from explainers.methods.base import GRADIENT_COST, AttributionContext, AttributionMethod, prefix_only, tensor_proto
from explainers.methods.gradients import TARGET_BATCH_SIZE, gradient_chunks
from explainers.targets import target_scores


@dataclass(frozen=True)
class InputXGradientParams:
    target_batch_size: int


class InputXGradient(AttributionMethod[InputXGradientParams]):
    """attribution[i, j] = sum_h embedding[j, h] * d log p(target_i | prefix) / d embedding[j, h], signed.

    One forward pass gives every target's log-probability (causal attention keeps target i blind to tokens after
    it); each chunk of targets then costs one batched vector-Jacobian product over that same graph.
    """

    name = "input_x_gradient"
    description = (
        "Signed input x gradient: for each generated token, the gradient of its log-probability with respect to "
        "every preceding token's input embedding, times that embedding, summed over the hidden dimension."
    )
    params = (TARGET_BATCH_SIZE,)
    params_type = InputXGradientParams
    needs_gradients = True
    uses_cache = False
    attributes_tokens = True
    cost = GRADIENT_COST
    supports_contrastive_targets = True

    def attribute(self, ctx: AttributionContext, params: InputXGradientParams) -> types_pb2.MethodResult:
        embeddings = ctx.loaded.embed(ctx.token_ids).requires_grad_(True)  # [1, num_tokens, hidden]
        with torch.enable_grad():
            scores = target_scores(ctx.loaded, embeddings, ctx.targets)[0]
        chunks = gradient_chunks(scores, embeddings, params.target_batch_size)  # each [chunk, 1, num_tokens, hidden]
        rows = [(gradients * embeddings.detach()).sum(dim=-1)[:, 0] for gradients in chunks]
        # Causality already makes the gradient vanish at and after a target's own position; prefix_only makes it exact.
        return types_pb2.MethodResult(
            method=self.name, attributions=tensor_proto(prefix_only(torch.cat(rows), ctx.targets))
        )
