"""What an explanation explains: which generated tokens, scored how, against which foil.

Every attribution method differentiates or perturbs the same function of the model's output,
``Targets.score``, so plain, probability and contrastive explanations come from one place.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


class CausalLM(Protocol):
    """What scoring token ids needs of a loaded model (explainers.model.LoadedModel is one): the Hugging Face
    module. A protocol, so that this module needs nothing from explainers.model, which scores through it."""

    @property
    def model(self) -> nn.Module: ...


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the vocabulary, in at least float32 so bf16 logits keep their tail."""
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


class TargetScore(enum.Enum):
    LOGPROB = "logprob"
    PROBABILITY = "probability"
    LOGIT = "logit"


@dataclass(frozen=True)
class Targets:
    """The explained tokens of one sequence.

    ``positions[i]`` is the sequence position of explained token i; the model predicts it from
    position ``positions[i] - 1``. With ``foil_ids`` the score is the contrast
    ``score(token) - score(foil)``.
    """

    positions: torch.Tensor  # int64 [num_targets], ascending, all >= 1
    token_ids: torch.Tensor  # int64 [num_targets]: the generated tokens at those positions
    foil_ids: torch.Tensor | None  # int64 [num_targets]
    score: TargetScore = TargetScore.LOGPROB

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, chunk: slice) -> Targets:
        """The targets in a slice, scored the same way."""
        foil_ids = None if self.foil_ids is None else self.foil_ids[chunk]
        return Targets(self.positions[chunk], self.token_ids[chunk], foil_ids, self.score)

    @property
    def predicting_positions(self) -> torch.Tensor:
        return self.positions - 1

    def score_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Scores [..., num_targets] from the logits [..., num_targets, vocab] at the predicting positions."""
        scores = self._score_of(logits, self.token_ids)
        if self.foil_ids is not None:
            scores = scores - self._score_of(logits, self.foil_ids)
        return scores

    def _score_of(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        index = ids.expand(*logits.shape[:-2], -1).unsqueeze(-1)
        if self.score is TargetScore.LOGIT:
            return logits.gather(-1, index).squeeze(-1)
        logprobs = log_probs(logits).gather(-1, index).squeeze(-1)
        return logprobs.exp() if self.score is TargetScore.PROBABILITY else logprobs


def target_scores(loaded: CausalLM, inputs_embeds: torch.Tensor, targets: Targets) -> torch.Tensor:
    """``targets.score`` for every target [batch, num_targets], from one forward pass over inputs_embeds [batch,
    num_tokens, hidden]; differentiable with respect to inputs_embeds when grad mode is on."""
    # Only the positions that predict a target go through the unembedding: [num_targets, vocab], not [seq, vocab].
    logits = loaded.model(inputs_embeds=inputs_embeds, logits_to_keep=targets.predicting_positions).logits
    return targets.score_logits(logits)


def token_scores(loaded: CausalLM, token_ids: torch.Tensor, targets: Targets) -> torch.Tensor:
    """``targets.score`` [batch, num_targets] for a batch of (perturbed) token-id sequences [batch, num_tokens]."""
    logits = loaded.model(input_ids=token_ids, logits_to_keep=targets.predicting_positions).logits
    return targets.score_logits(logits)
