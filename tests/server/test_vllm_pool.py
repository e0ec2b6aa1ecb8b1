"""Routing over several vLLM replicas (server/vllm_pool.py), against real local HTTP servers speaking vLLM's
shapes: least outstanding requests, health, failover before the first token, UNAVAILABLE after it, DNS
membership. tests/faults/test_vllm_replicas.py kills a real replica process under a real gateway."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from aiohttp import web

from deploy.local_stack import free_port
from server.errors import ConfigError, GatewayError
from server.vllm_client import Sampling
from server.vllm_pool import ReplicaSource, VLLMPool

SAMPLING = Sampling(max_tokens=3, temperature=0.0, top_p=1.0)


def sse(event: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def completion(token_ids: list[int]) -> dict[str, Any]:
    texts = [f"t{token}" for token in token_ids]
    return {
        "id": "cmpl-1",
        "choices": [
            {
                "index": 0,
                "text": "".join(texts),
                "logprobs": {"tokens": texts, "token_logprobs": [-0.5] * len(texts)},
                "finish_reason": "length",
                "prompt_token_ids": [7, 8],
                "token_ids": token_ids,
            }
        ],
        "usage": {"prompt_tokens": 2, "completion_tokens": len(token_ids)},
    }


@dataclass
class Replica:
    """A local HTTP server answering like one vLLM replica, whose behaviour a test sets."""

    # Token ids this replica generates: tells which replica answered.
    token: int
    host: str = "127.0.0.1"
    port: int = 0
    health_status: int = 200
    # "ok", "http500" (fails before any token), "drop_after_first" (one token, then the connection is cut)
    mode: str = "ok"
    # Completions wait for this, when set, so a test can hold calls outstanding.
    hold: asyncio.Event | None = None
    completions: int = 0
    running: int = 0
    runner: web.AppRunner | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_post("/v1/completions", self._complete)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        self.port = self.port or free_port()
        await web.TCPSite(self.runner, self.host, self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def _health(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({}, status=self.health_status)

    async def _models(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"data": [{"id": "m", "max_model_len": 2048}]})

    async def _tokenize(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"tokens": [self.token]})

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        self.completions += 1
        self.running += 1
        try:
            if self.hold is not None:
                await self.hold.wait()
            body = await request.json()
            if self.mode == "http500":
                return web.Response(text="engine dead", status=500)
            if body.get("max_tokens") == 999:
                return web.json_response({"error": {"message": "max_tokens is too large"}}, status=400)
            tokens = [self.token] * 3
            if not body["stream"]:
                return web.json_response(completion(tokens))
            response = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await response.prepare(request)
            for index, token in enumerate(tokens):
                event = completion([token])
                if index:
                    del event["choices"][0]["prompt_token_ids"]
                await response.write(sse(event))
                if self.mode == "drop_after_first":
                    await asyncio.sleep(0.05)
                    assert request.transport is not None
                    request.transport.abort()
                    return response
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        finally:
            self.running -= 1


@pytest.fixture
async def replicas() -> AsyncIterator[list[Replica]]:
    started: list[Replica] = []
    for token in (1, 2):
        replica = Replica(token=token)
        await replica.start()
        started.append(replica)
    yield started
    for replica in started:
        await replica.stop()


@pytest.fixture
async def pool(replicas: list[Replica]) -> AsyncIterator[VLLMPool]:
    opened = VLLMPool(",".join(replica.url for replica in replicas))
    yield opened
    await opened.aclose()


async def generated_by(pool: VLLMPool) -> int:
    """Which replica's token a unary completion came back with."""
    chunk = await pool.complete("m", [7, 8], SAMPLING, timeout=10)
    return chunk.token_ids[0]


