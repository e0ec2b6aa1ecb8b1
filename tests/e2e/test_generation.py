"""Generation through the gateway on the real stack (vLLM CPU, SmolLM2-135M-Instruct)."""

from __future__ import annotations

import time

import grpc
import pytest
from sightline.v1 import inference_pb2, inference_pb2_grpc, types_pb2

from deploy.local_stack import LocalStack
from tests.vllm_metrics import requests_running

pytestmark = pytest.mark.e2e

FRANCE = types_pb2.ChatMessages(messages=[types_pb2.ChatMessage(role="user", content="What is the capital of France?")])


def test_france_question_is_answered_with_paris(inference: inference_pb2_grpc.InferenceServiceStub) -> None:
    response = inference.Generate(
        inference_pb2.GenerateRequest(
            input=inference_pb2.GenerationInput(chat=FRANCE),
            sampling=types_pb2.SamplingParams(max_tokens=24),
            request_id="france-1",
        ),
        timeout=120,
    )
    assert "Paris" in response.text
    assert response.request_id == "france-1"
    assert len(response.trace_id) == 32
    assert response.model == "smollm2-135m-instruct"
    assert response.finish_reason in (types_pb2.FINISH_REASON_STOP, types_pb2.FINISH_REASON_LENGTH)
    assert response.usage.input_tokens == len(response.prompt_token_ids) > 0
    assert response.usage.output_tokens == len(response.output_tokens) > 0
    # Every generated token carries its id, its text and the engine's log-probability.
    assert "".join(t.text for t in response.output_tokens).strip() in response.text.strip() + "<|im_end|>"
    assert all(t.HasField("logprob") and t.logprob <= 0.0 for t in response.output_tokens)
    assert not response.explanation_id


def test_token_id_prompt_is_used_verbatim(inference: inference_pb2_grpc.InferenceServiceStub) -> None:
    first = inference.Generate(
        inference_pb2.GenerateRequest(
            input=inference_pb2.GenerationInput(prompt="The capital of France is"),
            sampling=types_pb2.SamplingParams(max_tokens=4),
        ),
        timeout=60,
    )
    again = inference.Generate(
        inference_pb2.GenerateRequest(
            input=inference_pb2.GenerationInput(prompt_token_ids=types_pb2.TokenIds(ids=first.prompt_token_ids)),
            sampling=types_pb2.SamplingParams(max_tokens=4),
        ),
        timeout=60,
    )
    assert list(again.prompt_token_ids) == list(first.prompt_token_ids)
    # Greedy decoding of the same ids gives the same tokens.
    assert [t.id for t in again.output_tokens] == [t.id for t in first.output_tokens]
    assert again.finish_reason == types_pb2.FINISH_REASON_LENGTH


def test_stream_yields_the_same_tokens_as_unary(inference: inference_pb2_grpc.InferenceServiceStub) -> None:
    sampling = types_pb2.SamplingParams(max_tokens=12)
    unary = inference.Generate(
        inference_pb2.GenerateRequest(input=inference_pb2.GenerationInput(chat=FRANCE), sampling=sampling), timeout=60
    )
    chunks = list(
        inference.GenerateStream(
            inference_pb2.GenerateRequest(input=inference_pb2.GenerationInput(chat=FRANCE), sampling=sampling),
            timeout=60,
        )
    )
    assert len(chunks) >= 3, "tokens should arrive incrementally, not in one message"
    events = [chunk.WhichOneof("event") for chunk in chunks]
    assert events == ["start", *["delta"] * (len(chunks) - 2), "end"]
    streamed = [t for chunk in chunks for t in chunk.delta.output_tokens]
    assert [t.id for t in streamed] == [t.id for t in unary.output_tokens]
    assert "".join(c.delta.text_delta for c in chunks) == unary.text
    assert list(chunks[0].start.prompt_token_ids) == list(unary.prompt_token_ids)
    assert chunks[0].start.model == unary.model
    final = chunks[-1].end
    assert final.finish_reason == unary.finish_reason
    assert final.usage.output_tokens == len(streamed)
    assert len({c.trace_id for c in chunks}) == 1


def test_cancelling_a_stream_aborts_the_upstream_request(
    inference: inference_pb2_grpc.InferenceServiceStub, stack: LocalStack
) -> None:
    call = inference.GenerateStream(
        inference_pb2.GenerateRequest(
            input=inference_pb2.GenerationInput(prompt="Count from one to one thousand:"),
            sampling=types_pb2.SamplingParams(max_tokens=1000),
        ),
        timeout=120,
    )
    first = next(call)
    assert first.trace_id
    call.cancel()
    with pytest.raises(grpc.RpcError) as caught:
        list(call)
    assert caught.value.code() == grpc.StatusCode.CANCELLED
    # 1,000 tokens take vLLM over 40 s here; an aborted request leaves the engine within seconds.
    deadline = time.monotonic() + 10
    while requests_running(stack.config.vllm_url) > 0:
        assert time.monotonic() < deadline, "vLLM still runs the cancelled request"
        time.sleep(0.2)
    # The gateway is still healthy and serves the next request.
    after = inference.Generate(
        inference_pb2.GenerateRequest(
            input=inference_pb2.GenerationInput(prompt="Hello"), sampling=types_pb2.SamplingParams(max_tokens=2)
        ),
        timeout=60,
    )
    assert len(after.output_tokens) == 2


def test_deadline_is_honoured_and_aborts_upstream(
    inference: inference_pb2_grpc.InferenceServiceStub, stack: LocalStack
) -> None:
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        inference.Generate(
            inference_pb2.GenerateRequest(
                input=inference_pb2.GenerationInput(prompt="Count from one to one thousand:"),
                sampling=types_pb2.SamplingParams(max_tokens=1000),
            ),
            timeout=2,
        )
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 10
    deadline = time.monotonic() + 10
    while requests_running(stack.config.vllm_url) > 0:
        assert time.monotonic() < deadline, "vLLM still runs the request whose deadline passed"
        time.sleep(0.2)
