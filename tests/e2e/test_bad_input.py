"""Bad input gets a precise status and a message a person can act on."""

from __future__ import annotations

import base64
from typing import cast

import grpc
import pytest
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message
from sightline.v1 import explanations_pb2, explanations_pb2_grpc, inference_pb2, inference_pb2_grpc, types_pb2

from tests.protofuzz import UNKNOWN_FIELDS, Fields, encode

pytestmark = pytest.mark.e2e


def _generate_error(
    inference: inference_pb2_grpc.InferenceServiceStub, request: inference_pb2.GenerateRequest
) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        inference.Generate(request, timeout=60)
    return caught.value


def _request(**fields: object) -> inference_pb2.GenerateRequest:
    fields.setdefault("input", inference_pb2.GenerationInput(prompt="Hello"))
    return inference_pb2.GenerateRequest(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("request_fields", "expected_code", "message_part"),
    [
        (
            {"input": inference_pb2.GenerationInput(prompt="")},
            grpc.StatusCode.INVALID_ARGUMENT,
            "input.prompt is empty",
        ),
        ({"input": inference_pb2.GenerationInput()}, grpc.StatusCode.INVALID_ARGUMENT, "input is missing"),
        (
            {"input": inference_pb2.GenerationInput(chat=types_pb2.ChatMessages())},
            grpc.StatusCode.INVALID_ARGUMENT,
            "no messages",
        ),
        (
            {
                "input": inference_pb2.GenerationInput(
                    chat=types_pb2.ChatMessages(messages=[types_pb2.ChatMessage(role="robot", content="hi")])
                )
            },
            grpc.StatusCode.INVALID_ARGUMENT,
            "role must be one of",
        ),
        ({"sampling": types_pb2.SamplingParams(max_tokens=-5)}, grpc.StatusCode.INVALID_ARGUMENT, "got -5"),
        ({"sampling": types_pb2.SamplingParams(max_tokens=0)}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        (
            {"sampling": types_pb2.SamplingParams(max_tokens=10_000_000)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "context window is 2048",
        ),
        ({"sampling": types_pb2.SamplingParams(temperature=-1)}, grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        ({"sampling": types_pb2.SamplingParams(top_p=0)}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        (
            {"input": inference_pb2.GenerationInput(prompt_token_ids=types_pb2.TokenIds(ids=[1, -3]))},
            grpc.StatusCode.INVALID_ARGUMENT,
            "negative token ids",
        ),
        (
            {"input": inference_pb2.GenerationInput(prompt_token_ids=types_pb2.TokenIds(ids=[1] * 5000))},
            grpc.StatusCode.INVALID_ARGUMENT,
            "context window",
        ),
        ({"model": "gpt-17"}, grpc.StatusCode.NOT_FOUND, "not served here"),
        (
            {"explain": types_pb2.ExplainSpec(methods=[types_pb2.MethodSpec(name="telepathy")])},
            grpc.StatusCode.INVALID_ARGUMENT,
            "unknown explain method 'telepathy'; available methods: ",
        ),
        (
            {
                "explain": types_pb2.ExplainSpec(
                    methods=[
                        types_pb2.MethodSpec(name="logit_lens", params={"k": types_pb2.ParamValue(string_value="x")})
                    ]
                )
            },
            grpc.StatusCode.INVALID_ARGUMENT,
            "parameter 'k' of method 'logit_lens' must be a finite number",
        ),
    ],
)
def test_generate_rejects_bad_input(
    inference: inference_pb2_grpc.InferenceServiceStub,
    request_fields: dict[str, object],
    expected_code: grpc.StatusCode,
    message_part: str,
) -> None:
    error = _generate_error(inference, _request(**request_fields))
    assert error.code() == expected_code, error.details()
    assert message_part in error.details()


def test_prompt_text_longer_than_the_context_window(inference: inference_pb2_grpc.InferenceServiceStub) -> None:
    error = _generate_error(
        inference,
        _request(
            input=inference_pb2.GenerationInput(prompt="hello " * 3000), sampling=types_pb2.SamplingParams(max_tokens=8)
        ),
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "2048" in error.details()


def test_out_of_vocabulary_token_ids(inference: inference_pb2_grpc.InferenceServiceStub) -> None:
    error = _generate_error(
        inference, _request(input=inference_pb2.GenerationInput(prompt_token_ids=types_pb2.TokenIds(ids=[1, 10**9])))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "vLLM rejected the request" in error.details()


def test_unknown_explanation_id(explanations: explanations_pb2_grpc.ExplanationsServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        explanations.GetExplanation(explanations_pb2.GetExplanationRequest(explanation_id="exp_nope"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no explanation with id 'exp_nope'" in caught.value.details()


def test_explain_with_mismatched_logprobs(explanations: explanations_pb2_grpc.ExplanationsServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        explanations.Explain(
            explanations_pb2.ExplainRequest(
                prompt_token_ids=[1, 2, 3],
                output_token_ids=[4, 5],
                output_logprobs=[-0.1],
                explain=types_pb2.ExplainSpec(methods=[types_pb2.MethodSpec(name="input_x_gradient")]),
            ),
            timeout=10,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "one per output token" in caught.value.details()


def test_explain_rejects_out_of_vocabulary_ids(explanations: explanations_pb2_grpc.ExplanationsServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        explanations.Explain(
            explanations_pb2.ExplainRequest(
                prompt_token_ids=[1, 2, 3],
                output_token_ids=[4, 10**8],
                explain=types_pb2.ExplainSpec(methods=[types_pb2.MethodSpec(name="input_x_gradient")]),
            ),
            timeout=60,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "outside the model's vocabulary (ids 0 to 49151)" in caught.value.details()


def _send_raw(channel: grpc.Channel, path: str, fields: Fields, *, streaming: bool = False) -> grpc.RpcError:
    """Send a hand-encoded request (tests/protofuzz.py), which may hold what protobuf will not serialize."""
    request: type[Message] = {
        "Generate": inference_pb2.GenerateRequest,
        "GenerateStream": inference_pb2.GenerateRequest,
        "GetExplanation": explanations_pb2.GetExplanationRequest,
    }[path.rsplit("/", 1)[1]]
    wire = encode(cast(Descriptor, request.DESCRIPTOR), fields)
    with pytest.raises(grpc.RpcError) as caught:
        if streaming:
            list(channel.unary_stream(path, request_serializer=bytes)(wire, timeout=60))
        else:
            channel.unary_unary(path, request_serializer=bytes)(wire, timeout=60)
    return caught.value


@pytest.mark.parametrize("streaming", [False, True], ids=["Generate", "GenerateStream"])
def test_invalid_utf8_gets_invalid_argument_naming_the_field(channel: grpc.Channel, streaming: bool) -> None:
    """Regression (found by tests/e2e/test_fuzz.py): grpc answered UNKNOWN "Unexpected DecodeError"."""
    path = "/sightline.v1.InferenceService/" + ("GenerateStream" if streaming else "Generate")
    error = _send_raw(
        channel, path, {"input": {"chat": {"messages": [{"role": "user", "content": b"caf\xc3"}]}}}, streaming=streaming
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input.chat.messages[0].content is not valid UTF-8 (byte 3" in error.details()


def test_nesting_past_the_parser_limit(channel: grpc.Channel) -> None:
    """Regression (found by the fuzzing): a method's params nested past protobuf's depth limit (a Struct then; typed
    params do not nest, so unknown groups now) could not be parsed and got UNKNOWN."""
    start_group, end_group = bytes([0xA3, 0x06]), bytes([0xA4, 0x06])  # field 100, wire types 3 and 4
    method = {"name": "logit_lens", UNKNOWN_FIELDS: start_group * 150 + end_group * 150}
    error = _send_raw(
        channel,
        "/sightline.v1.InferenceService/Generate",
        {"input": {"prompt": "Hi"}, "explain": {"methods": [method]}},
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(
        "the request is not a valid sightline.v1.GenerateRequest: field 100 of explain.methods[0]"
    )


@pytest.mark.parametrize(
    ("path", "fields", "code", "start"),
    [
        (
            "/sightline.v1.InferenceService/Generate",
            {"model": "m" * 100_000, "input": {"prompt": "Hi"}},
            grpc.StatusCode.NOT_FOUND,
            "model 'mmm",
        ),
        (
            "/sightline.v1.ExplanationsService/GetExplanation",
            {"explanation_id": "exp_" + "0" * 100_000},
            grpc.StatusCode.NOT_FOUND,
            "no explanation with id 'exp_000",
        ),
        (
            "/sightline.v1.InferenceService/Generate",
            {"input": {"chat": {"messages": [{"role": "r" * 100_000, "content": "hi"}]}}},
            grpc.StatusCode.INVALID_ARGUMENT,
            "input.chat.messages[0].role must be one of",
        ),
        (
            "/sightline.v1.InferenceService/Generate",
            {"input": {"prompt": "Hi"}, "explain": {"methods": [{"name": "logit_lens"}] * 50_000}},
            grpc.StatusCode.INVALID_ARGUMENT,
            "explain methods must be distinct; named more than once: ['logit_lens']",
        ),
    ],
    ids=["model", "explanation_id", "role", "repeated_method"],
)
def test_messages_do_not_echo_enormous_input(
    channel: grpc.Channel, path: str, fields: Fields, code: grpc.StatusCode, start: str
) -> None:
    """Regression (found by the fuzzing): a 100 KB input came back whole in the status message, past gRPC's
    16 KB metadata limit, so the client saw RESOURCE_EXHAUSTED "received metadata size exceeds hard limit"."""
    error = _send_raw(channel, path, fields)
    assert error.code() == code
    assert error.details().startswith(start)
    assert len(error.details()) < 300


def test_unknown_explain_mode(inference: inference_pb2_grpc.InferenceServiceStub) -> None:
    """Regression: an unknown mode was served as SYNC, holding the call open until its deadline."""
    error = _generate_error(
        inference,
        _request(
            explain=types_pb2.ExplainSpec(
                methods=[types_pb2.MethodSpec(name="logit_lens")], mode=cast(types_pb2.ExplainMode, 7)
            )
        ),
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "explain.mode 7 is not an ExplainMode value" in error.details()


def test_explain_rejects_non_finite_served_logprobs(
    explanations: explanations_pb2_grpc.ExplanationsServiceStub,
) -> None:
    """Regression: NaN served log-probabilities were queued and came back as a NaN fidelity."""
    with pytest.raises(grpc.RpcError) as caught:
        explanations.Explain(
            explanations_pb2.ExplainRequest(
                prompt_token_ids=[1, 2, 3],
                output_token_ids=[4, 5],
                output_logprobs=[-0.1, float("nan")],
                explain=types_pb2.ExplainSpec(methods=[types_pb2.MethodSpec(name="logit_lens")]),
            ),
            timeout=10,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "output_logprobs[1] is nan" in caught.value.details()


def test_list_explanations_refuses_a_page_token_with_nan(
    explanations: explanations_pb2_grpc.ExplanationsServiceStub,
) -> None:
    """Regression (found by the fuzzing): a page token holding NaN answered INTERNAL."""
    token = base64.urlsafe_b64encode(b'[NaN, "exp_x"]').decode()
    with pytest.raises(grpc.RpcError) as caught:
        explanations.ListExplanations(explanations_pb2.ListExplanationsRequest(page_token=token), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token is not one this server issued" in caught.value.details()
