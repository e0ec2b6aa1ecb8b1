"""explain() with aggregation and faithfulness options: groups once, per-method aggregates, validation first."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from sightline.v1 import types_pb2

from common.jobs import ExplainOptions, SpanRequest
from explainers import engine
from explainers.engine import InvalidInputError, explain
from explainers.faithfulness import FRACTIONS
from explainers.model import LoadedModel
from tests.explainers.conftest import OUTPUT_IDS, PROMPT_IDS

ReadTensor = Callable[[types_pb2.Tensor], np.ndarray]
METHODS: list[tuple[str, dict[str, object]]] = [("input_x_gradient", {}), ("logit_lens", {})]


def test_token_granularity_by_default_reports_the_matrix_per_token(
    tiny_model: LoadedModel, read_tensor: ReadTensor
) -> None:
    explanation = explain(tiny_model, None, PROMPT_IDS, OUTPUT_IDS, METHODS, None)

    groups = [(group.start, group.end, group.label) for group in explanation.source_groups]
    assert groups == [(position, position + 1, f"w{token}") for position, token in enumerate(PROMPT_IDS + OUTPUT_IDS)]
    gradient, lens = explanation.results
    attributions, aggregated = read_tensor(gradient.attributions), read_tensor(gradient.aggregated)
    assert aggregated.shape == (8, 14)
    np.testing.assert_array_equal(aggregated[:, :13], attributions)
    assert np.all(aggregated[:, 13] == 0.0)  # the last token precedes no target
    assert not gradient.HasField("faithfulness")
    assert not lens.HasField("aggregated") and not lens.HasField("faithfulness")


def test_spans_absolute_l1_and_faithfulness(tiny_model: LoadedModel, read_tensor: ReadTensor) -> None:
    options = ExplainOptions(
        granularity="span",
        spans=[SpanRequest(0, 3, "opening"), SpanRequest(3, 6)],
        absolute=True,
        normalization="l1",
        faithfulness=True,
    )

    explanation = explain(tiny_model, None, PROMPT_IDS, OUTPUT_IDS, METHODS, None, options)

    assert [group.label for group in explanation.source_groups[:3]] == ["opening", "w8w61w25", "w9"]
    assert len(explanation.source_groups) == 2 + len(OUTPUT_IDS)
    gradient, lens = explanation.results
    attributions, aggregated = read_tensor(gradient.attributions), read_tensor(gradient.aggregated)
    assert aggregated.shape == (8, 10)
    magnitudes = np.abs(attributions)
    row_totals = magnitudes.sum(axis=1)
    np.testing.assert_allclose(aggregated[:, 0], magnitudes[:, 0:3].sum(axis=1) / row_totals, rtol=1e-5)
    np.testing.assert_allclose(aggregated.sum(axis=1), 1.0, rtol=1e-5)

    faithfulness = gradient.faithfulness
    assert list(faithfulness.fractions) == pytest.approx(FRACTIONS)
    for curve in ("comprehensiveness", "sufficiency", "random_comprehensiveness", "random_sufficiency"):
        assert len(getattr(faithfulness, curve)) == 5, curve
    assert faithfulness.replacement_token_id == 0  # the word tokenizer's unk, "w0"
    assert not lens.HasField("faithfulness")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (ExplainOptions(granularity="span", spans=[SpanRequest(10, 15)]), r"span \[10, 15\) is out of range.*<= 14"),
        (
            ExplainOptions(granularity="span", spans=[SpanRequest(0, 4), SpanRequest(3, 6)]),
            r"spans \[0, 4\) and \[3, 6\) overlap",
        ),
        (ExplainOptions(normalization="softmax"), "unknown normalization 'softmax'"),
    ],
)
def test_bad_aggregation_options_fail_before_any_model_work(
    tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch, options: ExplainOptions, message: str
) -> None:
    def no_model_work(*args: object) -> None:
        pytest.fail("hidden states were computed before the options were validated")

    monkeypatch.setattr(engine, "_hidden_states", no_model_work)
    with pytest.raises(InvalidInputError, match=message):
        explain(tiny_model, None, PROMPT_IDS, OUTPUT_IDS, METHODS, None, options)
