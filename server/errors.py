"""Errors the gateway turns into precise gRPC statuses."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc
import redis.exceptions


class ConfigError(ValueError):
    """Settings the gateway cannot start with; the message says which and why."""


class GatewayError(Exception):
    """A failure with the gRPC status and the message the caller should see."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid_argument(message: str) -> GatewayError:
    return GatewayError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> GatewayError:
    return GatewayError(grpc.StatusCode.NOT_FOUND, message)


def unavailable(message: str) -> GatewayError:
    return GatewayError(grpc.StatusCode.UNAVAILABLE, message)


def deadline_exceeded(message: str) -> GatewayError:
    return GatewayError(grpc.StatusCode.DEADLINE_EXCEEDED, message)


def resource_exhausted(message: str) -> GatewayError:
    return GatewayError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def permission_denied(message: str) -> GatewayError:
    return GatewayError(grpc.StatusCode.PERMISSION_DENIED, message)


def out_of_range(message: str) -> GatewayError:
    return GatewayError(grpc.StatusCode.OUT_OF_RANGE, message)


def failed_precondition(message: str) -> GatewayError:
    return GatewayError(grpc.StatusCode.FAILED_PRECONDITION, message)


# Redis failures that a later retry can get past (a restart, a network blip), as opposed to bad commands.
REDIS_UNREACHABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


@contextlib.contextmanager
def redis_errors_as_unavailable(redis_url: str) -> Iterator[None]:
    try:
        yield
    except REDIS_UNREACHABLE as exc:
        raise unavailable(
            f"the explanation store (Redis at {redis_url}) is unreachable ({exc}); retry in a few seconds: "
            "explanations already stored and jobs already queued are kept"
        ) from exc


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: a message names what it refuses without echoing all of it."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value):,} characters" if isinstance(value, str) else f"{len(text):,} characters written out"
    return f"{text[:limit]}… ({size})"
