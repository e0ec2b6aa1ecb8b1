"""Step scores: how the model scored each explained token, next to its attributions; and, from the same readout,
the log-probabilities the fidelity check compares with the served ones."""

from __future__ import annotations

import torch
from sightline.v1 import types_pb2

from explainers.methods.base import tensor_proto
from explainers.model import READOUT_ROWS, LoadedModel, readout_log_probs


def read_out(
    loaded: LoadedModel, rows: torch.Tensor, token_ids: torch.Tensor, num_scored: int, top_k: int
) -> tuple[types_pb2.StepScores, torch.Tensor]:
    """(step scores of the first num_scored rows, every row's log-probability of its token) from last-layer states
    rows [num_rows, hidden] at the positions that predict token_ids [num_rows].

    One readout serves both, so the unembedding's weights are read once: a cache miss reads out the explained
    tokens' step scores from the cached (bfloat16) states every method sees, so that a hit reports the same, and the
    fidelity log-probabilities from the full-precision states, in one pass. Step scores are the log-probability,
    probability, entropy, rank and top-k alternatives of each explained token.
    """
    chosen, entropies, ranks, top_ids, top_logprobs = [], [], [], [], []
    with torch.no_grad():
        for start in range(0, len(rows), READOUT_ROWS):
            logprobs = readout_log_probs(loaded, rows[start : start + READOUT_ROWS])  # [rows, vocab]
            picked = logprobs.gather(-1, token_ids[start : start + READOUT_ROWS, None])[:, 0]
            chosen.append(picked)
            scored = logprobs[: max(0, num_scored - start)]
            entropies.append(-(scored.exp() * scored).sum(-1))
            ranks.append((scored > picked[: len(scored), None]).sum(-1) + 1)
            top = scored.topk(top_k, dim=-1)
            top_ids.append(top.indices)
            top_logprobs.append(top.values)
    log_probs = torch.cat(chosen)
    scores = types_pb2.StepScores(
        logprobs=log_probs[:num_scored].tolist(),
        probabilities=log_probs[:num_scored].exp().tolist(),
        entropies=torch.cat(entropies).tolist(),
        ranks=torch.cat(ranks).tolist(),
        top_token_ids=tensor_proto(torch.cat(top_ids)),
        top_logprobs=tensor_proto(torch.cat(top_logprobs)),
    )
    return scores, log_probs
