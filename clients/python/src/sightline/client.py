"""Blocking and asyncio clients for Sightline's InferenceService, ExplanationsService and AuditService."""

from __future__ import annotations

import base64
import datetime
from collections.abc import AsyncGenerator, Callable, Generator, Sequence
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Literal, Self, TypeVar, overload

import grpc
import grpc.aio
from google.protobuf.message import Message
from sightline._messages import (
    decode,
    estimate_request,
    explain_request,
    explain_result,
    generate_request,
    get_explanation_result,
    list_explanations_request,
    method_catalog,
)
from sightline.audit_export import export_lines
from sightline.catalog import MethodCatalog
from sightline.errors import SightlineError
from sightline.tls import TLS
from sightline.types import (
    Estimate,
    ExplainMethods,
    ExplainModeName,
    ExplainOptions,
    Explanation,
    ExplanationPage,
    Generation,
    Prompt,
    StreamChunk,
)
from sightline.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    explanations_pb2,
    explanations_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
)

DEFAULT_TARGET = "127.0.0.1:50051"

# Attribution matrices grow with targets x tokens and soon outgrow gRPC's 4 MiB default.
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1)]

Result = TypeVar("Result")


class _ClientCore:
    """Channel, stubs and per-call settings, identical for both clients but for the channel module."""

    def __init__(
        self,
        channels: ModuleType,
        target: str,
        api_key: str | None,
        timeout: float | None,
        tls: TLS | bool,
        credentials: grpc.ChannelCredentials | None,
    ) -> None:
        if credentials is not None and tls is not False:
            raise ValueError("pass tls or credentials, not both")
        if tls is True:
            tls = TLS()
        if isinstance(tls, TLS):
            credentials = tls.credentials()
        options = _CHANNEL_OPTIONS + (tls.channel_options() if isinstance(tls, TLS) else [])
        # grpc and grpc.aio offer the same channel constructors, so one code path opens either kind.
        self._channel = (
            channels.insecure_channel(target, options)
            if credentials is None
            else channels.secure_channel(target, credentials, options)
        )
        self._inference = inference_pb2_grpc.InferenceServiceStub(self._channel)
        self._explanations = explanations_pb2_grpc.ExplanationsServiceStub(self._channel)
        self._audit = audit_pb2_grpc.AuditServiceStub(self._channel)
        # Sent on every call rather than as call credentials, which gRPC allows on secure channels only.
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._timeout = timeout

    def _call_options(self, timeout: float | None) -> dict[str, Any]:
        return {"timeout": self._timeout if timeout is None else timeout, "metadata": self._metadata}


