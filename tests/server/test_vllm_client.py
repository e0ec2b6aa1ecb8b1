"""The vLLM client's stream parsing and error mapping, against a local HTTP server that sends vLLM's
shapes in reads of our choosing (tests/e2e/test_generation.py covers the same paths on real vLLM)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from aiohttp import web

from deploy.local_stack import free_port
from server.errors import GatewayError
from server.vllm_client import CompletionChunk, Sampling, VLLMClient

SAMPLING = Sampling(max_tokens=3, temperature=0.0, top_p=1.0)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def sse(event: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def token_event(token_id: int, text: str, *, prompt: list[int] | None = None, finish: str | None = None) -> bytes:
    choice: dict[str, Any] = {
        "index": 0,
        "text": text,
        "logprobs": {"tokens": [text], "token_logprobs": [-0.25 * token_id]},
        "finish_reason": finish,
        "token_ids": [token_id],
    }
    if prompt is not None:
        choice["prompt_token_ids"] = prompt
    return sse({"id": "cmpl-1", "choices": [choice]})


USAGE = sse({"id": "cmpl-1", "choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 3}})


async def pause() -> None:
    """Long enough that the client reads what was sent before the next write arrives."""
    await asyncio.sleep(0.05)


async def bursty_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    first = token_event(1, "A", prompt=[7, 8])
    # The first event split mid-JSON across two reads.
    await response.write(first[:20])
    await pause()
    await response.write(first[20:])
    await pause()
    # Two events in one write: one read, so one chunk.
    await response.write(token_event(2, "b") + token_event(3, "c", finish="length"))
    await pause()
    await response.write(USAGE + b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def rejects(request: web.Request) -> web.StreamResponse:
    return web.json_response({"error": {"message": "max_tokens is too large"}}, status=400)


async def fails(request: web.Request) -> web.StreamResponse:
    return web.Response(text="engine dead", status=500)


@pytest.fixture
async def vllm_url() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    runners: list[web.AppRunner] = []

    async def serve(handler: Handler) -> str:
        app = web.Application()
        app.router.add_post("/v1/completions", handler)
        app.router.add_post("/v1/chat/completions", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        return f"http://127.0.0.1:{port}"

    yield serve
    for runner in runners:
        await runner.cleanup()


async def stream_chunks(url: str) -> list[CompletionChunk]:
    client = VLLMClient(url)
    try:
        return [chunk async for chunk in client.complete_stream("m", [7, 8], SAMPLING, timeout=10)]
    finally:
        await client.aclose()


async def test_stream_keeps_every_token_in_order_and_joins_events_read_together(
    vllm_url: Callable[[Handler], Awaitable[str]],
) -> None:
    chunks = await stream_chunks(await vllm_url(bursty_stream))
    with_tokens = [chunk for chunk in chunks if chunk.token_ids]
    assert [chunk.token_ids for chunk in with_tokens] == [[1], [2, 3]]
    assert [chunk.token_texts for chunk in with_tokens] == [["A"], ["b", "c"]]
    assert [chunk.logprobs for chunk in with_tokens] == [[-0.25], [-0.5, -0.75]]
    assert [chunk.text for chunk in with_tokens] == ["A", "bc"]
    assert chunks[0].prompt_token_ids == [7, 8]
    assert all(chunk.prompt_token_ids is None for chunk in chunks[1:])
    assert with_tokens[-1].finish_reason == "length"
    assert (chunks[-1].input_tokens, chunks[-1].output_tokens) == (2, 3)


def chat_event(token_id: int, text: str, *, finish: str | None = None) -> bytes:
    choice: dict[str, Any] = {
        "index": 0,
        "delta": {"content": text},
        "logprobs": {"content": [{"token": text, "logprob": -0.25 * token_id}]},
        "finish_reason": finish,
        "token_ids": [token_id],
    }
    return sse({"id": "chatcmpl-1", "choices": [choice]})


async def chat_stream(request: web.Request) -> web.StreamResponse:
    """vLLM's chat stream: the prompt's ids at the top level of a first event with the role and no token."""
    body = await request.json()
    assert body["stream"] and body["logprobs"] is True and body["messages"][0]["role"] == "user"
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    first = sse(
        {"id": "chatcmpl-1", "prompt_token_ids": [7, 8, 9], "choices": [{"index": 0, "delta": {"role": "assistant"}}]}
    )
    await response.write(first[:15])
    await pause()
    await response.write(first[15:] + chat_event(1, "Red"))
    await pause()
    await response.write(chat_event(2, ".", finish="length") + USAGE + b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def test_a_chat_stream_keeps_the_prompt_ids_tokens_texts_and_logprobs(
    vllm_url: Callable[[Handler], Awaitable[str]],
) -> None:
    client = VLLMClient(await vllm_url(chat_stream))
    messages = [{"role": "user", "content": [{"type": "text", "text": "What colour?"}]}]
    try:
        chunks = [chunk async for chunk in client.chat_complete_stream("m", messages, SAMPLING, timeout=10)]
    finally:
        await client.aclose()
    assert chunks[0].prompt_token_ids == [7, 8, 9]
    assert [token for chunk in chunks for token in chunk.token_ids] == [1, 2]
    assert [text for chunk in chunks for text in chunk.token_texts] == ["Red", "."]
    assert [logprob for chunk in chunks for logprob in chunk.logprobs] == [-0.25, -0.5]
    assert "".join(chunk.text for chunk in chunks) == "Red."
    assert chunks[-1].finish_reason == "length" and (chunks[-1].input_tokens, chunks[-1].output_tokens) == (2, 3)


@pytest.mark.parametrize(
    ("handler", "code", "message"),
    [
        (rejects, grpc.StatusCode.INVALID_ARGUMENT, "vLLM rejected the request: max_tokens is too large"),
        (fails, grpc.StatusCode.UNAVAILABLE, "vLLM failed with HTTP 500: vLLM rejected the request: engine dead"),
    ],
)
async def test_stream_maps_http_errors_to_grpc_statuses(
    vllm_url: Callable[[Handler], Awaitable[str]], handler: Handler, code: grpc.StatusCode, message: str
) -> None:
    with pytest.raises(GatewayError) as caught:
        await stream_chunks(await vllm_url(handler))
    assert (caught.value.code, caught.value.message) == (code, message)


async def test_unreachable_backend_is_unavailable() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(GatewayError) as caught:
        await stream_chunks(url)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert f"the vLLM backend at {url} is unreachable" in caught.value.message


SILENCE_S = 0.3


async def never_answers(request: web.Request) -> web.StreamResponse:
    await asyncio.sleep(5 * SILENCE_S)  # then the client has long given up
    return web.Response(text="too late")


async def stalls_after_one_token(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    await response.write(token_event(1, "A", prompt=[7, 8]))
    await asyncio.sleep(5 * SILENCE_S)
    return response


@pytest.mark.parametrize("handler", [never_answers, stalls_after_one_token])
async def test_a_backend_gone_silent_fails_the_call_even_without_a_deadline(
    vllm_url: Callable[[Handler], Awaitable[str]], handler: Handler
) -> None:
    url = await vllm_url(handler)
    client = VLLMClient(url, silence_timeout=SILENCE_S)
    received: list[CompletionChunk] = []
    try:
        with pytest.raises(GatewayError) as streamed:
            async for chunk in client.complete_stream("m", [7, 8], SAMPLING, timeout=None):
                received.append(chunk)
        with pytest.raises(GatewayError) as unary:
            await client.complete("m", [7, 8], SAMPLING, timeout=None)
    finally:
        await client.aclose()
    assert [chunk.token_ids for chunk in received] == ([[1]] if handler is stalls_after_one_token else [])
    for caught in (streamed, unary):
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        assert f"the vLLM backend at {url} sent nothing for 0.3 s" in caught.value.message


async def test_a_caller_deadline_shorter_than_the_silence_limit_is_deadline_exceeded(
    vllm_url: Callable[[Handler], Awaitable[str]],
) -> None:
    client = VLLMClient(await vllm_url(never_answers), silence_timeout=60)
    try:
        with pytest.raises(GatewayError) as caught:
            await client.complete("m", [7, 8], SAMPLING, timeout=SILENCE_S)
    finally:
        await client.aclose()
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
