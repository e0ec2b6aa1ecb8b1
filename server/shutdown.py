"""Graceful shutdown: refuse new calls, let the ones in flight finish, for at most a grace period.

Once draining starts (SIGTERM), the gateway refuses every new Sightline call with UNAVAILABLE and a
hint to retry, while grpc.health.v1 and reflection keep answering, so probes and load balancers read
NOT_SERVING instead of a dead port. Calls already running go on until they finish or the grace
period ends (``SIGHTLINE_SHUTDOWN_GRACE_SECONDS``); the server then stops, cancelling what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc

# Only the Sightline services drain; health and reflection stay open to the end.
DRAINED_PREFIX = "/sightline.v1."
REFUSAL = "this gateway is shutting down and takes no new calls; retry (another replica, or this one once restarted)"


class DrainingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc ships no type hints
    """Counts the Sightline calls in flight and, once draining, refuses new ones with UNAVAILABLE."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def begin(self) -> None:
        self.draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """True once no call is in flight; False if ``timeout`` seconds pass first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not method.startswith(DRAINED_PREFIX):
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._refuse if self.draining else self._tracked_unary(handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._refuse if self.draining else self._tracked_stream(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    @staticmethod
    async def _refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAVAILABLE, REFUSAL)

    def _tracked_unary(
        self, behaviour: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
    ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with self._tracking():
                return await behaviour(request, context)

        return unary

    def _tracked_stream(
        self, behaviour: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]
    ) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            with self._tracking():
                async for response in behaviour(request, context):
                    yield response

        return stream

    @contextlib.contextmanager
    def _tracking(self) -> Iterator[None]:
        self.in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()
