"""The one exception type the SDK raises for failed calls."""

from __future__ import annotations

import grpc

# Codes that mean the caller sent something the server will never accept as is
# (retrying the same call cannot help), as opposed to server or network trouble.
CALLER_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)


class SightlineError(Exception):
    """A Sightline call failed.

    ``code`` is the gRPC status code and ``details`` the server's message. When
    the failure came from gRPC, the original ``grpc.RpcError`` is ``__cause__``.
    """

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}" if self.details else self.code.name

    @property
    def is_caller_error(self) -> bool:
        """Whether the request itself was at fault (bad argument, unknown id, not allowed)."""
        return self.code in CALLER_ERROR_CODES

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> SightlineError:
        """Wrap an error raised by a sync or asyncio gRPC call; raise the result ``from error``."""
        # Both grpc.Call (sync) and grpc.aio.AioRpcError expose code() and details();
        # a bare RpcError raised outside a call does not.
        code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
        details = error.details() if callable(getattr(error, "details", None)) else str(error)
        return cls(code, details or "")
