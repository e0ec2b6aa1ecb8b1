"""Attributions per source group (token, word or caller span) besides the raw token matrix (AggregationSpec)."""

from __future__ import annotations

from itertools import pairwise
from typing import NamedTuple

import torch

from common.explain_spec import NORMALIZATIONS, check_aggregation
from common.jobs import ExplainOptions, SpanRequest


class TokenGroup(NamedTuple):
    """Token positions [start, end) reported as one source, and what to call them."""

    start: int
    end: int
    label: str


def source_groups(token_texts: list[str], special_positions: set[int], options: ExplainOptions) -> list[TokenGroup]:
    """The groups, in sequence order and tiling every position, that options.granularity reports attributions for.

    token_texts are the tokens decoded one by one; special_positions are where special tokens (BOS, chat markers)
    sit. Raises InvalidInputError (a ValueError) for options the explain spec refuses for these tokens.
    """
    check_aggregation(options.granularity, options.normalization, options.spans, len(token_texts))
    if options.granularity == "word":
        return _words(token_texts, special_positions)
    if options.granularity == "span":
        return _spans(token_texts, options.spans)
    return [TokenGroup(position, position + 1, text) for position, text in enumerate(token_texts)]


def _words(token_texts: list[str], special_positions: set[int]) -> list[TokenGroup]:
    # A word starts at leading whitespace (" the", "\n"), at a special token, and right after a special token or a
    # line end, so markers and lines never glue onto their neighbours.
    starts = [
        position
        for position, text in enumerate(token_texts)
        if position == 0
        or text[:1].isspace()
        or position in special_positions
        or position - 1 in special_positions
        or token_texts[position - 1].endswith("\n")
    ]
    return [_group(token_texts, start, end) for start, end in pairwise([*starts, len(token_texts)])]


def _spans(token_texts: list[str], spans: list[SpanRequest]) -> list[TokenGroup]:
    groups: list[TokenGroup] = []
    covered = 0
    for span in sorted(spans, key=lambda span: span.start):
        # Tokens between spans are reported one by one.
        groups += [_group(token_texts, position, position + 1) for position in range(covered, span.start)]
        groups.append(_group(token_texts, span.start, span.end, span.label))
        covered = span.end
    groups += [_group(token_texts, position, position + 1) for position in range(covered, len(token_texts))]
    return groups


def _group(token_texts: list[str], start: int, end: int, label: str = "") -> TokenGroup:
    text = "".join(token_texts[start:end])
    # Stripped for display, unless that leaves nothing (a lone "\n" stays visible as itself).
    return TokenGroup(start, end, label or text.strip() or text)


def aggregate(
    matrix: torch.Tensor,
    groups: list[TokenGroup],
    target_positions: torch.Tensor,
    absolute: bool,
    normalization: str,
) -> torch.Tensor:
    """Attributions per group [num_targets, num_groups] from the token matrix [num_targets, num_tokens - 1].

    Each cell sums its group's sources (their absolute values when absolute) that precede the target; a group at or
    after the target's position is 0, and one straddling it counts only its part before. Rows are then divided by
    their L1 norm ("l1") or largest absolute value ("max_abs"), or left as they are ("none"); all-zero rows stay 0.
    groups must tile the sequence in order, as source_groups returns them.
    """
    num_sources = matrix.shape[1]
    group_sizes = torch.tensor([group.end - group.start for group in groups])
    group_of_source = torch.repeat_interleave(torch.arange(len(groups)), group_sizes)[:num_sources]
    values = matrix.abs() if absolute else matrix
    before_target = torch.arange(num_sources)[None, :] < target_positions[:, None]
    values = torch.where(before_target, values, 0.0)
    sums = torch.zeros(len(matrix), len(groups), dtype=matrix.dtype).index_add_(1, group_of_source, values)
    if normalization == "none":
        return sums
    if normalization == "l1":
        scale = sums.abs().sum(dim=-1, keepdim=True)
    elif normalization == "max_abs":
        scale = sums.abs().amax(dim=-1, keepdim=True)
    else:
        raise ValueError(f"unknown normalization {normalization!r}; use one of {', '.join(NORMALIZATIONS)}")
    return sums / torch.where(scale > 0, scale, 1.0)
