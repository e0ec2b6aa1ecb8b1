from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from fake_sightline import AGGREGATED, FAITHFULNESS, GENERATED_TEXT, FakeSightline
from google.protobuf import json_format
from sightline import (
    TLS,
    Client,
    ExplainOptions,
    ExplainPath,
    ExplanationState,
    FinishReason,
    SightlineError,
    SourceGroup,
    TargetScore,
)
from sightline._messages import estimate_request
from sightline.v1 import explanations_pb2, inference_pb2, types_pb2


@pytest.fixture
def client(fake: FakeSightline) -> Iterator[Client]:
    with Client(fake.target, api_key="secret-key", timeout=10) as client:
        yield client


def last_request(fake: FakeSightline) -> object:
    return fake.requests[-1]


def test_generate_returns_the_converted_response(client: Client, fake: FakeSightline) -> None:
    generation = client.generate("The capital of France", max_tokens=2, request_id="req-7")

    assert generation.text == GENERATED_TEXT
    assert generation.request_id == "req-7"
    assert generation.prompt_token_ids == (464, 3139, 286, 4881)
    assert [(token.id, token.text, token.logprob) for token in generation.output_tokens] == [
        (318, " is", -0.25),
        (6342, " Paris", -0.5),
    ]
    assert generation.finish_reason is FinishReason.STOP
    assert (generation.usage.input_tokens, generation.usage.output_tokens) == (4, 2)
    assert generation.explanation_id == ""
    assert generation.explanation is None
    assert generation.raw.text == GENERATED_TEXT


def test_generate_sends_text_and_only_the_sampling_fields_given(client: Client, fake: FakeSightline) -> None:
    client.generate("hello", max_tokens=3, temperature=0.0, seed=7, stop="\n", model="tiny-lm")

    request = last_request(fake)
    assert isinstance(request, inference_pb2.GenerateRequest)
    assert request.input.WhichOneof("kind") == "prompt"
    assert request.input.prompt == "hello"
    assert request.model == "tiny-lm"
    sampling = request.sampling
    # temperature=0.0 is a real choice (greedy), so it must be sent, not dropped as falsy.
    assert [name for name in ("max_tokens", "temperature", "top_p", "top_k", "seed") if sampling.HasField(name)] == [
        "max_tokens",
        "temperature",
        "seed",
    ]
    assert (sampling.max_tokens, sampling.temperature, sampling.seed) == (3, 0.0, 7)
    assert list(sampling.stop) == ["\n"]
    assert not request.HasField("explain")
    assert request.request_id == ""


