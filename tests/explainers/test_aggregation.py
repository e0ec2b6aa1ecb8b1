"""Source groups (token, word, span) and attributions summed and normalised per group."""

from __future__ import annotations

import pytest
import torch

from common.jobs import ExplainOptions, SpanRequest
from explainers.aggregation import TokenGroup, aggregate, source_groups

# "<s>" is a special token; "The" follows it without a space, "s" continues " cat", "\n" ends a line.
TEXTS = ["<s>", "The", " cat", "s", " sat", ".", "\n", "Hi", " there"]
SPECIAL = {0}


def test_token_groups_are_the_tokens() -> None:
    groups = source_groups(TEXTS, SPECIAL, ExplainOptions())
    assert groups == [TokenGroup(position, position + 1, text) for position, text in enumerate(TEXTS)]


def test_word_groups_merge_sub_words_and_split_at_specials_and_line_ends() -> None:
    groups = source_groups(TEXTS, SPECIAL, ExplainOptions(granularity="word"))
    assert groups == [
        TokenGroup(0, 1, "<s>"),
        TokenGroup(1, 2, "The"),  # after a special token
        TokenGroup(2, 4, "cats"),  # " cat" + "s", stripped
        TokenGroup(4, 6, "sat."),
        TokenGroup(6, 7, "\n"),  # a whitespace-only word keeps its text as the label
        TokenGroup(7, 8, "Hi"),  # after a line end
        TokenGroup(8, 9, "there"),
    ]


def test_a_special_token_is_its_own_word_even_without_whitespace() -> None:
    groups = source_groups(["a", "b", "<eot>", "c", "d"], {2}, ExplainOptions(granularity="word"))
    assert [(group.start, group.end) for group in groups] == [(0, 2), (2, 3), (3, 5)]


def test_span_groups_keep_the_callers_spans_and_single_out_the_rest() -> None:
    spans = [SpanRequest(5, 7), SpanRequest(2, 4, "animal")]  # any order
    groups = source_groups(TEXTS, SPECIAL, ExplainOptions(granularity="span", spans=spans))
    assert groups == [
        TokenGroup(0, 1, "<s>"),
        TokenGroup(1, 2, "The"),
        TokenGroup(2, 4, "animal"),
        TokenGroup(4, 5, "sat"),
        TokenGroup(5, 7, "."),  # unlabelled: its text, stripped
        TokenGroup(7, 8, "Hi"),
        TokenGroup(8, 9, "there"),
    ]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (ExplainOptions(granularity="span", spans=[SpanRequest(-1, 2)]), r"span \[-1, 2\) is out of range.*<= 9"),
        (ExplainOptions(granularity="span", spans=[SpanRequest(3, 3)]), r"span \[3, 3\) is out of range"),
        (ExplainOptions(granularity="span", spans=[SpanRequest(4, 10)]), r"end <= 9, the number of tokens"),
        (
            ExplainOptions(granularity="span", spans=[SpanRequest(4, 6), SpanRequest(1, 5)]),
            r"spans \[1, 5\) and \[4, 6\) overlap",
        ),
        (ExplainOptions(granularity="span"), "granularity 'span' needs at least one span"),
        (ExplainOptions(spans=[SpanRequest(0, 2)]), "spans are only used with granularity 'span', not 'token'"),
        (ExplainOptions(granularity="sentence"), "unknown granularity 'sentence'; use one of token, word, span"),
        (ExplainOptions(normalization="l2"), "unknown normalization 'l2'; use one of none, l1, max_abs"),
    ],
)
def test_bad_options_are_rejected_with_what_to_change(options: ExplainOptions, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        source_groups(TEXTS, SPECIAL, options)


# Six tokens in three groups of two; targets at positions 3 and 5, and a third whose row is all zero.
GROUPS = [TokenGroup(0, 2, "a"), TokenGroup(2, 4, "b"), TokenGroup(4, 6, "c")]
TARGET_POSITIONS = torch.tensor([3, 5, 5])
MATRIX = torch.tensor(
    [
        [1.0, -2.0, 3.0, 9.0, 9.0],  # cells at and after position 3 must not count, whatever they hold
        [1.0, -2.0, 3.0, -4.0, 5.0],
        [0.0, 0.0, 0.0, 0.0, 0.0],
    ]
)


@pytest.mark.parametrize(
    ("absolute", "normalization", "expected"),
    [
        # Group b straddles target 0 (position 3): only position 2 counts. Group c's token 5 precedes no target.
        (False, "none", [[-1.0, 3.0, 0.0], [-1.0, -1.0, 5.0], [0.0, 0.0, 0.0]]),
        (True, "none", [[3.0, 3.0, 0.0], [3.0, 7.0, 5.0], [0.0, 0.0, 0.0]]),
        (False, "l1", [[-0.25, 0.75, 0.0], [-1 / 7, -1 / 7, 5 / 7], [0.0, 0.0, 0.0]]),
        (False, "max_abs", [[-1 / 3, 1.0, 0.0], [-0.2, -0.2, 1.0], [0.0, 0.0, 0.0]]),
        (True, "max_abs", [[1.0, 1.0, 0.0], [3 / 7, 1.0, 5 / 7], [0.0, 0.0, 0.0]]),
    ],
)
def test_aggregate_sums_before_the_target_then_normalises_rows(
    absolute: bool, normalization: str, expected: list[list[float]]
) -> None:
    aggregated = aggregate(MATRIX, GROUPS, TARGET_POSITIONS, absolute, normalization)
    torch.testing.assert_close(aggregated, torch.tensor(expected), rtol=0, atol=1e-7)


def test_token_groups_reproduce_the_matrix_with_a_zero_last_column() -> None:
    groups = [TokenGroup(position, position + 1, "") for position in range(6)]
    aggregated = aggregate(MATRIX, groups, TARGET_POSITIONS, absolute=False, normalization="none")
    masked = torch.where(torch.arange(5)[None, :] < TARGET_POSITIONS[:, None], MATRIX, 0.0)
    torch.testing.assert_close(aggregated, torch.cat([masked, torch.zeros(3, 1)], dim=1), rtol=0, atol=0)
