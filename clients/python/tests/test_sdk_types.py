from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from fake_sightline import (
    AGGREGATED,
    FAITHFULNESS,
    RICH_SPEC,
    SALIENCY,
    STEP_TOP_IDS,
    STEP_TOP_LOGPROBS,
    float32_tensor,
    int32_tensor,
    make_explanation,
)
from sightline import (
    ExplainOptions,
    Explanation,
    ExplanationState,
    Faithfulness,
    FinishReason,
    Generation,
    LogitLensLayer,
    Matrix,
    Source,
    SourceGroup,
    StreamChunk,
    TargetScore,
    Token,
)
from sightline.v1 import inference_pb2, types_pb2


def test_float32_matrix_decodes_shape_rows_and_nested_lists() -> None:
    matrix = Matrix.from_proto(float32_tensor([0.5, -1.0, 2.0, 0.25, 0.0, -3.5], [2, 3]))

    assert matrix.dtype == "float32"
    assert matrix.shape == (2, 3)
    assert matrix.ndim == 2
    assert matrix.row(1) == [0.25, 0.0, -3.5]
    assert matrix.row(-2) == [0.5, -1.0, 2.0]
    assert matrix.tolist() == [[0.5, -1.0, 2.0], [0.25, 0.0, -3.5]]


def test_int32_tensor_of_rank_three_decodes() -> None:
    matrix = Matrix.from_proto(int32_tensor([1, -2, 3, 4, 5, 6, 7, -(2**31)], [2, 2, 2]))

    assert matrix.dtype == "int32"
    assert matrix.shape == (2, 2, 2)
    assert matrix.row(1) == [5, 6, 7, -(2**31)]
    assert matrix.row(1, 0) == [5, 6]
    assert matrix.tolist() == [[[1, -2], [3, 4]], [[5, 6], [7, -(2**31)]]]


def test_empty_axes_decode_to_empty_rows() -> None:
    matrix = Matrix.from_proto(float32_tensor([], [3, 0]))

    assert matrix.tolist() == [[], [], []]
    assert matrix.row(2) == []


