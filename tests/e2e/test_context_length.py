"""A generation the context window cuts short says so: FINISH_REASON_CONTEXT_LENGTH, not a silent LENGTH."""

from __future__ import annotations

import grpc
import pytest
from sightline import Client, FinishReason
from sightline.v1 import inference_pb2, inference_pb2_grpc, types_pb2

from deploy.local_stack import LocalStack

pytestmark = pytest.mark.e2e

CONTEXT_WINDOW = 2048
# 2,040 prompt tokens leave room for 8 of the 100 asked for.
LONG_PROMPT = [1000 + i % 3000 for i in range(2040)]
MAX_TOKENS = 100


def test_generate_says_the_context_window_ended_it(inference: inference_pb2_grpc.InferenceServiceStub) -> None:
    """Regression (issue 13): vLLM cuts max_tokens to what the window leaves and says "length"; the gateway
    answered LENGTH with 8 of 100 tokens, which reads as "max_tokens reached"."""
    response = inference.Generate(
        inference_pb2.GenerateRequest(
            input=inference_pb2.GenerationInput(prompt_token_ids=types_pb2.TokenIds(ids=LONG_PROMPT)),
            sampling=types_pb2.SamplingParams(max_tokens=MAX_TOKENS),
        ),
        timeout=120,
    )
    assert len(response.output_tokens) == CONTEXT_WINDOW - len(LONG_PROMPT)
    assert response.finish_reason == types_pb2.FINISH_REASON_CONTEXT_LENGTH


def test_stream_and_sdk_say_so_too(inference: inference_pb2_grpc.InferenceServiceStub, stack: LocalStack) -> None:
    chunks = list(
        inference.GenerateStream(
            inference_pb2.GenerateRequest(
                input=inference_pb2.GenerationInput(prompt_token_ids=types_pb2.TokenIds(ids=LONG_PROMPT)),
                sampling=types_pb2.SamplingParams(max_tokens=MAX_TOKENS),
            ),
            timeout=120,
        )
    )
    assert chunks[-1].end.finish_reason == types_pb2.FINISH_REASON_CONTEXT_LENGTH
    with Client(stack.config.gateway_address) as client:
        generation = client.generate(LONG_PROMPT, max_tokens=MAX_TOKENS)
        short = client.generate(LONG_PROMPT[:16], max_tokens=2)
    assert generation.finish_reason == FinishReason.CONTEXT_LENGTH
    # max_tokens itself reached, with the window far from full: still LENGTH.
    assert short.finish_reason == FinishReason.LENGTH


def test_a_prompt_that_fills_the_window_is_still_refused(inference: inference_pb2_grpc.InferenceServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        inference.Generate(
            inference_pb2.GenerateRequest(
                input=inference_pb2.GenerationInput(prompt_token_ids=types_pb2.TokenIds(ids=LONG_PROMPT + [1000] * 8)),
                sampling=types_pb2.SamplingParams(max_tokens=MAX_TOKENS),
            ),
            timeout=60,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must leave room for at least one generated token" in caught.value.details()