async def test_calls_go_to_the_replica_with_fewest_outstanding(pool: VLLMPool, replicas: list[Replica]) -> None:
    first, second = replicas
    # An idle pool spreads calls over both replicas.
    assert {await generated_by(pool) for _ in range(4)} == {1, 2}
    first.hold, second.hold = asyncio.Event(), asyncio.Event()
    held = [asyncio.create_task(generated_by(pool)) for _ in range(4)]
    await _until(lambda: first.running + second.running == 4)
    assert (first.running, second.running) == (2, 2)
    second.hold.set()
    await _until(lambda: second.running == 0)
    # The first replica still holds two calls, the second none: the next three all go to the second.
    assert [await generated_by(pool) for _ in range(3)] == [2, 2, 2]
    first.hold.set()
    assert sorted([await task for task in held]) == [1, 1, 2, 2]


async def test_a_replica_failing_health_gets_no_calls_until_it_passes_again(
    pool: VLLMPool, replicas: list[Replica]
) -> None:
    first, _ = replicas
    first.health_status = 503
    assert await pool.healthy()
    assert [replica.healthy for replica in pool.replicas] == [False, True]
    assert {await generated_by(pool) for _ in range(6)} == {2}
    assert first.completions == 0
    first.health_status = 200
    assert await pool.healthy()
    assert {await generated_by(pool) for _ in range(6)} == {1, 2}


async def test_with_no_replica_healthy_each_is_still_tried(pool: VLLMPool, replicas: list[Replica]) -> None:
    """Health marks may be stale: with none healthy a call tries them all, and one that answers serves it."""
    for replica in replicas:
        replica.health_status = 503
    assert not await pool.healthy()
    assert await generated_by(pool) in (1, 2)
    await replicas[0].stop()
    await replicas[1].stop()
    with pytest.raises(GatewayError) as raised:
        await generated_by(pool)
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert "is unreachable" in raised.value.message and "tried 2 of 2 vLLM replicas" in raised.value.message


async def test_one_dead_replica_fails_calls_with_its_own_error(replicas: list[Replica]) -> None:
    """A single replica: the pool adds nothing to the error a plain client of it would give."""
    await replicas[0].stop()
    pool = VLLMPool(replicas[0].url)
    try:
        for _ in range(2):  # the second call finds it marked out of routing, and still tries it
            with pytest.raises(GatewayError) as raised:
                await generated_by(pool)
            assert raised.value.code == grpc.StatusCode.UNAVAILABLE
            assert raised.value.message.startswith(f"the vLLM backend at {replicas[0].url} is unreachable")
            assert raised.value.message.endswith("retry in a few seconds")
    finally:
        await pool.aclose()


async def test_an_empty_dns_answer_fails_unavailable() -> None:
    async def nothing(host: str, port: int) -> list[str]:
        return []

    pool = VLLMPool("dns+http://vllm-headless:8000", resolve=nothing)
    try:
        assert not await pool.healthy()
        with pytest.raises(GatewayError) as raised:
            await generated_by(pool)
        assert raised.value.code == grpc.StatusCode.UNAVAILABLE
        assert "no vLLM replica resolved from dns+http://vllm-headless:8000" in raised.value.message
    finally:
        await pool.aclose()


async def test_a_unary_call_on_a_dead_replica_is_retried_on_another(pool: VLLMPool, replicas: list[Replica]) -> None:
    first, second = replicas
    await first.stop()
    # Both still count as healthy (no probe since), so some calls are routed to the dead one first.
    results = [await generated_by(pool) for _ in range(4)]
    assert results == [2, 2, 2, 2]
    assert second.completions == 4
    assert [replica.healthy for replica in pool.replicas] == [False, True]
    assert "unreachable" in pool.replicas[0].failure


async def test_a_stream_that_fails_before_its_first_token_moves_to_another_replica(
    pool: VLLMPool, replicas: list[Replica]
) -> None:
    first, second = replicas
    first.mode = "http500"
    for _ in range(2):
        chunks = [chunk async for chunk in pool.complete_stream("m", [7, 8], SAMPLING, timeout=10)]
        assert [token for chunk in chunks for token in chunk.token_ids] == [2, 2, 2]
    assert first.completions == 1  # tried once, then out of routing
    assert second.completions == 2


