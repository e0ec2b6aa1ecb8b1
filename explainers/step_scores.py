"""Step scores: how the model scored each explained token, next to its attributions; and, from the same readout,
the log-probabilities the fidelity check compares with the served ones."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
from sightline.v1 import types_pb2

from explainers.hidden_cache import DerivedEntry
from explainers.methods.base import tensor_proto
from explainers.model import READOUT_ROWS, LoadedModel, readout_log_probs


@dataclass(frozen=True)
class Readout(DerivedEntry):
    """The last layer read out at every generated token: its log-probability (also the fidelity check's), the
    entropy of its next-token distribution, its rank and the top-k alternatives. A request's step scores are a
    selection of it, so the hidden-state cache keeps it beside the states for a hit on the same split."""

    logprobs: torch.Tensor  # [generated]
    entropies: torch.Tensor  # [generated]
    ranks: torch.Tensor  # [generated], 1 for the most likely token
    top_ids: torch.Tensor  # [generated, k]
    top_logprobs: torch.Tensor  # [generated, k]

    @property
    def top_k(self) -> int:
        return int(self.top_ids.shape[1])

    def step_scores(self, scored: torch.Tensor, top_k: int) -> types_pb2.StepScores:
        """The step scores of the generated tokens where scored [generated] is true, with top_k <= self.top_k
        alternatives (the first of the top self.top_k: they differ from a top_k readout's only in the order of
        exactly tied alternatives)."""
        if top_k > self.top_k:
            raise ValueError(f"this readout keeps {self.top_k} alternatives, not {top_k}")
        logprobs = self.logprobs[scored]
        return types_pb2.StepScores(
            logprobs=logprobs.tolist(),
            probabilities=logprobs.exp().tolist(),
            entropies=self.entropies[scored].tolist(),
            ranks=self.ranks[scored].tolist(),
            top_token_ids=tensor_proto(self.top_ids[scored, :top_k]),
            top_logprobs=tensor_proto(self.top_logprobs[scored, :top_k]),
        )

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], generated: int) -> Readout | None:
        """The readout `tensors()` gave, if these are its fields with the shapes of `generated` tokens; else None."""
        readout = cls.with_fields(tensors)
        if readout is None:
            return None
        vectors = (readout.logprobs, readout.entropies, readout.ranks)
        tops = (readout.top_ids, readout.top_logprobs)
        if any(v.shape != (generated,) for v in vectors) or any(t.dim() != 2 or len(t) != generated for t in tops):
            return None
        if readout.top_ids.shape != readout.top_logprobs.shape:
            return None
        return readout


def read_out(loaded: LoadedModel, rows: torch.Tensor, token_ids: torch.Tensor, top_k: int) -> Readout:
    """The Readout of last-layer states rows [generated, hidden] at the positions that predict token_ids
    [generated], READOUT_ROWS at a time."""
    parts: list[list[torch.Tensor]] = [[] for _ in fields(Readout)]
    with torch.no_grad():
        for start in range(0, len(rows), READOUT_ROWS):
            logprobs = readout_log_probs(loaded, rows[start : start + READOUT_ROWS])  # [rows, vocab]
            picked = logprobs.gather(-1, token_ids[start : start + READOUT_ROWS, None])[:, 0]
            top = logprobs.topk(top_k, dim=-1)
            entropies = -torch.linalg.vecdot(logprobs.exp(), logprobs)
            ranks = (logprobs > picked[:, None]).sum(-1) + 1
            for part, values in zip(parts, (picked, entropies, ranks, top.indices, top.values), strict=True):
                part.append(values)
    return Readout(*(torch.cat(part) for part in parts))
