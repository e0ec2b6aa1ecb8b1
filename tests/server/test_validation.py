"""Unit tests of request validation and the job codec (no services needed)."""

from __future__ import annotations

import math

import grpc
import pytest
from sightline.v1 import types_pb2

from common.jobs import ExplanationJob, MethodRequest, ModelRecord, new_explanation_id
from server.errors import GatewayError, shown
from server.validation import (
    chat_messages,
    check_options_fit,
    explain_mode,
    explain_options,
    method_params,
    sampling_from_proto,
    served_logprobs,
    token_ids,
)


def test_sampling_defaults() -> None:
    sampling = sampling_from_proto(types_pb2.SamplingParams(), default_max_tokens=64, max_model_len=2048)
    assert (sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.top_k) == (64, 0.0, 1.0, None)


@pytest.mark.parametrize(
    "params",
    [
        types_pb2.SamplingParams(max_tokens=2048),
        types_pb2.SamplingParams(temperature=float("nan")),
        types_pb2.SamplingParams(top_p=1.5),
        types_pb2.SamplingParams(top_k=-1),
        types_pb2.SamplingParams(stop=[""]),
        types_pb2.SamplingParams(stop=["x"] * 17),
    ],
)
def test_sampling_rejects(params: types_pb2.SamplingParams) -> None:
    with pytest.raises(GatewayError) as caught:
        sampling_from_proto(params, default_max_tokens=64, max_model_len=2048)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_token_ids_and_chat() -> None:
    assert token_ids([0, 5], field="f", max_model_len=8) == [0, 5]
    with pytest.raises(GatewayError, match="context window is 8 tokens"):
        token_ids(list(range(8)), field="f", max_model_len=8)
    with pytest.raises(GatewayError, match="f is empty"):
        token_ids([], field="f", max_model_len=8)
    messages = types_pb2.ChatMessages(messages=[types_pb2.ChatMessage(role="user", content="hi")])
    assert chat_messages(messages) == [{"role": "user", "content": "hi"}]


def test_job_round_trips_through_stream_fields() -> None:
    job = ExplanationJob(
        explanation_id=new_explanation_id(),
        tenant="t",
        model="m",
        weights_digest="d" * 64,
        prompt_token_ids=[1, 2],
        output_token_ids=[3],
        served_logprobs=[-0.5],
        methods=[MethodRequest("logit_lens", {"k": 3})],
        traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-01",
    )
    encoded = {k.encode(): v.encode() for k, v in job.to_fields().items()}
    assert ExplanationJob.from_fields(encoded) == job
    assert job.explanation_id != new_explanation_id()
    with pytest.raises(ValueError, match="malformed explanation job"):
        ExplanationJob.from_fields({b"explanation_id": b"x"})
    # As the record's job field the workers read.
    assert ExplanationJob.from_json(job.to_json().encode()) == job
    for malformed in (b"{", b"[1]", b'{"explanation_id": 1}', b'{"explanation_id": "x"}'):
        with pytest.raises(ValueError, match="malformed explanation job"):
            ExplanationJob.from_json(malformed)
    record = ModelRecord("abc", 49152)
    assert ModelRecord.from_json(record.to_json()) == record


def _spec(**fields: object) -> types_pb2.ExplainSpec:
    return types_pb2.ExplainSpec(methods=[types_pb2.MethodSpec(name="saliency")], **fields)  # type: ignore[arg-type]


