"""Undecodable requests get INVALID_ARGUMENT naming what is wrong with their bytes.

grpc-python answers a request its deserializer cannot parse with a server-side status (grpcio
1.85's aio server: UNKNOWN "Unexpected <class 'DecodeError'>"), which blames the server for the
caller's bytes: a string field with invalid UTF-8, a truncated message, a nesting deeper than
protobuf's limit. The interceptor here
gives every handler a deserializer that hands such a request on as an :class:`UndecodableRequest`
and a behaviour that aborts it with INVALID_ARGUMENT before the servicer sees it, so servicers that
take their requests as arguments or iterators receive nothing but parsed messages.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message as pb_message

# upb's default decoding depth limit: messages nested deeper do not parse.
MAX_MESSAGE_DEPTH = 100

Deserializer = Callable[[bytes], Any]


@dataclass(frozen=True)
class UndecodableRequest:
    """Stands in for a request whose bytes did not parse; ``problem`` says why, for the caller."""

    problem: str


class DecodeErrorsAsInvalidArgument(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc has no type hints
    """Route every request through a deserializer that turns a DecodeError into INVALID_ARGUMENT.

    The refusal comes before authentication (the servicers authenticate): bytes that do not parse
    never reach a servicer, and the answer tells an unauthenticated caller nothing about tenants.
    """

    def __init__(self) -> None:
        # Method -> (handler, its guarded twin): registered handlers are built once, so are their twins.
        self._guarded: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        known = self._guarded.get(handler_call_details.method)
        if known is None or known[0] is not handler:
            known = (handler, _guarded_handler(handler))
            self._guarded[handler_call_details.method] = known
        return known[1]


def _guarded_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    deserialize = _lenient(handler.request_deserializer)
    serialize = handler.response_serializer
    streamed = handler.request_streaming
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_guarded(handler.unary_unary, streamed), deserialize, serialize)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(_guarded(handler.unary_stream, streamed), deserialize, serialize)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(_guarded(handler.stream_unary, streamed), deserialize, serialize)
    return grpc.stream_stream_rpc_method_handler(_guarded(handler.stream_stream, streamed), deserialize, serialize)


def _lenient(deserializer: Deserializer) -> Deserializer:
    # Generated stubs pass the message class's FromString; its class knows the fields to diagnose.
    message_class = getattr(deserializer, "__self__", None)
    descriptor = getattr(message_class, "DESCRIPTOR", None)

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except pb_message.DecodeError as exc:
            if isinstance(descriptor, pb_descriptor.Descriptor):
                return UndecodableRequest(describe_decode_error(descriptor, data, exc))
            return UndecodableRequest(f"the request is not a valid protobuf message: {exc}")

    return deserialize


Behaviour = Callable[[Any, Any], Any]


def _guarded(behaviour: Behaviour, request_streaming: bool) -> Behaviour:
    """``behaviour`` behind a check of its request(s), of the same kind (grpc.aio runs each kind its own way)."""
    if inspect.iscoroutinefunction(behaviour):

        async def guarded_coroutine(request: Any, context: grpc.aio.ServicerContext) -> Any:
            request = _checked_async(request, context) if request_streaming else await _checked_one(request, context)
            return await behaviour(request, context)

        return guarded_coroutine
    if inspect.isasyncgenfunction(behaviour):

        async def guarded_async_generator(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            request = _checked_async(request, context) if request_streaming else await _checked_one(request, context)
            async for response in behaviour(request, context):
                yield response

        return guarded_async_generator

    # Synchronous behaviours run in grpc's thread pool with a synchronous context, whose abort raises.
    def guarded_sync(request: Any, context: grpc.ServicerContext) -> Any:
        if request_streaming:
            return behaviour(_checked_sync(request, context), context)
        if isinstance(request, UndecodableRequest):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.problem)
        return behaviour(request, context)

    return guarded_sync


async def _checked_one(request: Any, context: grpc.aio.ServicerContext) -> Any:
    if isinstance(request, UndecodableRequest):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.problem)
    return request


async def _checked_async(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    async for request in requests:
        yield await _checked_one(request, context)


def _checked_sync(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
    for request in requests:
        if isinstance(request, UndecodableRequest):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.problem)
        yield request


class _WireError(Exception):
    pass


def describe_decode_error(descriptor: pb_descriptor.Descriptor, data: bytes, error: Exception) -> str:
    """What is wrong with ``data`` as a ``descriptor`` message, naming the field where it can."""
    prefix = f"the request is not a valid {descriptor.full_name}"
    try:
        _walk(descriptor, memoryview(data), "", 1)
    except _WireError as problem:
        return f"{prefix}: {problem}"
    return f"{prefix}: {error}"


def _varint(data: memoryview, pos: int, where: str) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise _WireError(f"{where}: the bytes end inside a varint or it is longer than 10 bytes")


def _walk(descriptor: pb_descriptor.Descriptor | None, data: memoryview, path: str, depth: int) -> None:
    """Raise _WireError at the first problem protobuf would refuse; ``descriptor`` None walks unknown fields."""
    if depth > MAX_MESSAGE_DEPTH:
        raise _WireError(f"{_abbreviated(path)} is nested more than {MAX_MESSAGE_DEPTH} messages deep")
    seen: dict[int, int] = {}
    pos = 0
    while pos < len(data):
        tag, pos = _varint(data, pos, path or "the message")
        number, wire_type = tag >> 3, tag & 7
        field = None if descriptor is None else descriptor.fields_by_number.get(number)
        index = seen.get(number, 0)
        seen[number] = index + 1
        if field is None:
            where = f"field {number} of {path}" if path else f"field {number}"
        else:
            name = f"{field.name}[{index}]" if field.is_repeated else field.name
            where = f"{path}.{name}" if path else name
        if number == 0:
            raise _WireError(f"{path or 'the message'} has a field numbered 0, which no message has")
        if wire_type == 0:
            _, pos = _varint(data, pos, where)
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
            if pos > len(data):
                raise _WireError(f"{where}: the bytes end inside a fixed-width value")
        elif wire_type == 2:
            length, pos = _varint(data, pos, where)
            if pos + length > len(data):
                raise _WireError(f"{where}: its length ({length} bytes) runs past the end of the request")
            _check_payload(field, data[pos : pos + length], where, depth)
            pos += length
        else:
            raise _WireError(f"{where}: wire type {wire_type} is not one this API uses (a corrupt or foreign message)")


def _abbreviated(path: str) -> str:
    # A path a hundred messages deep is too long to read; its two ends say where it is.
    return path if len(path) <= 160 else f"{path[:80]}…{path[-60:]}"


def _check_payload(field: pb_descriptor.FieldDescriptor | None, payload: memoryview, where: str, depth: int) -> None:
    if field is None:
        return
    if field.type == pb_descriptor.FieldDescriptor.TYPE_STRING:
        try:
            str(payload, "utf-8")
        except UnicodeDecodeError as exc:
            raise _WireError(
                f"{where} is not valid UTF-8 (byte {exc.start}: {bytes(payload[exc.start : exc.start + 4])!r}); "
                "string fields must hold UTF-8 text"
            ) from None
    elif field.type == pb_descriptor.FieldDescriptor.TYPE_MESSAGE:
        _walk(field.message_type, payload, where, depth + 1)
