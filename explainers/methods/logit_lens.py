"""Logit lens: what each layer's residual stream would predict if it were the last layer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from sightline.v1 import types_pb2

from explainers.hidden_cache import DerivedEntry
from explainers.methods.base import AttributionContext, AttributionMethod, CostModel, ParamSpec, tensor_proto
from explainers.model import READOUT_ROWS, readout_log_probs

# The hidden-state cache's derived entry that keeps a lens (explainers.hidden_cache.DerivedTensors).
KEPT_AS = "logit_lens"


@dataclass(frozen=True)
class LogitLensParams:
    k: int


@dataclass(frozen=True)
class LayerReadout(DerivedEntry):
    """Every layer read out at the positions predicting some tokens of one sequence: each token's log-probability
    and the k most likely tokens. A pure function of the sequence's cached states, so the cache keeps it for the
    next request that asks for some of those tokens with at most k alternatives."""

    positions: torch.Tensor  # int64 [n], ascending: the read-out tokens' own positions
    target_logprobs: torch.Tensor  # [layers, n]
    top_ids: torch.Tensor  # int64 [layers, n, k]
    top_logprobs: torch.Tensor  # [layers, n, k]

    def select(self, positions: torch.Tensor, k: int) -> LayerReadout | None:
        """The readout of the tokens at positions (ascending) with k alternatives, if this one holds them: the first
        k of its top k, which differ from a top-k readout's only in the order of exactly tied alternatives."""
        if k > self.top_ids.shape[-1] or len(self.positions) == 0:
            return None
        index = torch.searchsorted(self.positions, positions).clamp(max=len(self.positions) - 1)
        if not torch.equal(self.positions[index], positions):
            return None
        return LayerReadout(
            positions, self.target_logprobs[:, index], self.top_ids[:, index, :k], self.top_logprobs[:, index, :k]
        )

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], layers: int) -> LayerReadout | None:
        """The readout `tensors()` gave, if these are its fields with consistent shapes for `layers` layers."""
        lens = cls.with_fields(tensors)
        if lens is None or lens.positions.dim() != 1 or lens.top_ids.dim() != 3:
            return None
        n, k = len(lens.positions), lens.top_ids.shape[2]
        if lens.target_logprobs.shape != (layers, n) or lens.top_ids.shape != (layers, n, k) or k < 1:
            return None
        if lens.positions.dtype != torch.int64 or lens.top_ids.dtype != torch.int64:
            return None
        if not lens.target_logprobs.is_floating_point() or lens.top_logprobs.dtype != lens.target_logprobs.dtype:
            return None
        if lens.top_logprobs.shape != lens.top_ids.shape or not bool((lens.positions.diff() > 0).all()):
            return None
        return lens


class LogitLens(AttributionMethod[LogitLensParams]):
    """Reads every layer's hidden state at the position predicting each target through the final norm and the
    unembedding, from the cached hidden states alone (no forward pass). Layer 0 is the embedding output; layer L
    reproduces the model's own prediction. The cache keeps what was read out (LayerReadout): a request for some of
    the same tokens with at most as many alternatives reads nothing out again.
    """

    name = "logit_lens"
    description = (
        "Logit lens: each layer's hidden state at the position that predicts a generated token, read out through "
        "the final norm and the unembedding. Extras: top_token_ids and top_logprobs [num_layers + 1, num_targets, "
        "k], target_logprobs [num_layers + 1, num_targets] (the generated token's log-probability per layer)."
    )
    params = (ParamSpec("k", int, 5, "Most likely tokens reported per layer and generated token.", 1, 50),)
    params_type = LogitLensParams
    needs_gradients = False
    uses_cache = True
    attributes_tokens = False
    cost = CostModel(per_target=0.1)

    def attribute(self, ctx: AttributionContext, params: LogitLensParams) -> types_pb2.MethodResult:
        layers = ctx.loaded.num_layers + 1
        kept = None if ctx.derived is None else ctx.derived.get(KEPT_AS)
        stored = None if kept is None else LayerReadout.from_tensors(kept, layers)
        lens = None if stored is None else stored.select(ctx.targets.positions, params.k)
        if lens is None:
            lens = _read_out_layers(ctx, params.k)
            if ctx.derived is not None:
                ctx.derived.put(KEPT_AS, lens.tensors())
        extras = {
            "top_token_ids": tensor_proto(lens.top_ids),
            "top_logprobs": tensor_proto(lens.top_logprobs),
            "target_logprobs": tensor_proto(lens.target_logprobs),
        }
        return types_pb2.MethodResult(method=self.name, extras=extras)


def _read_out_layers(ctx: AttributionContext, k: int) -> LayerReadout:
    """The LayerReadout of ctx's targets, from its hidden states."""
    predicting = ctx.hidden_states[:, ctx.targets.predicting_positions]  # [num_layers + 1, num_targets, hidden]
    layers, num_targets = predicting.shape[:2]
    rows = predicting.flatten(0, 1)  # layer by layer
    targets = ctx.token_ids[ctx.targets.positions].repeat(layers)[:, None]  # [rows, 1]
    top_ids, top_logprobs, target_logprobs = [], [], []
    with torch.no_grad():
        # READOUT_ROWS rows at a time, across layers: the unembedding's product runs about twice as fast on 256 rows
        # as on a layer's few, and the peak stays at [READOUT_ROWS, vocab] log-probs.
        for start in range(0, len(rows), READOUT_ROWS):
            logprobs = readout_log_probs(ctx.loaded, rows[start : start + READOUT_ROWS])
            top = logprobs.topk(k, dim=-1)
            top_ids.append(top.indices)
            top_logprobs.append(top.values)
            target_logprobs.append(logprobs.gather(-1, targets[start : start + READOUT_ROWS])[:, 0])
    return LayerReadout(
        positions=ctx.targets.positions,
        target_logprobs=torch.cat(target_logprobs).view(layers, num_targets),
        top_ids=torch.cat(top_ids).view(layers, num_targets, -1),
        top_logprobs=torch.cat(top_logprobs).view(layers, num_targets, -1),
    )
