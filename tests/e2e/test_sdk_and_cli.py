"""The Python SDK and the `sightline` CLI against the real stack, as the README shows them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sightline import AsyncClient, Client, ExplanationState, SightlineError, TokenRole

from deploy.local_stack import LocalStack

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_sdk_generate_with_explanation(stack: LocalStack) -> None:
    with Client(stack.config.gateway_address, timeout=300) as client:
        generation = client.generate(QUESTION, max_tokens=16, explain=["input_x_gradient"])
    assert "Paris" in generation.text
    explanation = generation.explanation
    assert explanation is not None and explanation.state == ExplanationState.SUCCEEDED
    assert [t.id for t in explanation.tokens[explanation.prompt_length :]] == [t.id for t in generation.output_tokens]
    paris = next(i for i, p in enumerate(explanation.target_positions) if explanation.tokens[p].text == " Paris")
    sources = explanation.top_sources(paris, k=3)
    assert len(sources) == 3
    assert all(s.position < explanation.target_positions[paris] for s in sources)
    scores = [abs(s.score) for s in sources]
    assert scores == sorted(scores, reverse=True)
    assert explanation.fidelity is not None and explanation.fidelity.max_abs_logprob_diff < 0.02
    # Ranked within the user's own words: the strongest of the question's tokens, none of the chat template's.
    in_question = explanation.top_sources(paris, k=3, content_only=True)
    assert [s.token.role for s in in_question] == [TokenRole.USER] * 3
    row = explanation.attributions().row(paris)
    question = [p for p, t in enumerate(explanation.tokens) if t.message_index == 0]
    expected = sorted(question, key=lambda p: abs(row[p]), reverse=True)[:3]
    assert [s.position for s in in_question] == expected


def test_sdk_async_mode_streaming_and_errors(stack: LocalStack) -> None:
    with Client(stack.config.gateway_address, timeout=300) as client:
        generation = client.generate(QUESTION, max_tokens=8, explain=["logit_lens"], mode="async")
        assert generation.explanation is None and generation.explanation_id
        fetched = client.get_explanation(generation.explanation_id, wait_seconds=120)
        assert fetched.state == ExplanationState.SUCCEEDED
        chunks = list(client.generate_stream(QUESTION, max_tokens=8))
        assert "".join(c.text_delta for c in chunks) == generation.text
        with pytest.raises(SightlineError) as caught:
            client.generate(QUESTION, explain=["no_such_method"])
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_async_client(stack: LocalStack) -> None:
    async with AsyncClient(stack.config.gateway_address, timeout=300) as client:
        generation = await client.generate(QUESTION, max_tokens=8)
        streamed = [chunk async for chunk in client.generate_stream(QUESTION, max_tokens=8)]
        methods = await client.list_methods()
    assert "".join(c.text_delta for c in streamed) == generation.text
    assert {"input_x_gradient", "logit_lens"} <= {m.name for m in methods}


def _cli(stack: LocalStack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "sightline"), "--target", stack.config.gateway_address, *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_cli_generate_explain_and_fetch(stack: LocalStack) -> None:
    shown = _cli(stack, "generate", "--explain", "input_x_gradient", "--top", "2", "What is the capital of France?")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("The capital of France is Paris.")
    assert "succeeded" in shown.stdout and "' Paris'" in shown.stdout
    # A chat prompt's sources are ranked within the user's message, and the summary says so.
    assert "top 2 sources within your messages" in shown.stdout
    assert "<|im_start|>" not in shown.stdout

    as_json = _cli(stack, "generate", "--json", "--explain", "input_x_gradient", "What is the capital of France?")
    response = json.loads(as_json.stdout)
    assert response["explanation"]["state"] == "EXPLANATION_STATE_SUCCEEDED"
    assert response["explanation"]["results"][0]["attributions"]["shape"][0] == len(response["outputTokens"])

    queued = _cli(stack, "generate", "--async", "--explain", "input_x_gradient", "--json", "Hello!")
    explanation_id = json.loads(queued.stdout)["explanationId"]
    fetched = _cli(stack, "explain", explanation_id, "--wait", "120")
    assert fetched.returncode == 0, fetched.stderr
    assert f"explanation {explanation_id}: succeeded" in fetched.stdout

    missing = _cli(stack, "explain", "exp_missing")
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: NOT_FOUND: no explanation with id 'exp_missing'")


def test_cli_params_reach_the_method_and_the_server_refuses_a_wrong_one(stack: LocalStack) -> None:
    question = "What is the capital of France?"
    windowed = _cli(stack, "generate", "--json", "--explain", "occlusion", "--param", "occlusion.window=4", question)
    assert windowed.returncode == 0, windowed.stderr
    result = json.loads(windowed.stdout)["explanation"]["results"][0]
    assert result["method"] == "occlusion"
    # Window 4 replaces the spans [0, 4), [4, 8), ... together: every token of a span gets the span's score.
    last_row = result["attributions"]["floatValues"][-result["attributions"]["shape"][1] :]
    spans = [last_row[start : start + 4] for start in range(0, 32, 4)]
    assert all(len(set(span)) == 1 for span in spans), spans
    assert len({span[0] for span in spans}) > 1

    unknown = _cli(stack, "generate", "--explain", "occlusion", "--param", "occlusion.windows=4", question)
    assert unknown.returncode == 2
    assert "is not a parameter of method 'occlusion'" in unknown.stderr and "window" in unknown.stderr


def test_reflection_lists_the_services(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    services = {s.name for r in responses for s in r.list_services_response.service}
    assert {
        "sightline.v1.InferenceService",
        "sightline.v1.ExplanationsService",
        "grpc.health.v1.Health",
    } <= services


@pytest.mark.parametrize("protocol", ["grpc-v1", "grpc-v1alpha"])
def test_reflection_answers_both_protocols(stack: LocalStack, protocol: str) -> None:
    # buf curl speaks only the reflection protocol it is told to; clients on newer gRPC libraries ask v1.
    listed = subprocess.run(
        [
            str(Path(sys.executable).parent / "buf"),
            "curl",
            "--protocol=grpc",
            "--http2-prior-knowledge",
            f"--reflect-protocol={protocol}",
            "--list-methods",
            f"http://{stack.config.gateway_address}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    assert {"sightline.v1.InferenceService/Generate", "sightline.v1.ExplanationsService/ListMethods"} <= set(
        listed.stdout.split()
    )