def test_chat_messages_become_the_chat_input(client: Client, fake: FakeSightline) -> None:
    client.generate([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital?"}])

    request = last_request(fake)
    assert isinstance(request, inference_pb2.GenerateRequest)
    assert request.input.WhichOneof("kind") == "chat"
    assert [(m.role, m.content) for m in request.input.chat.messages] == [
        ("system", "Be brief."),
        ("user", "Capital?"),
    ]


def test_token_ids_become_the_token_id_input(client: Client, fake: FakeSightline) -> None:
    client.generate([464, 3139, 286, 4881])

    request = last_request(fake)
    assert isinstance(request, inference_pb2.GenerateRequest)
    assert request.input.WhichOneof("kind") == "prompt_token_ids"
    assert list(request.input.prompt_token_ids.ids) == [464, 3139, 286, 4881]


@pytest.mark.parametrize("prompt", [[], [1, {"role": "user", "content": "x"}], [True, False]])
def test_ambiguous_prompts_are_refused_before_sending(
    client: Client, fake: FakeSightline, prompt: list[object]
) -> None:
    with pytest.raises(TypeError, match="prompt must be"):
        client.generate(prompt)  # type: ignore[arg-type]
    assert fake.requests == []


def test_chat_messages_must_have_exactly_role_and_content(client: Client) -> None:
    with pytest.raises(ValueError, match="exactly the keys"):
        client.generate([{"role": "user", "content": "hi", "name": "ann"}])


def test_explain_list_in_sync_mode_attaches_the_explanation(client: Client, fake: FakeSightline) -> None:
    generation = client.generate("The capital of France", explain=["saliency", "logit_lens"])

    request = last_request(fake)
    assert isinstance(request, inference_pb2.GenerateRequest)
    assert [method.name for method in request.explain.methods] == ["saliency", "logit_lens"]
    assert not request.explain.methods[0].params
    assert request.explain.mode == types_pb2.EXPLAIN_MODE_SYNC
    assert generation.explanation_id == "exp-1"
    assert generation.explanation is not None
    assert generation.explanation.state is ExplanationState.SUCCEEDED
    assert (generation.explanation.architecture, generation.explanation.explain_path) == ("llama", ExplainPath.FAST)
    assert generation.explanation.top_sources(1, k=1)[0].position == 3


def test_explain_dict_carries_parameters_and_async_mode(client: Client, fake: FakeSightline) -> None:
    generation = client.generate(
        "x", explain={"integrated_gradients": {"steps": 16, "baseline": "pad"}, "saliency": {}}, mode="async"
    )

    request = last_request(fake)
    assert isinstance(request, inference_pb2.GenerateRequest)
    assert request.explain.mode == types_pb2.EXPLAIN_MODE_ASYNC
    assert [method.name for method in request.explain.methods] == ["integrated_gradients", "saliency"]
    params = request.explain.methods[0].params
    assert {name: json_format.MessageToDict(value) for name, value in params.items()} == {
        "steps": {"intValue": 16},
        "baseline": {"stringValue": "pad"},
    }
    assert generation.explanation_id == "exp-1"
    assert generation.explanation is None


def test_parameters_travel_typed_as_the_python_values_are(client: Client, fake: FakeSightline) -> None:
    client.generate("x", explain={"m": {"n": 16, "f": 0.5, "b": True, "s": "pad"}}, mode="async")

    request = last_request(fake)
    assert isinstance(request, inference_pb2.GenerateRequest)
    kinds = {
        name: (value.WhichOneof("kind"), getattr(value, str(value.WhichOneof("kind"))))
        for name, value in request.explain.methods[0].params.items()
    }
    # A bool is never taken for an int, nor an int for a float.
    assert kinds == {
        "n": ("int_value", 16),
        "f": ("float_value", 0.5),
        "b": ("bool_value", True),
        "s": ("string_value", "pad"),
    }


def test_parameters_the_api_cannot_carry_are_refused_before_sending(client: Client, fake: FakeSightline) -> None:
    with pytest.raises(ValueError, match="parameter 'steps' of method 'ig' is 4294967296, outside the 32-bit"):
        client.generate("x", explain={"ig": {"steps": 2**32}})
    with pytest.raises(TypeError, match="parameter 'steps' of method 'ig' must be a bool, int, float or str"):
        client.generate("x", explain={"ig": {"steps": [1, 2]}})  # type: ignore[dict-item]
    assert fake.requests == []


def test_a_single_method_name_is_one_method(client: Client, fake: FakeSightline) -> None:
    client.generate("x", explain="saliency")

    request = last_request(fake)
    assert isinstance(request, inference_pb2.GenerateRequest)
    assert [method.name for method in request.explain.methods] == ["saliency"]


def test_an_unknown_mode_is_refused(client: Client) -> None:
    with pytest.raises(ValueError, match="mode must be"):
        client.generate("x", explain=["saliency"], mode="later")  # type: ignore[arg-type]


def test_generate_stream_yields_chunks_in_order(client: Client, fake: FakeSightline) -> None:
    chunks = list(client.generate_stream("The capital of France", explain=["saliency"], max_tokens=2))

    request = last_request(fake)
    assert isinstance(request, inference_pb2.GenerateRequest)
    assert request.sampling.max_tokens == 2
    assert [method.name for method in request.explain.methods] == ["saliency"]
    assert "".join(chunk.text_delta for chunk in chunks) == GENERATED_TEXT
    assert chunks[0].prompt_token_ids == (464, 3139, 286, 4881)
    assert [chunk.kind for chunk in chunks] == ["start", "delta", "delta", "end"]
    assert [chunk.finish_reason for chunk in chunks] == [None, None, None, FinishReason.LENGTH]
    assert chunks[-1].usage is not None
    assert chunks[-1].explanation is not None
    assert chunks[-1].explanation.explanation_id == "exp-1"


def test_generate_stream_starts_the_call_on_first_iteration(client: Client, fake: FakeSightline) -> None:
    chunks = client.generate_stream("x")
    assert fake.requests == []

    assert next(chunks).kind == "start"
    assert next(chunks).text_delta == " is"
    chunks.close()  # leaving early cancels the call instead of leaving it open
    assert len(fake.requests) == 1


def test_explain_rpc_sync_returns_the_explanation(client: Client, fake: FakeSightline) -> None:
    explanation = client.explain([464, 3139, 286, 4881], [318, 6342], ["saliency"], output_logprobs=[-0.25, -0.5])

    request = last_request(fake)
    assert isinstance(request, explanations_pb2.ExplainRequest)
    assert list(request.prompt_token_ids) == [464, 3139, 286, 4881]
    assert list(request.output_token_ids) == [318, 6342]
    assert list(request.output_logprobs) == [-0.25, -0.5]
    assert request.explain.mode == types_pb2.EXPLAIN_MODE_SYNC
    assert explanation.explanation_id == "exp-1"


def test_explain_rpc_async_returns_the_id(client: Client, fake: FakeSightline) -> None:
    explanation_id = client.explain([1], [2], {"saliency": {"normalize": False}}, mode="async")

    request = last_request(fake)
    assert isinstance(request, explanations_pb2.ExplainRequest)
    assert request.explain.mode == types_pb2.EXPLAIN_MODE_ASYNC
    assert request.explain.methods[0].params["normalize"].WhichOneof("kind") == "bool_value"
    assert request.explain.methods[0].params["normalize"].bool_value is False
    assert explanation_id == "exp-1"


def test_explain_and_estimate_without_methods_ask_for_the_servers_default(client: Client, fake: FakeSightline) -> None:
    client.explain([1], [2], mode="async", options=ExplainOptions(output_indices=[0]))
    request = last_request(fake)
    assert isinstance(request, explanations_pb2.ExplainRequest)
    assert list(request.explain.methods) == []
    assert list(request.explain.targets.output_indices) == [0]
    assert request.explain.mode == types_pb2.EXPLAIN_MODE_ASYNC
    estimate = estimate_request(None, 4, 2, None, "")  # what estimate_explanation() sends
    assert list(estimate.explain.methods) == [] and estimate.explain.mode == types_pb2.EXPLAIN_MODE_ASYNC
    with pytest.raises(ValueError, match="mode"):
        client.explain([1], [2], mode="later")  # type: ignore[call-overload]


def test_get_explanation_sends_the_wait(client: Client, fake: FakeSightline) -> None:
    explanation = client.get_explanation("exp-pending", wait_seconds=2.5)

    request = last_request(fake)
    assert isinstance(request, explanations_pb2.GetExplanationRequest)
    assert (request.explanation_id, request.wait_seconds) == ("exp-pending", 2.5)
    assert explanation.state is ExplanationState.RUNNING
    assert (explanation.architecture, explanation.explain_path) == ("", ExplainPath.UNSPECIFIED)  # not run yet


def test_list_methods(client: Client) -> None:
    methods = client.list_methods()

    assert (methods.model, methods.architecture, methods.explain_path) == ("tiny-lm", "llama", ExplainPath.FAST)
    assert len(methods) == 2 and methods.raw.model == "tiny-lm"
    assert [method.name for method in methods] == ["saliency", "logit_lens"]
    saliency = methods[0]
    assert saliency.attributes_tokens and saliency.needs_gradients
    assert saliency.params[0].type.value == "bool"
    assert saliency.params[0].default_value is True
    assert not methods[1].attributes_tokens


def test_list_explanations_pages_through_summaries(client: Client, fake: FakeSightline) -> None:
    first = client.list_explanations(page_size=1)
    request = last_request(fake)
    assert isinstance(request, explanations_pb2.ListExplanationsRequest)
    assert (request.page_size, request.page_token) == (1, "")
    assert [s.explanation_id for s in first.explanations] == ["exp-1"]
    listed = first.explanations[0]
    assert listed.state is ExplanationState.SUCCEEDED
    assert (listed.model, listed.methods, listed.trace_id) == ("tiny-lm", ("saliency", "logit_lens"), "trace-1")
    assert listed.created_at == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
    assert first.next_page_token == "page-2"

    second = client.list_explanations(page_size=1, page_token=first.next_page_token)
    assert [(s.explanation_id, s.state) for s in second.explanations] == [("exp-failed", ExplanationState.FAILED)]
    assert second.next_page_token == ""
    with pytest.raises(ValueError, match="page_size must be >= 0"):
        client.list_explanations(page_size=-1)


def test_tls_settings_are_checked_before_connecting(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs both client_certificate and client_key"):
        TLS(client_certificate=b"-----BEGIN CERTIFICATE-----")
    with pytest.raises(ValueError, match="tls or credentials, not both"):
        Client("127.0.0.1:1", tls=True, credentials=grpc.ssl_channel_credentials())
    (tmp_path / "ca.pem").write_bytes(b"ca")
    assert TLS.from_files(ca=tmp_path / "ca.pem", server_name="gw") == TLS(root_certificates=b"ca", server_name="gw")
    with pytest.raises(FileNotFoundError):
        TLS.from_files(ca=tmp_path / "missing.pem")


def test_the_api_key_travels_as_bearer_metadata(client: Client, fake: FakeSightline) -> None:
    client.list_methods()
    list(client.generate_stream("x"))

    assert [metadata.get("authorization") for metadata in fake.metadata] == ["Bearer secret-key"] * 2


def test_no_api_key_sends_no_authorization(fake: FakeSightline) -> None:
    with Client(fake.target) as client:
        client.list_methods()

    assert "authorization" not in fake.metadata[-1]


def test_status_errors_become_sightline_errors(client: Client) -> None:
    with pytest.raises(SightlineError) as raised:
        client.generate("")

    error = raised.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details == "prompt is empty"
    assert error.is_caller_error
    assert str(error) == "INVALID_ARGUMENT: prompt is empty"
    assert isinstance(error.__cause__, grpc.RpcError)


def test_not_found_is_a_caller_error(client: Client) -> None:
    with pytest.raises(SightlineError) as raised:
        client.get_explanation("exp-missing")

    assert raised.value.code == grpc.StatusCode.NOT_FOUND
    assert raised.value.is_caller_error


def test_an_unreachable_server_is_unavailable() -> None:
    with Client("127.0.0.1:1", timeout=5) as client, pytest.raises(SightlineError) as raised:
        client.list_methods()

    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert not raised.value.is_caller_error


def test_a_malformed_response_is_an_internal_error(client: Client) -> None:
    with pytest.raises(SightlineError) as raised:
        client.generate("malformed", explain=["saliency"])

    assert raised.value.code == grpc.StatusCode.INTERNAL
    assert "malformed response" in raised.value.details
    assert isinstance(raised.value.__cause__, ValueError)


EVERY_OPTION = ExplainOptions(
    output_indices=[0, 1],
    foil_token_ids=[7],
    score="logit",
    granularity="span",
    spans=[(0, 2, "subject"), (2, 4, "")],
    absolute=True,
    normalization="max_abs",
    faithfulness=True,
    step_scores_top_k=3,
)
EVERY_OPTION_SPEC = types_pb2.ExplainSpec(
    methods=[types_pb2.MethodSpec(name="saliency")],
    mode=types_pb2.EXPLAIN_MODE_SYNC,
    targets=types_pb2.TargetSpec(output_indices=[0, 1], foil_token_ids=[7], score=types_pb2.TARGET_SCORE_LOGIT),
    aggregation=types_pb2.AggregationSpec(
        granularity=types_pb2.GRANULARITY_SPAN,
        spans=[types_pb2.Span(start=0, end=2, label="subject"), types_pb2.Span(start=2, end=4)],
        absolute=True,
        normalization=types_pb2.NORMALIZATION_MAX_ABS,
    ),
    faithfulness=True,
    step_scores_top_k=3,
)


def test_explain_options_fill_every_field_of_the_spec(client: Client, fake: FakeSightline) -> None:
    client.generate("x", explain="saliency", options=EVERY_OPTION)

    request = last_request(fake)
    assert isinstance(request, inference_pb2.GenerateRequest)
    assert request.explain == EVERY_OPTION_SPEC


def test_stream_and_explain_send_the_options_too(client: Client, fake: FakeSightline) -> None:
    list(client.generate_stream("x", explain="saliency", options=EVERY_OPTION))
    stream_request = last_request(fake)
    client.explain([1, 2], [3, 4], ["saliency"], options=EVERY_OPTION)
    explain_request = last_request(fake)

    assert isinstance(stream_request, inference_pb2.GenerateRequest)
    assert isinstance(explain_request, explanations_pb2.ExplainRequest)
    assert stream_request.explain == explain_request.explain == EVERY_OPTION_SPEC


def test_default_options_are_sent_explicitly_but_leave_step_scores_top_k_unset(
    client: Client, fake: FakeSightline
) -> None:
    client.generate("x", explain="saliency", options=ExplainOptions())

    request = last_request(fake)
    assert isinstance(request, inference_pb2.GenerateRequest)
    assert request.explain.targets == types_pb2.TargetSpec(score=types_pb2.TARGET_SCORE_LOGPROB)
    assert request.explain.aggregation == types_pb2.AggregationSpec(
        granularity=types_pb2.GRANULARITY_TOKEN, normalization=types_pb2.NORMALIZATION_NONE
    )
    assert not request.explain.faithfulness
    assert not request.explain.HasField("step_scores_top_k")


def test_no_options_leave_targets_and_aggregation_unset(client: Client, fake: FakeSightline) -> None:
    client.generate("x", explain="saliency")

    request = last_request(fake)
    assert isinstance(request, inference_pb2.GenerateRequest)
    assert not request.explain.HasField("targets")
    assert not request.explain.HasField("aggregation")


def test_options_without_methods_are_refused_before_sending(client: Client, fake: FakeSightline) -> None:
    with pytest.raises(ValueError, match="at least one method"):
        client.generate("x", options=ExplainOptions(faithfulness=True))
    assert fake.requests == []


def test_the_explanation_carries_what_the_options_asked_for(client: Client) -> None:
    options = ExplainOptions(foil_token_ids=[7], score="probability", granularity="word", faithfulness=True)
    generation = client.generate("x", explain="saliency", options=options)

    explanation = generation.explanation
    assert explanation is not None
    assert explanation.foil_token_ids == (7, 7)
    assert explanation.target_score is TargetScore.PROBABILITY
    assert explanation.source_groups[:2] == (SourceGroup(0, 2, ""), SourceGroup(2, 4, "where"))
    saliency = explanation.result("saliency")
    assert saliency.aggregated is not None
    assert saliency.aggregated.tolist() == AGGREGATED
    assert saliency.faithfulness is not None
    assert saliency.faithfulness.aopc_comprehensiveness == FAITHFULNESS.aopc_comprehensiveness
    assert explanation.top_groups(0, k=1) == [(SourceGroup(2, 4, "where"), 0.625)]
    assert explanation.step_scores is not None
    assert explanation.step_scores.ranks == (1, 2)


def test_list_methods_reads_bounds_and_choices(client: Client) -> None:
    params = {param.name: param for param in client.list_methods()[0].params}

    assert (params["steps"].minimum, params["steps"].maximum, params["steps"].choices) == (1.0, 256.0, ())
    assert (params["scale"].minimum, params["scale"].maximum) == (0.5, None)
    assert (params["normalize"].minimum, params["normalize"].maximum) == (None, None)
    assert params["baseline"].choices == ("pad", "zero", "mask")