def test_int32_tensors_decode_from_int_values() -> None:
    tensor = types_pb2.Tensor(dtype=types_pb2.DTYPE_INT32, shape=[2], int_values=[1, -2], float_values=[9.0])

    assert Matrix.from_proto(tensor).tolist() == [1, -2]


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (types_pb2.Tensor(dtype=types_pb2.DTYPE_FLOAT32, shape=[2, 2], float_values=[0, 0, 0]), "do not fill"),
        (types_pb2.Tensor(dtype=types_pb2.DTYPE_FLOAT32, shape=[1], int_values=[0]), "do not fill"),
        (types_pb2.Tensor(dtype=types_pb2.DTYPE_UNSPECIFIED, shape=[1], float_values=[0]), "dtype"),
    ],
)
def test_malformed_tensors_are_refused(tensor: types_pb2.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Matrix.from_proto(tensor)


def test_row_checks_its_index() -> None:
    matrix = Matrix.from_proto(float32_tensor([1.0, 2.0], [1, 2]))

    with pytest.raises(IndexError):
        matrix.row(1)
    with pytest.raises(IndexError):
        matrix.row(0, 0)


def test_to_numpy_copies_with_shape_and_dtype() -> None:
    numpy = pytest.importorskip("numpy")
    matrix = Matrix.from_proto(int32_tensor([1, 2, 3, 4, 5, 6], [3, 2]))

    array = matrix.to_numpy()
    array[0, 0] = 100

    assert array.dtype == numpy.int32
    assert array.shape == (3, 2)
    assert array.tolist() == [[100, 2], [3, 4], [5, 6]]
    assert matrix.row(0) == [1, 2]


def test_explanation_maps_every_field() -> None:
    explanation = Explanation.from_proto(make_explanation("exp-1"))

    assert explanation.state is ExplanationState.SUCCEEDED
    assert explanation.finished
    assert explanation.tokens[5] == Token(6342, " Paris", -0.5)
    assert explanation.tokens[0].logprob is None
    assert explanation.target_positions == (4, 5)
    assert list(explanation.results) == ["logit_lens", "saliency"]
    assert explanation.results["logit_lens"].attributions is None
    assert explanation.results["saliency"].seconds == 0.25
    assert explanation.fidelity is not None
    assert explanation.fidelity.recomputed_logprobs == (-0.25, -0.5)
    assert explanation.fidelity.max_abs_logprob_diff == pytest.approx(0.001)
    assert explanation.cache_hit
    assert explanation.created_at == datetime.fromtimestamp(1_700_000_000, UTC)
    assert explanation.completed_at is None
    assert explanation.attributions().tolist() == SALIENCY
    assert explanation.token_attribution_methods == ["saliency"]


def test_top_sources_ranks_only_the_causal_prefix_by_absolute_score() -> None:
    explanation = Explanation.from_proto(make_explanation("exp-1"))

    # Target 0 is position 4: the 9.0 at position 4 itself is not a source.
    assert [(source.position, source.token.text, source.score) for source in explanation.top_sources(0)] == [
        (1, " capital", -0.5),
        (3, " France", 0.375),
        (2, " of", 0.25),
        (0, "The", 0.125),
    ]
    # Target 1 is position 5; equal magnitudes keep the earlier position first.
    assert explanation.top_sources(1, k=3, method="saliency") == [
        Source(3, explanation.tokens[3], -0.875),
        Source(1, explanation.tokens[1], 0.5),
        Source(4, explanation.tokens[4], 0.5),
    ]
    assert [source.position for source in explanation.top_sources(-1, k=5)] == [3, 1, 4, 0, 2]


def test_top_sources_refuses_methods_without_attributions() -> None:
    explanation = Explanation.from_proto(make_explanation("exp-1"))

    with pytest.raises(ValueError, match="does not attribute"):
        explanation.top_sources(0, method="logit_lens")
    with pytest.raises(KeyError, match="no result for method 'occlusion'"):
        explanation.top_sources(0, method="occlusion")
    with pytest.raises(ValueError, match="at least 1"):
        explanation.top_sources(0, k=0)


def test_pending_explanation_has_nothing_to_attribute() -> None:
    explanation = Explanation.from_proto(make_explanation("exp-2", types_pb2.EXPLANATION_STATE_PENDING))

    assert explanation.state is ExplanationState.PENDING
    assert not explanation.finished
    with pytest.raises(ValueError, match="no result attributes to tokens"):
        explanation.attributions()


def test_logit_lens_reads_each_layer_at_a_target() -> None:
    explanation = Explanation.from_proto(make_explanation("exp-1"))

    assert explanation.logit_lens(1) == [
        LogitLensLayer(0, (3, 4), (-1.5, -2.5), -8.0),
        LogitLensLayer(1, (7, 8), (-0.25, -4.0), -2.0),
        LogitLensLayer(2, (11, 12), (-0.0625, -6.0), -0.5),
    ]


def test_attribution_shape_must_match_targets_and_tokens() -> None:
    message = make_explanation("exp-1")
    message.results[1].attributions.shape[:] = [5, 2]

    with pytest.raises(ValueError, match=r"shape \(5, 2\), expected \(2, 5\)"):
        Explanation.from_proto(message)


def test_unknown_enum_values_from_newer_servers_map_to_unspecified() -> None:
    generation = Generation.from_proto(inference_pb2.GenerateResponse(finish_reason=99))  # type: ignore[arg-type]

    assert generation.finish_reason is FinishReason.UNSPECIFIED
    assert generation.explanation is None


def test_stream_chunks_leave_final_fields_unset_until_the_end() -> None:
    middle = StreamChunk.from_proto(
        inference_pb2.GenerateStreamResponse(delta=inference_pb2.GenerateStreamDelta(text_delta=" is"))
    )
    last = StreamChunk.from_proto(
        inference_pb2.GenerateStreamResponse(
            end=inference_pb2.GenerateStreamEnd(
                finish_reason=types_pb2.FINISH_REASON_STOP, usage=types_pb2.Usage(input_tokens=4, output_tokens=2)
            )
        )
    )

    assert (middle.finish_reason, middle.usage) == (None, None)
    assert last.finish_reason is FinishReason.STOP
    assert last.usage is not None
    assert last.usage.output_tokens == 2


def grouped_explanation() -> Explanation:
    return Explanation.from_proto(make_explanation("exp-1", spec=RICH_SPEC))


def test_explain_options_hold_tuples_and_compare_by_value() -> None:
    options = ExplainOptions(output_indices=[2, 3], foil_token_ids=[7], granularity="span", spans=[(0, 2, "a")])

    assert options.output_indices == (2, 3)
    assert options.foil_token_ids == (7,)
    assert options.spans == ((0, 2, "a"),)
    assert options == ExplainOptions(
        output_indices=(2, 3), foil_token_ids=(7,), granularity="span", spans=((0, 2, "a"),)
    )
    assert hash(options) == hash(dataclasses.replace(options))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"score": "rank"}, "score must be one of logprob, probability, logit"),
        ({"granularity": "sentence"}, "granularity must be one of token, word, span"),
        ({"normalization": "l2"}, "normalization must be one of none, l1, max_abs"),
        ({"spans": [(0, 2, "")]}, "only used with granularity='span'"),
        ({"granularity": "word", "spans": [(0, 2, "")]}, "not 'word'"),
        ({"granularity": "span"}, "needs spans"),
    ],
)
def test_explain_options_refuse_what_the_protocol_cannot_carry(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ExplainOptions(**fields)  # type: ignore[arg-type]


def test_explanation_maps_the_new_fields() -> None:
    explanation = grouped_explanation()

    assert explanation.foil_token_ids == (7, 7)
    assert explanation.target_score is TargetScore.PROBABILITY
    assert explanation.source_groups == (
        SourceGroup(0, 2, ""),
        SourceGroup(2, 4, "where"),
        SourceGroup(4, 5, ""),
        SourceGroup(5, 6, ""),
    )
    scores = explanation.step_scores
    assert scores is not None
    assert scores.logprobs == (-0.25, -0.5)
    assert scores.probabilities == (0.75, 0.625)
    assert scores.entropies == (0.5, 1.25)
    assert scores.ranks == (1, 2)
    assert scores.top_token_ids.dtype == "int32"
    assert scores.top_token_ids.tolist() == STEP_TOP_IDS
    assert scores.top_logprobs.tolist() == STEP_TOP_LOGPROBS
    saliency = explanation.result("saliency")
    assert saliency.aggregated is not None
    assert saliency.aggregated.tolist() == AGGREGATED
    assert explanation.aggregated().tolist() == AGGREGATED
    assert saliency.faithfulness == Faithfulness(
        fractions=(0.25, 0.5),
        comprehensiveness=(0.5, 1.125),
        sufficiency=(0.125, 0.0),
        random_comprehensiveness=(0.0625, 0.1875),
        random_sufficiency=(0.75, 0.5),
        aopc_comprehensiveness=0.8125,
        aopc_sufficiency=0.0625,
        random_aopc_comprehensiveness=0.125,
        random_aopc_sufficiency=0.625,
        replacement_token_id=50256,
    )
    assert explanation.result("logit_lens").aggregated is None
    assert explanation.result("logit_lens").faithfulness is None


def test_unasked_options_leave_their_fields_empty() -> None:
    explanation = Explanation.from_proto(make_explanation("exp-1"))

    assert explanation.foil_token_ids == ()
    assert explanation.target_score is TargetScore.LOGPROB
    assert explanation.source_groups == ()
    assert explanation.result("saliency").aggregated is None
    assert explanation.result("saliency").faithfulness is None
    with pytest.raises(ValueError, match="no result has aggregated attributions"):
        explanation.top_groups(0)


def test_target_score_unset_reads_as_logprob_and_unknown_as_unspecified() -> None:
    message = make_explanation("exp-1")
    message.ClearField("target_score")
    assert Explanation.from_proto(message).target_score is TargetScore.LOGPROB

    message.target_score = 99  # type: ignore[assignment]
    assert Explanation.from_proto(message).target_score is TargetScore.UNSPECIFIED


def test_top_groups_ranks_groups_that_start_before_the_target_by_absolute_score() -> None:
    explanation = grouped_explanation()
    where, subject, is_ = explanation.source_groups[1], explanation.source_groups[0], explanation.source_groups[2]

    # Target 0 is position 4: the group starting there (9.0) and the one after it (-7.0) do not rank.
    assert explanation.top_groups(0) == [(where, 0.625), (subject, -0.375)]
    # Target 1 is position 5: the group [4, 5) now ranks, [5, 6) still does not.
    assert explanation.top_groups(1, k=5, method="saliency") == [(where, -0.9375), (subject, 0.5625), (is_, 0.5)]
    assert explanation.top_groups(-1, k=1) == [(where, -0.9375)]


def test_top_groups_refuses_methods_without_aggregated_attributions_and_bad_k() -> None:
    explanation = grouped_explanation()

    with pytest.raises(ValueError, match="'logit_lens' has no aggregated attributions"):
        explanation.top_groups(0, method="logit_lens")
    with pytest.raises(ValueError, match="at least 1"):
        explanation.top_groups(0, k=0)


def test_beats_random_needs_both_more_comprehensiveness_and_less_sufficiency() -> None:
    faithfulness = Faithfulness.from_proto(FAITHFULNESS)

    assert faithfulness.beats_random
    assert not dataclasses.replace(faithfulness, aopc_comprehensiveness=0.125).beats_random
    assert not dataclasses.replace(faithfulness, aopc_sufficiency=0.625).beats_random
    assert not dataclasses.replace(faithfulness, aopc_comprehensiveness=0.0, aopc_sufficiency=1.0).beats_random


def test_faithfulness_curves_must_match_the_fractions() -> None:
    message = make_explanation("exp-1", spec=RICH_SPEC)
    message.results[1].faithfulness.sufficiency.append(0.5)

    with pytest.raises(ValueError, match="one value per fraction"):
        Explanation.from_proto(message)


def _drop_first_group(message: types_pb2.Explanation) -> None:
    del message.source_groups[0]


def _shorten_ranks(message: types_pb2.Explanation) -> None:
    del message.step_scores.ranks[-1]


def _reshape_top_ids(message: types_pb2.Explanation) -> None:
    message.step_scores.top_token_ids.shape[:] = [4, 1]


def _add_foil(message: types_pb2.Explanation) -> None:
    message.foil_token_ids.append(9)


def _group_past_the_end(message: types_pb2.Explanation) -> None:
    message.source_groups[-1].end = 7


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_drop_first_group, r"aggregated of 'saliency' have shape \(2, 4\), expected \(2, 3\)"),
        (_shorten_ranks, "step scores do not cover the 2 targets"),
        (_reshape_top_ids, "step scores do not cover the 2 targets"),
        (_add_foil, "3 foil token ids for 2 targets"),
        (_group_past_the_end, r"source group \[5, 7\) is outside the 6 tokens"),
    ],
)
def test_new_fields_must_fit_the_targets_and_tokens(
    corrupt: Callable[[types_pb2.Explanation], None], message: str
) -> None:
    explanation = make_explanation("exp-1", spec=RICH_SPEC)
    corrupt(explanation)

    with pytest.raises(ValueError, match=message):
        Explanation.from_proto(explanation)
