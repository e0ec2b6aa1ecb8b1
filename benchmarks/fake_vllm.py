"""A stand-in for vLLM's OpenAI server that answers instantly, to measure what the gateway itself costs.

    python benchmarks/fake_vllm.py --port 8001 [--token-ms 0] [--max-running 0] [--model smollm2-135m-instruct]

Serves what the gateway calls: GET /health, GET /v1/models, POST /tokenize and POST /v1/completions (unary and
SSE streaming, with ``return_token_ids`` and ``logprobs``), in vLLM's response shapes. Every completion has exactly
``max_tokens`` tokens; ``--token-ms`` sleeps that long per token to imitate decoding, and ``--max-running`` caps how
many completions decode at once, like a replica's batch capacity. With no model behind it, the
time a request spends here is ~0, so "through the gateway" minus "straight here" is the gateway's own cost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import uvicorn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

WORDS = ("the", " quick", " brown", " fox", " jumps", " over", " a", " lazy", " dog", ".")


class FakeVLLM:
    def __init__(self, model: str, token_seconds: float, max_model_len: int = 2048, max_running: int = 0) -> None:
        self.model = model
        self.token_seconds = token_seconds
        self.max_model_len = max_model_len
        self._counter = 0
        # A replica's capacity: at most this many completions decode at once, the rest queue (0: no limit).
        self._slots = asyncio.Semaphore(max_running) if max_running else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path, method = scope["path"], scope["method"]
        if method == "GET" and path == "/health":
            await _send_json(send, {})
        elif method == "GET" and path == "/v1/models":
            await _send_json(
                send, {"object": "list", "data": [{"id": self.model, "object": "model", "max_model_len": 2048}]}
            )
        elif method == "POST" and path == "/tokenize":
            request = json.loads(body)
            await _send_json(send, {"tokens": self._prompt_ids(request.get("prompt") or "x")})
        elif method == "POST" and path == "/v1/completions":
            request = json.loads(body)
            async with self._slots or contextlib.nullcontext():
                if request.get("stream"):
                    await self._stream(send, request)
                else:
                    await self._unary(send, request)
        else:
            await _send_json(send, {"error": {"message": f"no route {method} {path}"}}, status=404)

    @staticmethod
    def _prompt_ids(prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            return [int(token) for token in prompt]
        return [100 + index for index, _ in enumerate(prompt.split())] or [100]

    def _next_id(self) -> str:
        self._counter += 1
        return f"cmpl-fake-{self._counter}"

    async def _unary(self, send: Send, request: dict[str, Any]) -> None:
        max_tokens = int(request.get("max_tokens") or 16)
        prompt_ids = self._prompt_ids(request["prompt"])
        if self.token_seconds:
            await asyncio.sleep(self.token_seconds * max_tokens)
        texts = [WORDS[i % len(WORDS)] for i in range(max_tokens)]
        await _send_json(
            send,
            {
                "id": self._next_id(),
                "object": "text_completion",
                "created": int(time.time()),
                "model": self.model,
                "choices": [
                    {
                        "index": 0,
                        "text": "".join(texts),
                        "logprobs": {
                            "text_offset": list(range(max_tokens)),
                            "token_logprobs": [-0.5] * max_tokens,
                            "tokens": texts,
                            "top_logprobs": None,
                        },
                        "finish_reason": "length",
                        "stop_reason": None,
                        "prompt_logprobs": None,
                        "prompt_token_ids": prompt_ids,
                        "token_ids": [1000 + i for i in range(max_tokens)],
                    }
                ],
                "usage": {
                    "prompt_tokens": len(prompt_ids),
                    "total_tokens": len(prompt_ids) + max_tokens,
                    "completion_tokens": max_tokens,
                },
            },
        )

    async def _stream(self, send: Send, request: dict[str, Any]) -> None:
        max_tokens = int(request.get("max_tokens") or 16)
        prompt_ids = self._prompt_ids(request["prompt"])
        response_id = self._next_id()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream; charset=utf-8")],
            }
        )
        for index in range(max_tokens):
            if self.token_seconds:
                await asyncio.sleep(self.token_seconds)
            text = WORDS[index % len(WORDS)]
            choice: dict[str, Any] = {
                "index": 0,
                "text": text,
                "logprobs": {
                    "text_offset": [index],
                    "token_logprobs": [-0.5],
                    "tokens": [text],
                    "top_logprobs": None,
                },
                "finish_reason": "length" if index == max_tokens - 1 else None,
                "stop_reason": None,
                "token_ids": [1000 + index],
            }
            if index == 0:
                choice["prompt_token_ids"] = prompt_ids
            event = {"id": response_id, "object": "text_completion", "model": self.model, "choices": [choice]}
            await send({"type": "http.response.body", "body": _sse(event), "more_body": True})
        usage = {
            "id": response_id,
            "object": "text_completion",
            "model": self.model,
            "choices": [],
            "usage": {
                "prompt_tokens": len(prompt_ids),
                "total_tokens": len(prompt_ids) + max_tokens,
                "completion_tokens": max_tokens,
            },
        }
        await send({"type": "http.response.body", "body": _sse(usage) + b"data: [DONE]\n\n", "more_body": False})


def _sse(event: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(event).encode() + b"\n\n"


async def _send_json(send: Send, payload: dict[str, Any], status: int = 200) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--token-ms", type=float, default=0.0, help="simulated decode time per token")
    parser.add_argument(
        "--max-running", type=int, default=0, help="completions decoding at once, the rest queue (0: no limit)"
    )
    args = parser.parse_args()
    app = FakeVLLM(args.model, args.token_ms / 1000, max_running=args.max_running)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