async def test_a_stream_that_fails_after_sending_tokens_fails_unavailable_without_retry(
    pool: VLLMPool, replicas: list[Replica]
) -> None:
    first, second = replicas
    first.mode = "drop_after_first"
    second.health_status = 503
    assert await pool.healthy()
    second.health_status = 200
    received: list[int] = []
    with pytest.raises(GatewayError) as raised:
        async for chunk in pool.complete_stream("m", [7, 8], SAMPLING, timeout=10):
            received += chunk.token_ids
    assert received == [1]
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert "had sent 1 tokens and cannot resume on another replica" in raised.value.message
    assert second.completions == 0


async def test_every_replica_failing_fails_unavailable_after_trying_each_once(
    pool: VLLMPool, replicas: list[Replica]
) -> None:
    for replica in replicas:
        replica.mode = "http500"
    with pytest.raises(GatewayError) as raised:
        await generated_by(pool)
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert "tried 2 of 2 vLLM replicas" in raised.value.message
    assert [replica.completions for replica in replicas] == [1, 1]


async def test_a_rejected_request_is_not_retried(pool: VLLMPool, replicas: list[Replica]) -> None:
    with pytest.raises(GatewayError) as raised:
        await pool.complete("m", [7, 8], Sampling(max_tokens=999, temperature=0.0, top_p=1.0), timeout=10)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert sum(replica.completions for replica in replicas) == 1
    assert all(replica.healthy for replica in pool.replicas)


async def test_a_headless_service_name_resolves_to_one_replica_per_address() -> None:
    port = free_port()
    loopback, second = Replica(token=1, port=port), Replica(token=2, host="127.0.0.2", port=port)
    await loopback.start()
    await second.start()
    answer = ["127.0.0.1"]

    async def resolve(host: str, resolved_port: int) -> list[str]:
        assert (host, resolved_port) == ("vllm-headless.sightline.svc", port)
        return list(answer)

    pool = VLLMPool(f"dns+http://vllm-headless.sightline.svc:{port}", resolve=resolve)
    try:
        assert await pool.healthy()
        assert [replica.url for replica in pool.replicas] == [loopback.url]
        answer.append("127.0.0.2")  # a pod became ready
        assert await pool.healthy()
        assert {await generated_by(pool) for _ in range(4)} == {1, 2}
        answer.remove("127.0.0.1")  # a pod went away
        assert await pool.healthy()
        assert [replica.url for replica in pool.replicas] == [second.url]
        assert {await generated_by(pool) for _ in range(3)} == {2}
    finally:
        await pool.aclose()
        await loopback.stop()
        await second.stop()


async def test_the_system_resolver_finds_localhost() -> None:
    replica = Replica(token=5)
    await replica.start()
    pool = VLLMPool(f"dns+http://localhost:{replica.port}")
    try:
        # localhost may also resolve to ::1, where nothing listens: that address fails health and gets no calls.
        assert await pool.healthy()
        assert f"http://127.0.0.1:{replica.port}" in [r.url for r in pool.replicas if r.healthy]
        assert await generated_by(pool) == 5
    finally:
        await pool.aclose()
        await replica.stop()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "is empty"),
        ("http://a:8000,dns+http://b:8000", "mixes a dns+ name"),
        ("dns+ftp://b:8000", "is not dns+http://HOST:PORT"),
        ("a:8000", "is not an http:// or https:// URL"),
        ("http://a:8000,http://a:8000/", "names a replica twice"),
    ],
)
def test_bad_replica_lists_are_refused_at_start(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        ReplicaSource.parse(spec)


def test_replica_lists_parse() -> None:
    assert ReplicaSource.parse(" http://a:8000/ , https://b ").urls == ("http://a:8000", "https://b")
    source = ReplicaSource.parse("dns+http://vllm-headless:8000")
    assert (source.dns_host, source.dns_port, source.urls) == ("vllm-headless", 8000, ())
    assert source.url_of("10.0.0.7") == "http://10.0.0.7:8000"
    assert source.url_of("fd00::7") == "http://[fd00::7]:8000"


async def _until(condition: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)
