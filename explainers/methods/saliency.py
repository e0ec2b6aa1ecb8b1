"""Saliency: how strongly each preceding token's input embedding can move each generated token's score."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sightline.v1 import types_pb2

from explainers.methods.base import GRADIENT_COST, AttributionContext, AttributionMethod, prefix_only, tensor_proto
from explainers.methods.gradients import TARGET_BATCH_SIZE, gradient_chunks
from explainers.targets import target_scores


@dataclass(frozen=True)
class SaliencyParams:
    target_batch_size: int


class Saliency(AttributionMethod[SaliencyParams]):
    """attribution[i, j] = || d score_i / d embedding[j] ||_2 over the hidden dimension, unsigned.

    Same passes as input x gradient: one forward pass, then one batched vector-Jacobian product per chunk of targets.
    """

    name = "saliency"
    description = (
        "Unsigned gradient saliency: for each generated token, the L2 norm over the hidden dimension of the gradient "
        "of its score with respect to every preceding token's input embedding."
    )
    params = (TARGET_BATCH_SIZE,)
    params_type = SaliencyParams
    needs_gradients = True
    uses_cache = False
    attributes_tokens = True
    cost = GRADIENT_COST
    supports_contrastive_targets = True

    def attribute(self, ctx: AttributionContext, params: SaliencyParams) -> types_pb2.MethodResult:
        embeddings = ctx.loaded.embed(ctx.token_ids).requires_grad_(True)  # [1, num_tokens, hidden]
        with torch.enable_grad():
            scores = target_scores(ctx.loaded, embeddings, ctx.targets)[0]
        chunks = gradient_chunks(scores, embeddings, params.target_batch_size)  # each [chunk, 1, num_tokens, hidden]
        rows = [torch.linalg.vector_norm(gradients, dim=-1)[:, 0] for gradients in chunks]
        return types_pb2.MethodResult(
            method=self.name, attributions=tensor_proto(prefix_only(torch.cat(rows), ctx.targets))
        )