def test_explain_options_defaults_and_mapping() -> None:
    options = explain_options(_spec())
    assert (options.score, options.granularity, options.normalization, options.step_scores_top_k) == (
        "logprob",
        "token",
        "none",
        5,
    )
    options = explain_options(
        _spec(
            targets=types_pb2.TargetSpec(output_indices=[0, 2], foil_token_ids=[7], score=types_pb2.TARGET_SCORE_LOGIT),
            aggregation=types_pb2.AggregationSpec(
                granularity=types_pb2.GRANULARITY_SPAN,
                spans=[types_pb2.Span(start=4, end=6, label="b"), types_pb2.Span(start=0, end=2, label="a")],
                normalization=types_pb2.NORMALIZATION_L1,
                absolute=True,
            ),
            faithfulness=True,
        )
    )
    assert options.output_indices == [0, 2] and options.foil_token_ids == [7] and options.score == "logit"
    assert [s.label for s in options.spans] == ["a", "b"]
    assert options.absolute and options.faithfulness and options.normalization == "l1"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (_spec(targets=types_pb2.TargetSpec(output_indices=[2, 1])), "distinct, ascending"),
        (_spec(targets=types_pb2.TargetSpec(foil_token_ids=[-1])), "foil_token_ids"),
        (_spec(aggregation=types_pb2.AggregationSpec(granularity=types_pb2.GRANULARITY_SPAN)), "needs"),
        (
            _spec(
                aggregation=types_pb2.AggregationSpec(
                    granularity=types_pb2.GRANULARITY_SPAN,
                    spans=[types_pb2.Span(start=0, end=3), types_pb2.Span(start=2, end=4)],
                )
            ),
            "overlap",
        ),
        (_spec(step_scores_top_k=0), "step_scores_top_k"),
    ],
)
def test_explain_options_rejects(spec: types_pb2.ExplainSpec, message: str) -> None:
    with pytest.raises(GatewayError, match=message) as caught:
        explain_options(spec)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_options_must_fit_the_generation() -> None:
    options = explain_options(_spec(targets=types_pb2.TargetSpec(output_indices=[0, 5], foil_token_ids=[1, 2, 3])))
    with pytest.raises(GatewayError, match="only 3 tokens were generated"):
        check_options_fit(options, num_tokens=10, num_generated=3)
    with pytest.raises(GatewayError, match="one per explained token"):
        check_options_fit(options, num_tokens=10, num_generated=6)


def test_explain_mode_must_be_a_known_value() -> None:
    assert explain_mode(_spec(mode=types_pb2.EXPLAIN_MODE_ASYNC)) == types_pb2.EXPLAIN_MODE_ASYNC
    assert explain_mode(_spec()) == types_pb2.EXPLAIN_MODE_UNSPECIFIED
    with pytest.raises(GatewayError, match=r"explain\.mode 7 is not an ExplainMode value") as caught:
        explain_mode(_spec(mode=7))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_served_logprobs_are_one_finite_value_per_output() -> None:
    assert served_logprobs([], 3) == []
    assert served_logprobs([-0.5, -1.0], 2) == [-0.5, -1.0]
    with pytest.raises(GatewayError, match="2 values for 3 output tokens"):
        served_logprobs([-0.5, -1.0], 3)
    with pytest.raises(GatewayError, match=r"output_logprobs\[1\] is nan; served log-probabilities are finite"):
        served_logprobs([-0.5, math.nan], 2)


def test_messages_quote_enormous_input_only_in_part() -> None:
    assert shown("gpt-17") == "'gpt-17'"
    quoted = shown("x" * 100_000)
    assert quoted == "'" + "x" * 59 + "… (100,000 characters)"
    assert shown(["a"] * 1000).endswith("… (5,000 characters written out)")


@pytest.mark.parametrize(
    ("params", "where", "shown_value"),
    [
        ({"steps": math.nan}, "'explain.methods[0].params.steps'", "nan"),
        ({"not_a_param": math.inf}, "'explain.methods[0].params.not_a_param'", "inf"),
        ({"baseline_token_id": -math.inf}, "'explain.methods[0].params.baseline_token_id'", "-inf"),
    ],
    ids=["declared", "unknown", "negative"],
)
def test_method_params_refuse_non_finite_numbers_naming_the_parameter(
    params: dict[str, float], where: str, shown_value: str
) -> None:
    """Regression (issue 13): json_format.MessageToDict raised on NaN and infinities, which answered INTERNAL."""
    spec = types_pb2.MethodSpec(
        name="integrated_gradients",
        params={name: types_pb2.ParamValue(float_value=value) for name, value in params.items()},
    )
    with pytest.raises(GatewayError) as caught:
        method_params(spec, 0)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.message == (
        f"{where} of method 'integrated_gradients' is {shown_value}; parameters must be finite numbers"
    )


def test_method_params_keep_every_kind_of_value() -> None:
    spec = types_pb2.MethodSpec(name="m")
    assert method_params(spec, 0) == {}
    spec.params["n"].int_value = 16
    spec.params["f"].float_value = 0.5
    spec.params["s"].string_value = "token"
    spec.params["b"].bool_value = True
    params = method_params(spec, 0)
    assert params == {"n": 16, "f": 0.5, "s": "token", "b": True}
    assert type(params["n"]) is int  # ints stay ints (a Struct carried them as doubles)


def test_method_params_refuse_a_value_with_no_kind() -> None:
    spec = types_pb2.MethodSpec(name="m", params={"steps": types_pb2.ParamValue()})
    with pytest.raises(GatewayError) as caught:
        method_params(spec, 0)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.message == (
        "'explain.methods[0].params.steps' of method 'm' has no value; set one of int_value, float_value, "
        "string_value or bool_value"
    )
