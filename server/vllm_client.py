"""HTTP client for an unmodified vLLM OpenAI-compatible server.

The gateway never imports vLLM: it sends token-id (or text) prompts to ``/v1/completions``
with ``return_token_ids`` and per-token logprobs, so explanations are computed on exactly the
ids the engine produced. Every call is wrapped in an OpenTelemetry GenAI client span and
carries ``traceparent`` so vLLM's own ``llm_request`` span joins the caller's trace.

Every request and streamed token passes through here, so this is the gateway's hot path: aiohttp
(C HTTP parser) and orjson cost a quarter to a third of the CPU time per request that httpx and the
standard json module did, and a streamed read parses every server-sent event that arrived with it
into one chunk, so a burst of tokens becomes one gRPC message instead of one each.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import grpc
import orjson
from opentelemetry import propagate, trace

from server.errors import (
    GatewayError,
    deadline_exceeded,
    failed_precondition,
    invalid_argument,
    not_found,
    unavailable,
)
from server.genai_spans import llm_span_attributes, record_llm_output, tracer

Prompt = str | Sequence[int]


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class ServedModel:
    name: str
    max_model_len: int


@dataclass
class CompletionChunk:
    """Tokens produced since the previous chunk; a unary completion is one chunk holding all."""

    token_ids: list[int] = field(default_factory=list)
    token_texts: list[str] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    text: str = ""
    prompt_token_ids: list[int] | None = None
    finish_reason: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None


# Idle connections are closed before vLLM's HTTP server (uvicorn, 5 s keep-alive) would close
# them, so a request never goes out on a connection the server is closing at that moment.
KEEPALIVE_SECONDS = 4.0
# Connections open at once; a request beyond this many in flight waits for one to come free.
MAX_CONNECTIONS = 512
# How long vLLM may send nothing on a call before the gateway gives up on it, whatever the caller's deadline (a
# caller that sets none would otherwise wait forever on a stuck server). A unary completion sends nothing until it
# is done, so this bounds the longest generation too: far above any this deployment's max_tokens allows.
SILENCE_TIMEOUT_SECONDS = 600.0


class VLLMClient:
    """Async client for one vLLM server; create it inside the event loop that will use it."""

    def __init__(
        self, base_url: str, *, connect_timeout: float = 5.0, silence_timeout: float = SILENCE_TIMEOUT_SECONDS
    ) -> None:
        self.base_url = base_url.rstrip("/")
        parts = urlsplit(self.base_url)
        self._host, self._port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
        self._connect_timeout = connect_timeout
        self._silence_timeout = silence_timeout
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS, keepalive_timeout=KEEPALIVE_SECONDS),
            # The connection pool is shared by every call; each call's deadline is its own timeout.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout),
            json_serialize=lambda value: orjson.dumps(value).decode(),
            # vLLM ships no cookies and needs none; skipping the jar saves work on every response.
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def aclose(self) -> None:
        await self._http.close()

    def _timeout(self, seconds: float | None) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=seconds, sock_connect=self._connect_timeout, sock_read=self._silence_timeout)

    def _silent(self) -> GatewayError:
        return unavailable(
            f"the vLLM backend at {self.base_url} sent nothing for {self._silence_timeout:g} s "
            "(SIGHTLINE_VLLM_SILENCE_TIMEOUT_SECONDS) and may be stuck or overloaded; retry later"
        )

    async def healthy(self) -> bool:
        try:
            async with self._http.get(self.base_url + "/health", timeout=self._timeout(2.0)) as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def served_model(self) -> ServedModel:
        body = await self._request_json("GET", "/v1/models", timeout=5.0)
        first = body["data"][0]
        return ServedModel(name=str(first["id"]), max_model_len=int(first.get("max_model_len") or 0))

    async def tokenize_chat(self, model: str, messages: Sequence[dict[str, Any]], timeout: float | None) -> list[int]:
        """Render chat messages with the model's own chat template into token ids; FAILED_PRECONDITION when the
        served model has none (a base model, such as the embedded Gemma 3 270M)."""
        try:
            return await self._tokenize(
                {"model": model, "messages": list(messages), "add_generation_prompt": True}, timeout
            )
        except GatewayError as exc:
            # vLLM answers 400 with transformers' or its own wording, both of which name the chat template.
            lowered = exc.message.lower()
            if exc.code != grpc.StatusCode.INVALID_ARGUMENT or not (
                "chat template" in lowered or "chat_template" in lowered
            ):
                raise
            raise failed_precondition(
                f"model {model!r} has no chat template (it is a base model), so input.chat cannot be rendered; "
                "send a text to complete in input.prompt, or token ids in input.prompt_token_ids"
            ) from exc

    async def tokenize_text(self, model: str, text: str, timeout: float | None) -> list[int]:
        """Token ids of a text prompt, exactly as /v1/completions would tokenize it."""
        return await self._tokenize({"model": model, "prompt": text}, timeout)

    async def detokenize(self, model: str, token_ids: Sequence[int], timeout: float | None) -> str:
        """The text of ``token_ids`` as the model's tokenizer decodes them together."""
        body = await self._request_json(
            "POST", "/detokenize", json={"model": model, "tokens": list(token_ids)}, timeout=timeout
        )
        return str(body["prompt"])

    async def _tokenize(self, payload: dict[str, Any], timeout: float | None) -> list[int]:
        body = await self._request_json("POST", "/tokenize", json=payload, timeout=timeout)
        return [int(t) for t in body["tokens"]]

    async def complete(self, model: str, prompt: Prompt, sampling: Sampling, timeout: float | None) -> CompletionChunk:
        payload = self._completion_payload(model, prompt, sampling, stream=False)
        with self._genai_span(model, sampling) as span:
            headers = _trace_headers()
            body = await self._request_json("POST", "/v1/completions", json=payload, timeout=timeout, headers=headers)
            chunk = CompletionChunk(prompt_token_ids=[])
            _add_event(chunk, body)
            _record_response(span, body.get("id"), chunk)
            return chunk

    async def chat_complete(
        self, model: str, messages: Sequence[dict[str, Any]], sampling: Sampling, timeout: float | None
    ) -> CompletionChunk:
        """A chat completion whose messages hold pictures (server.images.ImagePrompt): vLLM renders and tokenizes
        it with the model's processor and reports the prompt ids it used, image tokens expanded."""
        payload = self._chat_payload(model, messages, sampling, stream=False)
        with self._genai_span(model, sampling) as span:
            headers = _trace_headers()
            body = await self._request_json(
                "POST", "/v1/chat/completions", json=payload, timeout=timeout, headers=headers
            )
            chunk = CompletionChunk(prompt_token_ids=[])
            _add_chat_event(chunk, body)
            _record_response(span, body.get("id"), chunk)
            return chunk

    def complete_stream(
        self, model: str, prompt: Prompt, sampling: Sampling, timeout: float | None
    ) -> AsyncIterator[CompletionChunk]:
        """Yield chunks as vLLM streams them; closing the iterator aborts the upstream request.

        Each chunk holds every event that one read from the connection brought in, in order: one
        token when the gateway keeps up with vLLM, several when they arrived together.
        """
        payload = self._completion_payload(model, prompt, sampling, stream=True)
        return self._stream("/v1/completions", payload, _add_event, model, sampling, timeout)

    def chat_complete_stream(
        self, model: str, messages: Sequence[dict[str, Any]], sampling: Sampling, timeout: float | None
    ) -> AsyncIterator[CompletionChunk]:
        """Like ``complete_stream`` for chat messages holding pictures (server.images.ImagePrompt), streamed from
        vLLM's chat endpoint, which renders them with the model's processor; the first chunk has the prompt ids."""
        return self._stream(
            "/v1/chat/completions",
            self._chat_payload(model, messages, sampling, stream=True),
            _add_chat_event,
            model,
            sampling,
            timeout,
        )

    async def _stream(
        self,
        path: str,
        payload: dict[str, Any],
        add_event: Callable[[CompletionChunk, dict[str, Any]], None],
        model: str,
        sampling: Sampling,
        timeout: float | None,
    ) -> AsyncIterator[CompletionChunk]:
        with self._genai_span(model, sampling) as span:
            summary = CompletionChunk()
            with self._transport_errors("the vLLM backend did not finish before the call's deadline"):
                async with self._http.post(
                    self.base_url + path,
                    json=payload,
                    headers=_trace_headers(),
                    timeout=self._timeout(timeout),
                ) as response:
                    if response.status != 200:
                        raise _error_from_response(response.status, await response.read())
                    partial_line = b""
                    async for data in response.content.iter_any():
                        lines = (partial_line + data).split(b"\n")
                        partial_line = lines.pop()
                        chunk = _chunk_from_sse_lines(lines, add_event)
                        if chunk is None:
                            continue
                        summary.finish_reason = summary.finish_reason or chunk.finish_reason
                        summary.text += chunk.text
                        if chunk.input_tokens is not None:
                            summary.input_tokens = chunk.input_tokens
                            summary.output_tokens = chunk.output_tokens
                        yield chunk
            _record_response(span, None, summary)

    @staticmethod
    def _completion_payload(model: str, prompt: Prompt, sampling: Sampling, *, stream: bool) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": model,
            "prompt": prompt if isinstance(prompt, str) else list(prompt),
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "logprobs": 0,
            "return_token_ids": True,
            "stream": stream,
        }
        if sampling.top_k is not None:
            payload["top_k"] = sampling.top_k
        if sampling.seed is not None:
            payload["seed"] = sampling.seed
        if sampling.stop:
            payload["stop"] = list(sampling.stop)
        if stream:
            payload["stream_options"] = {"include_usage": True}
        return payload

    @classmethod
    def _chat_payload(
        cls, model: str, messages: Sequence[dict[str, Any]], sampling: Sampling, *, stream: bool
    ) -> dict[str, Any]:
        payload = cls._completion_payload(model, "", sampling, stream=stream)
        del payload["prompt"]
        payload.update(messages=list(messages), logprobs=True)
        return payload

    def _genai_span(self, model: str, sampling: Sampling) -> AbstractContextManager[trace.Span]:
        # Names and attributes follow the OpenTelemetry GenAI semantic conventions.
        return tracer.start_as_current_span(
            f"text_completion {model}",
            kind=trace.SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": "text_completion",
                "gen_ai.system": "vllm",
                "gen_ai.provider.name": "vllm",
                "gen_ai.request.model": model,
                "gen_ai.request.max_tokens": sampling.max_tokens,
                "gen_ai.request.temperature": sampling.temperature,
                "gen_ai.request.top_p": sampling.top_p,
                "server.address": self._host,
                "server.port": self._port,
                **llm_span_attributes(),
            },
        )

    async def _request_json(
        self,
        method: str,
        path: str,
        *,
        timeout: float | None,
        json: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        with self._transport_errors("the vLLM backend did not answer before the call's deadline"):
            async with self._http.request(
                method, self.base_url + path, json=json, headers=headers, timeout=self._timeout(timeout)
            ) as response:
                content = await response.read()
        if response.status != 200:
            raise _error_from_response(response.status, content)
        body: dict[str, Any] = orjson.loads(content)
        return body

    @contextmanager
    def _transport_errors(self, deadline_message: str) -> Iterator[None]:
        """How a failure to talk to vLLM reaches the caller: silence past the read limit and an unreachable backend
        as UNAVAILABLE (retry), the call's own deadline running out as DEADLINE_EXCEEDED with `deadline_message`."""
        try:
            yield
        except aiohttp.SocketTimeoutError as exc:
            raise self._silent() from exc
        except TimeoutError as exc:
            raise deadline_exceeded(deadline_message) from exc
        except aiohttp.ClientError as exc:
            raise self._unreachable(exc) from exc

    def _unreachable(self, exc: aiohttp.ClientError) -> GatewayError:
        return unavailable(
            f"the vLLM backend at {self.base_url} is unreachable ({str(exc) or type(exc).__name__}); "
            "retry in a few seconds"
        )


def _trace_headers() -> dict[str, str]:
    headers: dict[str, str] = {}
    propagate.inject(headers)
    return headers


def _chunk_from_sse_lines(
    lines: Sequence[bytes], add_event: Callable[[CompletionChunk, dict[str, Any]], None]
) -> CompletionChunk | None:
    """One chunk holding the completion events among server-sent-event lines, in order; None if there are none."""
    chunk: CompletionChunk | None = None
    for line in lines:
        if not line.startswith(b"data: "):
            continue
        data = line[len(b"data: ") :].rstrip(b"\r")
        if data == b"[DONE]":
            continue
        if chunk is None:
            chunk = CompletionChunk()
        add_event(chunk, orjson.loads(data))
    return chunk


def _add_event(chunk: CompletionChunk, event: dict[str, Any]) -> None:
    """Append what a completion response (or one streamed event of it) says to ``chunk``."""
    choices = event.get("choices")
    if choices:
        choice = choices[0]
        logprobs = choice.get("logprobs") or {}
        token_ids = [int(t) for t in choice.get("token_ids") or []]
        texts = logprobs.get("tokens") or []
        values = logprobs.get("token_logprobs") or []
        chunk.token_ids += token_ids
        chunk.token_texts += texts if len(texts) == len(token_ids) else [""] * len(token_ids)
        chunk.logprobs += values if len(values) == len(token_ids) else [None] * len(token_ids)
        chunk.text += str(choice.get("text") or "")
        chunk.finish_reason = choice.get("finish_reason") or chunk.finish_reason
        if choice.get("prompt_token_ids") is not None:
            chunk.prompt_token_ids = [int(t) for t in choice["prompt_token_ids"]]
    usage = event.get("usage")
    if usage:
        chunk.input_tokens = usage.get("prompt_tokens")
        chunk.output_tokens = usage.get("completion_tokens")


def _add_chat_event(chunk: CompletionChunk, event: dict[str, Any]) -> None:
    """Append what a chat completion response (``message``), or one streamed event of it (``delta``), says to
    ``chunk``: vLLM sends the prompt's ids at the top level, once, and each token's text in its logprobs entry."""
    if event.get("prompt_token_ids") is not None:
        chunk.prompt_token_ids = [int(t) for t in event["prompt_token_ids"]]
    choices = event.get("choices")
    if choices:
        choice = choices[0]
        token_ids = [int(t) for t in choice.get("token_ids") or []]
        entries = (choice.get("logprobs") or {}).get("content") or []
        matched = len(entries) == len(token_ids)
        chunk.token_ids += token_ids
        chunk.token_texts += [str(e.get("token", "")) for e in entries] if matched else [""] * len(token_ids)
        chunk.logprobs += [e.get("logprob") for e in entries] if matched else [None] * len(token_ids)
        chunk.text += str((choice.get("message") or choice.get("delta") or {}).get("content") or "")
        chunk.finish_reason = choice.get("finish_reason") or chunk.finish_reason
    usage = event.get("usage")
    if usage:
        chunk.input_tokens = usage.get("prompt_tokens")
        chunk.output_tokens = usage.get("completion_tokens")


def _record_response(span: trace.Span, response_id: str | None, chunk: CompletionChunk) -> None:
    if response_id:
        span.set_attribute("gen_ai.response.id", response_id)
    if chunk.input_tokens is not None:
        span.set_attribute("gen_ai.usage.input_tokens", chunk.input_tokens)
    if chunk.output_tokens is not None:
        span.set_attribute("gen_ai.usage.output_tokens", chunk.output_tokens)
    if chunk.finish_reason:
        span.set_attribute("gen_ai.response.finish_reasons", [chunk.finish_reason])
    record_llm_output(span, chunk.text, chunk.finish_reason)
    span.set_status(trace.Status(trace.StatusCode.OK))


def _error_from_response(status: int, content: bytes) -> GatewayError:
    try:
        body = orjson.loads(content)
        message = str(body.get("error", {}).get("message") or body.get("message") or body)
    except (ValueError, AttributeError):
        message = content.decode(errors="replace")
    message = f"vLLM rejected the request: {message}"
    if status == 404:
        return not_found(message)
    if 400 <= status < 500:
        return invalid_argument(message)
    return GatewayError(grpc.StatusCode.UNAVAILABLE, f"vLLM failed with HTTP {status}: {message}")
