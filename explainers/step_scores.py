"""Step scores: how the model scored each explained token, next to its attributions."""

from __future__ import annotations

import torch
from sightline.v1 import types_pb2

from explainers.methods.base import tensor_proto
from explainers.model import LoadedModel, readout_log_probs
from explainers.targets import Targets


def step_scores(loaded: LoadedModel, hidden_states: torch.Tensor, targets: Targets, top_k: int) -> types_pb2.StepScores:
    """Log-probability, probability, entropy, rank and top-k alternatives of every explained token.

    Read out of the last layer's states (the same bf16-rounded states every method sees), so a cache hit and a
    miss report the same numbers.
    """
    with torch.no_grad():
        logprobs = readout_log_probs(loaded, hidden_states[-1, targets.predicting_positions])  # [targets, vocab]
        chosen = logprobs.gather(-1, targets.token_ids[:, None])[:, 0]
        entropy = -(logprobs.exp() * logprobs).sum(-1)
        rank = (logprobs > chosen[:, None]).sum(-1) + 1
        top = logprobs.topk(top_k, dim=-1)
    return types_pb2.StepScores(
        logprobs=chosen.tolist(),
        probabilities=chosen.exp().tolist(),
        entropies=entropy.tolist(),
        ranks=rank.tolist(),
        top_token_ids=tensor_proto(top.indices),
        top_logprobs=tensor_proto(top.values),
    )
