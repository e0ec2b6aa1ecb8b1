"""ERASER faithfulness (DeYoung et al., 2020) of token attributions: comprehensiveness and sufficiency.

For target i with n_i sources (every token before it: prompt and earlier output) and a fraction q, the top
k = max(1, round(q * n_i)) sources by signed attribution are the rationale. Comprehensiveness is the score drop when
the rationale is replaced by a neutral token id (higher: the attribution found what mattered); sufficiency is the
drop when everything BUT the rationale is replaced (lower: the rationale alone carries the score). The same metrics
for seeded uniformly random attributions give the chance level to compare against.

Every method of an explanation is measured together (faithfulness_of): the random attributions' perturbations are
scored once for all of them, a perturbed sequence that two methods (or two fractions) share is scored once, and each
is cut after its target's predicting position, since the score reads nothing later. Each runs only from where it
stops agreeing with the unperturbed or the all-replaced sequence, on that sequence's keys and values, the way
occlusion runs (perturbed_scores). The numbers are those of measuring each method on its own, every perturbed
sequence whole (tests/explainers/test_faithfulness_shared_passes.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from sightline.v1 import types_pb2
from transformers import PreTrainedTokenizerBase

from explainers import progress
from explainers.methods.perturbation import reference_states, resumed_final_states
from explainers.model import LoadedModel, logits_from_normed
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
    matrix [num_targets, num_tokens - 1] for token_ids [num_tokens], next to those of random attributions."""
    return faithfulness_of(loaded, token_ids, targets, {"": matrix}, seed=seed, batch_size=batch_size)[""]


def faithfulness_of(
    loaded: LoadedModel,
    token_ids: torch.Tensor,
    targets: Targets,
    matrices: Mapping[str, torch.Tensor],
    *,
    seed: int = 0,
    batch_size: int = 16,
) -> dict[str, types_pb2.Faithfulness]:
    """faithfulness() of each named attributions matrix, scoring every distinct perturbed sequence once.

    A method's comprehensiveness and sufficiency take 10 perturbed sequences per target (5 fractions x 2 metrics),
    and the random attributions 10 more, shared by all methods; batch_size sequences per forward pass, each batch
    of one target's sequences cut to that target's prefix. k uses Python's round (half to even).
    """
    replacement = replacement_token_id(loaded.tokenizer)
    with torch.no_grad():
        unperturbed = token_scores(loaded, token_ids[None], targets)[0]  # [num_targets]
    shape = next(iter(matrices.values())).shape
    random_matrix = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    perturbed = {name: _perturbed(token_ids, targets, matrix, replacement) for name, matrix in matrices.items()}
    random_perturbed = _perturbed(token_ids, targets, random_matrix, replacement)
    scores = perturbed_scores(
        loaded, token_ids, targets, [*perturbed.values(), random_perturbed], replacement, batch_size
    )
    random_comprehensiveness, random_sufficiency = _mean_drops(random_perturbed, scores, unperturbed)
    results = {}
    for name, sequences in perturbed.items():
        comprehensiveness, sufficiency = _mean_drops(sequences, scores, unperturbed)
        results[name] = types_pb2.Faithfulness(
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
    return results


# A perturbed prefix as the score of one target reads it: (target index, the token ids before its position).
Perturbation = tuple[int, tuple[int, ...]]


def _perturbed(
    token_ids: torch.Tensor, targets: Targets, matrix: torch.Tensor, replacement: int
) -> tuple[list[Perturbation], list[Perturbation]]:
    """(without the rationale, only the rationale): one perturbed prefix per (target, fraction), in that order."""
    without_rationale, only_rationale = [], []
    for target, position in enumerate(targets.positions.tolist()):
        ranking = torch.argsort(matrix[target, :position], descending=True, stable=True)
        prefix = token_ids[:position]
        for fraction in FRACTIONS:
            rationale = ranking[: max(1, round(fraction * position))]
            removed = prefix.clone()
            removed[rationale] = replacement
            kept = torch.full_like(prefix, replacement)
            kept[rationale] = prefix[rationale]
            without_rationale.append((target, tuple(removed.tolist())))
            only_rationale.append((target, tuple(kept.tolist())))
    return without_rationale, only_rationale


def perturbed_scores(
    loaded: LoadedModel,
    token_ids: torch.Tensor,
    targets: Targets,
    perturbed: list[tuple[list[Perturbation], list[Perturbation]]],
    replacement: int,
    batch_size: int,
) -> dict[Perturbation, float]:
    """The score of every distinct perturbed prefix, its target's only.

    A prefix without the rationale agrees with the unperturbed sequence up to its first replaced token, and one
    with the rationale alone agrees with the all-replaced sequence up to its first kept token. Both references run
    once; each prefix runs from where it stops agreeing with the one it agrees with longer, on that reference's
    keys and values (at least its last position, which predicts the target). batch_size prefixes of one target a
    pass, in the order of where they start, each batch from its earliest start.
    """
    by_target: dict[int, list[tuple[int, ...]]] = {}
    for without_rationale, only_rationale in perturbed:
        for target, prefix in (*without_rationale, *only_rationale):
            known = by_target.setdefault(target, [])
            if prefix not in known:
                known.append(prefix)
    sources = token_ids[: int(targets.positions[-1])]  # every prefix is one of these positions' perturbations
    references = reference_states(loaded, torch.stack([sources, torch.full_like(sources, replacement)]))
    scores: dict[Perturbation, float] = {}
    for target, prefixes in by_target.items():
        position = int(targets.positions[target])
        rows = torch.tensor(prefixes)  # [num_prefixes, position]
        differs = rows[None] != references.token_ids[:, None, :position]  # [2 references, num_prefixes, position]
        agreeing = torch.where(differs.any(dim=2), differs.to(torch.int8).argmax(dim=2), position)
        longest, reference_rows = agreeing.max(dim=0)  # [num_prefixes]: tokens agreeing, with which reference
        starts = longest.clamp(max=position - 1) if references.resumable else torch.zeros_like(longest)
        order = torch.argsort(starts, stable=True)
        one_target = targets[target : target + 1]
        for batch in torch.split(order, batch_size):
            normed = resumed_final_states(loaded, references, reference_rows[batch], rows[batch], int(starts[batch[0]]))
            with torch.no_grad():
                scored = one_target.score_logits(logits_from_normed(loaded, normed[:, -1:]))[:, 0]
            scores.update(
                ((target, prefixes[row]), float(score)) for row, score in zip(batch.tolist(), scored, strict=True)
            )
            # After every method has run, so it advances no method's progress; a cancelled job stops here too.
            progress.tick()
    return scores


def _mean_drops(
    sequences: tuple[list[Perturbation], list[Perturbation]],
    scores: dict[Perturbation, float],
    unperturbed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(comprehensiveness, sufficiency), each a score drop [num_fractions] averaged over the targets."""
    num_targets = len(unperturbed)

    def mean_drop(perturbations: list[Perturbation]) -> torch.Tensor:
        drops = torch.tensor(
            [float(unperturbed[target]) - scores[(target, prefix)] for target, prefix in perturbations]
        )
        return drops.view(num_targets, len(FRACTIONS)).mean(dim=0)

    without_rationale, only_rationale = sequences
    return mean_drop(without_rationale), mean_drop(only_rationale)
