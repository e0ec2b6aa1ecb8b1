"""Step scores: how the model scored each explained token, next to its attributions; and, from the same readout,
the log-probabilities the fidelity check compares with the served ones."""

from __future__ import annotations

import torch
from sightline.v1 import types_pb2

from explainers.methods.base import tensor_proto
from explainers.model import READOUT_ROWS, LoadedModel, readout_log_probs


def read_out(
    loaded: LoadedModel, rows: torch.Tensor, token_ids: torch.Tensor, scored: torch.Tensor, top_k: int
) -> tuple[types_pb2.StepScores, torch.Tensor]:
    """(step scores of the rows where `scored` [num_rows] is true, every row's log-probability of its token) from
    last-layer states rows [num_rows, hidden] at the positions that predict token_ids [num_rows], READOUT_ROWS at a
    time. One readout serves the explained tokens' step scores and every generated token's fidelity check. Step
    scores are the log-probability, probability, entropy, rank and top-k alternatives of each explained token."""
    chosen, entropies, ranks, top_ids, top_logprobs = [], [], [], [], []
    with torch.no_grad():
        for start in range(0, len(rows), READOUT_ROWS):
            logprobs = readout_log_probs(loaded, rows[start : start + READOUT_ROWS])  # [rows, vocab]
            picked = logprobs.gather(-1, token_ids[start : start + READOUT_ROWS, None])[:, 0]
            chosen.append(picked)
            keep = scored[start : start + READOUT_ROWS]
            # Usually every generated token is explained: no copy then.
            scored_logprobs, scored_picked = (logprobs, picked) if bool(keep.all()) else (logprobs[keep], picked[keep])
            entropies.append(-torch.linalg.vecdot(scored_logprobs.exp(), scored_logprobs))
            ranks.append((scored_logprobs > scored_picked[:, None]).sum(-1) + 1)
            top = scored_logprobs.topk(top_k, dim=-1)
            top_ids.append(top.indices)
            top_logprobs.append(top.values)
    log_probs = torch.cat(chosen)
    scores = types_pb2.StepScores(
        logprobs=log_probs[scored].tolist(),
        probabilities=log_probs[scored].exp().tolist(),
        entropies=torch.cat(entropies).tolist(),
        ranks=torch.cat(ranks).tolist(),
        top_token_ids=tensor_proto(torch.cat(top_ids)),
        top_logprobs=tensor_proto(torch.cat(top_logprobs)),
    )
    return scores, log_probs