class Client(_ClientCore):
    """A blocking Sightline client.

    ``target`` is ``host:port``. ``api_key`` is sent as ``authorization: Bearer <key>``.
    ``timeout`` is the default deadline in seconds of every call (None: no deadline);
    each method's own ``timeout`` overrides it. ``tls=True`` connects over TLS trusting the
    system's certificate authorities; ``tls=TLS.from_files(ca=..., cert=..., key=...)`` trusts
    a given CA and, with ``cert`` and ``key``, presents a client certificate (mutual TLS).
    ``credentials`` takes any ``grpc.ChannelCredentials`` instead. Without either the channel
    is plaintext. Failed calls raise ``SightlineError``.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        timeout: float | None = None,
        tls: TLS | bool = False,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        super().__init__(grpc, target, api_key, timeout, tls, credentials)

    def generate(
        self,
        prompt: Prompt,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        explain: ExplainMethods | None = None,
        mode: ExplainModeName = "sync",
        options: ExplainOptions | None = None,
        model: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Generation:
        """Generate a completion of ``prompt`` and, when ``explain`` names methods, its explanation.

        ``prompt`` is text, a list of chat messages (``{"role": ..., "content": ...}``)
        or a list of token ids. Sampling parameters left as None take the server's
        defaults. ``explain`` is a method name, a list of them, or a dict of method name
        to parameters. In ``mode="sync"`` the explanation is attached to the result; in
        ``mode="async"`` only ``explanation_id`` is, for ``get_explanation``. ``options``
        choose the explained tokens, a contrastive foil, the attributed score, aggregation
        into words or spans and faithfulness metrics; they need ``explain``. An empty
        ``model`` selects the server's default; ``request_id`` is generated when None.
        """
        request = generate_request(
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            explain=explain,
            mode=mode,
            options=options,
            model=model,
            request_id=request_id,
        )
        return self._call(self._inference.Generate, request, timeout, Generation.from_proto)

    def generate_stream(
        self,
        prompt: Prompt,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        explain: ExplainMethods | None = None,
        mode: ExplainModeName = "sync",
        options: ExplainOptions | None = None,
        model: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Generator[StreamChunk, None, None]:
        """Like ``generate``, yielding tokens as they are produced.

        The call starts on the first ``next()``. The last chunk carries the finish
        reason, usage and explanation. Closing the generator early (``close()``, or
        dropping it after ``break``) cancels the call.
        """
        request = generate_request(
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            explain=explain,
            mode=mode,
            options=options,
            model=model,
            request_id=request_id,
        )
        return self._stream_chunks(request, timeout)

    @overload
    def explain(
        self,
        prompt_token_ids: Sequence[int],
        output_token_ids: Sequence[int],
        methods: ExplainMethods | None = None,
        *,
        output_logprobs: Sequence[float] | None = None,
        mode: Literal["sync"] = "sync",
        options: ExplainOptions | None = None,
        model: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Explanation: ...

    @overload
    def explain(
        self,
        prompt_token_ids: Sequence[int],
        output_token_ids: Sequence[int],
        methods: ExplainMethods | None = None,
        *,
        output_logprobs: Sequence[float] | None = None,
        mode: Literal["async"],
        options: ExplainOptions | None = None,
        model: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> str: ...

    @overload
    def explain(
        self,
        prompt_token_ids: Sequence[int],
        output_token_ids: Sequence[int],
        methods: ExplainMethods | None = None,
        *,
        output_logprobs: Sequence[float] | None = None,
        mode: ExplainModeName,
        options: ExplainOptions | None = None,
        model: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Explanation | str: ...

    def explain(
        self,
        prompt_token_ids: Sequence[int],
        output_token_ids: Sequence[int],
        methods: ExplainMethods | None = None,
        *,
        output_logprobs: Sequence[float] | None = None,
        mode: ExplainModeName = "sync",
        options: ExplainOptions | None = None,
        model: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Explanation | str:
        """Explain a given sequence without generating, with ``methods`` (none: the server's default method).

        ``output_logprobs`` are the served log-probabilities of ``output_token_ids``,
        for the fidelity check; ``options`` are as in ``generate``. Returns the explanation
        in sync mode, its id in async mode.
        """
        request = explain_request(
            prompt_token_ids,
            output_token_ids,
            methods,
            output_logprobs=output_logprobs,
            mode=mode,
            options=options,
            model=model,
            request_id=request_id,
        )
        return self._call(self._explanations.Explain, request, timeout, explain_result(mode))

    def get_explanation(
        self, explanation_id: str, wait_seconds: float = 0, *, timeout: float | None = None
    ) -> Explanation:
        """Fetch an explanation, waiting up to ``wait_seconds`` (within the deadline) for it to finish."""
        request = explanations_pb2.GetExplanationRequest(explanation_id=explanation_id, wait_seconds=wait_seconds)
        return self._call(self._explanations.GetExplanation, request, timeout, get_explanation_result)

    def cancel_explanation(
        self, explanation_id: str, wait_seconds: float = 0, *, timeout: float | None = None
    ) -> Explanation:
        """Stop a pending or running explanation; waits up to ``wait_seconds`` for a running one to stop. Returns
        the record: CANCELLED, still running if its worker has not reached a checkpoint yet, or unchanged if it
        had already finished (cancelling is idempotent)."""
        request = explanations_pb2.CancelExplanationRequest(explanation_id=explanation_id, wait_seconds=wait_seconds)
        return self._call(self._explanations.CancelExplanation, request, timeout, get_explanation_result)

    def watch_explanation(
        self, explanation_id: str, *, timeout: float | None = None
    ) -> Generator[Explanation, None, None]:
        """The explanation now and each time its state or progress changes (``Explanation.progress``), ending
        with the final record."""
        request = explanations_pb2.WatchExplanationRequest(explanation_id=explanation_id)
        call = self._explanations.WatchExplanation(request, **self._call_options(timeout))
        try:
            for response in call:
                yield decode(get_explanation_result, response)
        except grpc.RpcError as error:
            raise SightlineError.from_rpc_error(error) from error
        finally:
            call.cancel()

    def wait_for_explanation(
        self,
        explanation_id: str,
        on_progress: Callable[[Explanation], None] | None = None,
        *,
        timeout: float | None = None,
    ) -> Explanation:
        """Wait for the explanation to finish, calling ``on_progress`` with every update on the way; returns the
        final record (or the latest, if ``timeout`` ends the wait first)."""
        latest: Explanation | None = None
        try:
            for latest in self.watch_explanation(explanation_id, timeout=timeout):
                if on_progress is not None:
                    on_progress(latest)
        except SightlineError as error:
            if latest is None or error.code != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
        assert latest is not None  # the stream always sends the record first
        return latest

    def estimate_explanation(
        self,
        methods: ExplainMethods | None = None,
        *,
        prompt_tokens: int,
        output_tokens: int,
        options: ExplainOptions | None = None,
        model: str = "",
        timeout: float | None = None,
    ) -> Estimate:
        """The forward passes and seconds explaining a sequence of this many tokens with ``methods`` (none: the
        server's default method) would take on this deployment, without queueing anything."""
        request = estimate_request(methods, prompt_tokens, output_tokens, options, model)
        return self._call(self._explanations.EstimateExplanation, request, timeout, Estimate.from_proto)

    def list_methods(self, *, timeout: float | None = None) -> MethodCatalog:
        """The attribution methods this deployment offers (a sequence of ``MethodInfo``), with the model,
        architecture and explain path of its explainer workers as attributes."""
        request = explanations_pb2.ListMethodsRequest()
        return self._call(self._explanations.ListMethods, request, timeout, method_catalog)

    def list_explanations(
        self, *, page_size: int = 0, page_token: str = "", timeout: float | None = None
    ) -> ExplanationPage:
        """A page of the explanations of the caller's tenant, newest first.

        ``page_size`` 0 lets the server choose (20; it serves at most 100). Pass the page's
        ``next_page_token`` as ``page_token`` for the next one.
        """
        request = list_explanations_request(page_size, page_token)
        return self._call(self._explanations.ListExplanations, request, timeout, ExplanationPage.from_proto)

    def audit_checkpoint(self, *, timeout: float | None = None) -> audit_pb2.GetCheckpointResponse:
        """The audit log's latest signed checkpoint and the gateway's public key (PEM)."""
        return self._call(self._audit.GetCheckpoint, audit_pb2.GetCheckpointRequest(), timeout, _checkpoint)

    def export_audit(
        self,
        out: Path | str,
        *,
        since: datetime.datetime | None = None,
        until: datetime.datetime | None = None,
        tenant: str = "",
        timeout: float | None = None,
    ) -> int:
        """Write the caller's audit entries that ended in [since, until) to ``out`` as JSON Lines (the format
        ``sightline.audit_export.verify_export`` checks offline); returns how many entries were written.

        ``tenant`` other than the caller's own needs a key with the operator role ("*": every tenant).
        """
        call = self._audit.ExportEntries(_export_request(since, until, tenant), **self._call_options(timeout))
        entries = 0
        partial = Path(f"{out}.partial")
        try:
            with partial.open("wb") as stream:
                for response in call:
                    record = _export_record(response)
                    entries += record["type"] == "entry"
                    stream.writelines(export_lines([record]))
        except grpc.RpcError as error:
            partial.unlink(missing_ok=True)
            raise SightlineError.from_rpc_error(error) from error
        partial.replace(out)  # only a complete export takes the name asked for
        return entries

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def _call(
        self, rpc: Callable[..., Any], request: Message, timeout: float | None, convert: Callable[[Any], Result]
    ) -> Result:
        try:
            response = rpc(request, **self._call_options(timeout))
        except grpc.RpcError as error:
            raise SightlineError.from_rpc_error(error) from error
        return decode(convert, response)

    def _stream_chunks(
        self, request: inference_pb2.GenerateRequest, timeout: float | None
    ) -> Generator[StreamChunk, None, None]:
        call = self._inference.GenerateStream(request, **self._call_options(timeout))
        try:
            for response in call:
                yield decode(StreamChunk.from_proto, response)
        except grpc.RpcError as error:
            raise SightlineError.from_rpc_error(error) from error
        finally:
            call.cancel()  # a no-op once the stream has ended; stops the server when the caller quits early


class AsyncClient(_ClientCore):
    """The asyncio twin of ``Client``, with the same arguments; its methods are awaited.

    Create it inside the event loop that uses it.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        timeout: float | None = None,
        tls: TLS | bool = False,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        super().__init__(grpc.aio, target, api_key, timeout, tls, credentials)

    async def generate(
        self,
        prompt: Prompt,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        explain: ExplainMethods | None = None,
        mode: ExplainModeName = "sync",
        options: ExplainOptions | None = None,
        model: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Generation:
        """See ``Client.generate``."""
        request = generate_request(
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            explain=explain,
            mode=mode,
            options=options,
            model=model,
            request_id=request_id,
        )
        return await self._call(self._inference.Generate, request, timeout, Generation.from_proto)

    def generate_stream(
        self,
        prompt: Prompt,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        explain: ExplainMethods | None = None,
        mode: ExplainModeName = "sync",
        options: ExplainOptions | None = None,
        model: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> AsyncGenerator[StreamChunk, None]:
        """See ``Client.generate_stream``; iterate it with ``async for`` (it is not awaited).

        To stop early, ``await`` its ``aclose()`` (or use ``contextlib.aclosing``), which
        cancels the call; an abandoned async generator is only closed when collected.
        """
        request = generate_request(
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            explain=explain,
            mode=mode,
            options=options,
            model=model,
            request_id=request_id,
        )
        return self._stream_chunks(request, timeout)

    @overload
    async def explain(
        self,
        prompt_token_ids: Sequence[int],
        output_token_ids: Sequence[int],
        methods: ExplainMethods | None = None,
        *,
        output_logprobs: Sequence[float] | None = None,
        mode: Literal["sync"] = "sync",
        options: ExplainOptions | None = None,
        model: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Explanation: ...

    @overload
    async def explain(
        self,
        prompt_token_ids: Sequence[int],
        output_token_ids: Sequence[int],
        methods: ExplainMethods | None = None,
        *,
        output_logprobs: Sequence[float] | None = None,
        mode: Literal["async"],
        options: ExplainOptions | None = None,
        model: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> str: ...

    @overload
    async def explain(
        self,
        prompt_token_ids: Sequence[int],
        output_token_ids: Sequence[int],
        methods: ExplainMethods | None = None,
        *,
        output_logprobs: Sequence[float] | None = None,
        mode: ExplainModeName,
        options: ExplainOptions | None = None,
        model: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Explanation | str: ...

    async def explain(
        self,
        prompt_token_ids: Sequence[int],
        output_token_ids: Sequence[int],
        methods: ExplainMethods | None = None,
        *,
        output_logprobs: Sequence[float] | None = None,
        mode: ExplainModeName = "sync",
        options: ExplainOptions | None = None,
        model: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Explanation | str:
        """See ``Client.explain``."""
        request = explain_request(
            prompt_token_ids,
            output_token_ids,
            methods,
            output_logprobs=output_logprobs,
            mode=mode,
            options=options,
            model=model,
            request_id=request_id,
        )
        return await self._call(self._explanations.Explain, request, timeout, explain_result(mode))

    async def get_explanation(
        self, explanation_id: str, wait_seconds: float = 0, *, timeout: float | None = None
    ) -> Explanation:
        """See ``Client.get_explanation``."""
        request = explanations_pb2.GetExplanationRequest(explanation_id=explanation_id, wait_seconds=wait_seconds)
        return await self._call(self._explanations.GetExplanation, request, timeout, get_explanation_result)

    async def cancel_explanation(
        self, explanation_id: str, wait_seconds: float = 0, *, timeout: float | None = None
    ) -> Explanation:
        """See ``Client.cancel_explanation``."""
        request = explanations_pb2.CancelExplanationRequest(explanation_id=explanation_id, wait_seconds=wait_seconds)
        return await self._call(self._explanations.CancelExplanation, request, timeout, get_explanation_result)

    async def watch_explanation(
        self, explanation_id: str, *, timeout: float | None = None
    ) -> AsyncGenerator[Explanation, None]:
        """See ``Client.watch_explanation``: ``async for explanation in client.watch_explanation(id)``."""
        request = explanations_pb2.WatchExplanationRequest(explanation_id=explanation_id)
        call = self._explanations.WatchExplanation(request, **self._call_options(timeout))
        try:
            async for response in call:
                yield decode(get_explanation_result, response)
        except grpc.RpcError as error:
            raise SightlineError.from_rpc_error(error) from error
        finally:
            call.cancel()

    async def wait_for_explanation(
        self,
        explanation_id: str,
        on_progress: Callable[[Explanation], None] | None = None,
        *,
        timeout: float | None = None,
    ) -> Explanation:
        """See ``Client.wait_for_explanation``."""
        latest: Explanation | None = None
        try:
            async for latest in self.watch_explanation(explanation_id, timeout=timeout):
                if on_progress is not None:
                    on_progress(latest)
        except SightlineError as error:
            if latest is None or error.code != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
        assert latest is not None  # the stream always sends the record first
        return latest

    async def estimate_explanation(
        self,
        methods: ExplainMethods | None = None,
        *,
        prompt_tokens: int,
        output_tokens: int,
        options: ExplainOptions | None = None,
        model: str = "",
        timeout: float | None = None,
    ) -> Estimate:
        """See ``Client.estimate_explanation``."""
        request = estimate_request(methods, prompt_tokens, output_tokens, options, model)
        return await self._call(self._explanations.EstimateExplanation, request, timeout, Estimate.from_proto)

    async def list_methods(self, *, timeout: float | None = None) -> MethodCatalog:
        """See ``Client.list_methods``."""
        request = explanations_pb2.ListMethodsRequest()
        return await self._call(self._explanations.ListMethods, request, timeout, method_catalog)

    async def list_explanations(
        self, *, page_size: int = 0, page_token: str = "", timeout: float | None = None
    ) -> ExplanationPage:
        """See ``Client.list_explanations``."""
        request = list_explanations_request(page_size, page_token)
        return await self._call(self._explanations.ListExplanations, request, timeout, ExplanationPage.from_proto)

    async def audit_checkpoint(self, *, timeout: float | None = None) -> audit_pb2.GetCheckpointResponse:
        """See ``Client.audit_checkpoint``."""
        return await self._call(self._audit.GetCheckpoint, audit_pb2.GetCheckpointRequest(), timeout, _checkpoint)

    async def export_audit(
        self,
        out: Path | str,
        *,
        since: datetime.datetime | None = None,
        until: datetime.datetime | None = None,
        tenant: str = "",
        timeout: float | None = None,
    ) -> int:
        """See ``Client.export_audit`` (the file is written with blocking writes, one line per message)."""
        call = self._audit.ExportEntries(_export_request(since, until, tenant), **self._call_options(timeout))
        entries = 0
        partial = Path(f"{out}.partial")
        try:
            with partial.open("wb") as stream:
                async for response in call:
                    record = _export_record(response)
                    entries += record["type"] == "entry"
                    stream.writelines(export_lines([record]))
        except grpc.RpcError as error:
            partial.unlink(missing_ok=True)
            raise SightlineError.from_rpc_error(error) from error
        partial.replace(out)
        return entries

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.close()

    async def _call(
        self, rpc: Callable[..., Any], request: Message, timeout: float | None, convert: Callable[[Any], Result]
    ) -> Result:
        try:
            response = await rpc(request, **self._call_options(timeout))
        except grpc.RpcError as error:  # grpc.aio.AioRpcError is one
            raise SightlineError.from_rpc_error(error) from error
        return decode(convert, response)

    async def _stream_chunks(
        self, request: inference_pb2.GenerateRequest, timeout: float | None
    ) -> AsyncGenerator[StreamChunk, None]:
        call = self._inference.GenerateStream(request, **self._call_options(timeout))
        try:
            async for response in call:
                yield decode(StreamChunk.from_proto, response)
        except grpc.RpcError as error:
            raise SightlineError.from_rpc_error(error) from error
        finally:
            call.cancel()  # a no-op once the stream has ended; stops the server when the caller quits early


def _checkpoint(response: Any) -> audit_pb2.GetCheckpointResponse:
    if not isinstance(response, audit_pb2.GetCheckpointResponse):
        raise ValueError("GetCheckpoint did not answer with a GetCheckpointResponse")
    return response


def _export_request(
    since: datetime.datetime | None, until: datetime.datetime | None, tenant: str
) -> audit_pb2.ExportEntriesRequest:
    request = audit_pb2.ExportEntriesRequest(tenant=tenant)
    if since is not None:
        request.since.FromDatetime(since)
    if until is not None:
        request.until.FromDatetime(until)
    return request


def _export_record(response: audit_pb2.ExportEntriesResponse) -> dict[str, Any]:
    """One export stream message as the JSON Lines record docs/compliance.md describes."""
    kind = response.WhichOneof("item")
    if kind == "entry":
        entry = response.entry
        return {"type": "entry", "index": entry.index, "entry": entry.entry, "proof": [h.hex() for h in entry.proof]}
    signed = response.checkpoint if kind == "checkpoint" else response.manifest
    return {"type": kind, kind: signed.text, "signature": base64.b64encode(signed.signature).decode()}
