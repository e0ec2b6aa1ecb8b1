from __future__ import annotations

import struct
import sys
from datetime import UTC, datetime

import pytest
from fake_sightline import SALIENCY, float32_tensor, int32_tensor, make_explanation
from sightline import (
    Explanation,
    ExplanationState,
    FinishReason,
    Generation,
    LogitLensLayer,
    Matrix,
    Source,
    StreamChunk,
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


def test_decoding_swaps_bytes_on_big_endian_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulate a big-endian host: its native order is what the wire's little-endian bytes look like reversed.
    monkeypatch.setattr(sys, "byteorder", "big")
    tensor = types_pb2.Tensor(dtype=types_pb2.D_TYPE_INT32, shape=[2], data=struct.pack(">2i", 1, -2))

    assert Matrix.from_proto(tensor).tolist() == [1, -2]


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (types_pb2.Tensor(dtype=types_pb2.D_TYPE_FLOAT32, shape=[2, 2], data=b"\0" * 12), "do not fill"),
        (types_pb2.Tensor(dtype=types_pb2.D_TYPE_FLOAT32, shape=[1], data=b"\0" * 3), "multiple"),
        (types_pb2.Tensor(dtype=types_pb2.D_TYPE_UNSPECIFIED, shape=[1], data=b"\0" * 4), "dtype"),
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
    middle = StreamChunk.from_proto(inference_pb2.GenerateStreamResponse(text_delta=" is"))
    last = StreamChunk.from_proto(
        inference_pb2.GenerateStreamResponse(
            finish_reason=types_pb2.FINISH_REASON_STOP, usage=types_pb2.Usage(input_tokens=4, output_tokens=2)
        )
    )

    assert (middle.finish_reason, middle.usage) == (None, None)
    assert last.finish_reason is FinishReason.STOP
    assert last.usage is not None
    assert last.usage.output_tokens == 2
