"""Input x gradient: how much each preceding token's input embedding pushes each generated token's log-probability."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sightline.v1 import types_pb2

from explainers.methods.base import AttributionContext, AttributionMethod, ParamSpec, prefix_only, tensor_proto
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
    params = (
        ParamSpec(
            "target_batch_size",
            int,
            16,
            "Generated tokens whose gradients are computed together in one batched backward pass; "
            "trades memory for speed and never changes the result.",
            minimum=1,
            maximum=1024,
        ),
    )
    params_type = InputXGradientParams
    needs_gradients = True
    uses_cache = False
    attributes_tokens = True
    supports_contrastive_targets = True

    def attribute(self, ctx: AttributionContext, params: InputXGradientParams) -> types_pb2.MethodResult:
        embeddings = ctx.loaded.embed(ctx.token_ids).requires_grad_(True)  # [1, num_tokens, hidden]
        with torch.enable_grad():
            scores = target_scores(ctx.loaded, embeddings, ctx.targets)[0]
        num_targets = len(ctx.targets)

        rows = []
        for start in range(0, num_targets, params.target_batch_size):
            stop = min(start + params.target_batch_size, num_targets)
            # Row k of the one-hot selects target start + k: one vector-Jacobian product per row, vmapped.
            selector = torch.nn.functional.one_hot(torch.arange(start, stop), num_targets).to(scores.dtype)
            (gradients,) = torch.autograd.grad(
                scores,
                embeddings,
                grad_outputs=selector,
                is_grads_batched=True,
                retain_graph=stop < num_targets,
            )  # [chunk, 1, num_tokens, hidden]
            rows.append((gradients * embeddings.detach()).sum(dim=-1)[:, 0])
        # Causality already makes the gradient vanish at and after a target's own position; prefix_only makes it exact.
        return types_pb2.MethodResult(
            method=self.name, attributions=tensor_proto(prefix_only(torch.cat(rows), ctx.targets))
        )
