"""ERASER faithfulness (DeYoung et al., 2020) of token attributions: comprehensiveness and sufficiency.

For target i with n_i sources (every token before it: prompt and earlier output) and a fraction q, the top
k = max(1, round(q * n_i)) sources by signed attribution are the rationale. Comprehensiveness is the score drop when
the rationale is replaced by a neutral token id (higher: the attribution found what mattered); sufficiency is the
drop when everything BUT the rationale is replaced (lower: the rationale alone carries the score). The same metrics
for seeded uniformly random attributions give the chance level to compare against.
"""

from __future__ import annotations

import torch
from sightline.v1 import types_pb2
from transformers import PreTrainedTokenizerBase

from explainers import progress
from explainers.model import LoadedModel
from explainers.targets import Targets, token_scores

FRACTIONS = (0.01, 0.05, 0.10, 0.20, 0.50)


def replacement_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that stands in for removed tokens: the tokenizer's pad, else unk, else bos id, else 0."""
    for token_id in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def faithfulness(
    loaded: LoadedModel,
    token_ids: torch.Tensor,
    targets: Targets,
    matrix: torch.Tensor,
    *,
    seed: int = 0,
    batch_size: int = 16,
) -> types_pb2.Faithfulness:
    """Comprehensiveness and sufficiency per fraction in FRACTIONS, averaged over the targets, of the attributions
    matrix [num_targets, num_tokens - 1] for token_ids [num_tokens], next to those of random attributions.

    Scores 20 perturbed sequences per target (5 fractions x 2 metrics x these and the random attributions),
    batch_size sequences per forward pass. k uses Python's round (half to even).
    """
    replacement = replacement_token_id(loaded.tokenizer)
    with torch.no_grad():
        unperturbed = token_scores(loaded, token_ids[None], targets)[0]  # [num_targets]
    random_matrix = torch.rand(matrix.shape, generator=torch.Generator().manual_seed(seed))
    comprehensiveness, sufficiency = _score_drops(
        loaded, token_ids, targets, matrix, unperturbed, replacement, batch_size
    )
    random_comprehensiveness, random_sufficiency = _score_drops(
        loaded, token_ids, targets, random_matrix, unperturbed, replacement, batch_size
    )
    return types_pb2.Faithfulness(
        fractions=FRACTIONS,
        comprehensiveness=comprehensiveness.tolist(),
        sufficiency=sufficiency.tolist(),
        random_comprehensiveness=random_comprehensiveness.tolist(),
        random_sufficiency=random_sufficiency.tolist(),
        aopc_comprehensiveness=float(comprehensiveness.mean()),
        aopc_sufficiency=float(sufficiency.mean()),
        random_aopc_comprehensiveness=float(random_comprehensiveness.mean()),
        random_aopc_sufficiency=float(random_sufficiency.mean()),
        replacement_token_id=replacement,
    )


def _score_drops(
    loaded: LoadedModel,
    token_ids: torch.Tensor,
    targets: Targets,
    matrix: torch.Tensor,
    unperturbed: torch.Tensor,
    replacement: int,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(comprehensiveness, sufficiency), each [num_fractions] averaged over the targets."""
    without_rationale, only_rationale = [], []
    for target, position in enumerate(targets.positions.tolist()):
        ranking = torch.argsort(matrix[target, :position], descending=True, stable=True)
        for fraction in FRACTIONS:
            rationale = ranking[: max(1, round(fraction * position))]
            removed = token_ids.clone()
            removed[rationale] = replacement
            kept = token_ids.clone()
            kept[:position] = replacement
            kept[rationale] = token_ids[rationale]
            without_rationale.append(removed)
            only_rationale.append(kept)
    return (
        _mean_drop(loaded, without_rationale, unperturbed, targets, batch_size),
        _mean_drop(loaded, only_rationale, unperturbed, targets, batch_size),
    )


def _mean_drop(
    loaded: LoadedModel, sequences: list[torch.Tensor], unperturbed: torch.Tensor, targets: Targets, batch_size: int
) -> torch.Tensor:
    """Score drop [num_fractions] averaged over the targets, from one perturbed sequence per (target, fraction)
    in that order, batch_size sequences a forward pass."""
    scored_target = torch.arange(len(targets)).repeat_interleave(len(FRACTIONS))  # whose sources each perturbs
    perturbed = torch.stack(sequences)
    scores = []
    with torch.no_grad():
        for start in range(0, len(perturbed), batch_size):
            batch = slice(start, start + batch_size)
            # One pass scores every target of each sequence; keep the one its perturbation was made for.
            all_targets = token_scores(loaded, perturbed[batch], targets)  # [batch, num_targets]
            scores.append(all_targets.gather(1, scored_target[batch, None])[:, 0])
            # Counted in its method's time, not its progress; a cancelled job stops here too.
            progress.step()
    drops = unperturbed[scored_target] - torch.cat(scores)
    return drops.view(len(targets), len(FRACTIONS)).mean(dim=0)
