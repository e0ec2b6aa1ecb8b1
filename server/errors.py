"""Errors the gateway turns into precise gRPC statuses."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc
import redis.exceptions

from common.explain_spec import InvalidInputError

# Re-exported: the gateway's modules quote refused input through here.
from common.quoting import shown as shown


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


@contextlib.contextmanager
def spec_errors_as_invalid_argument() -> Iterator[None]:
    """The explain spec's rules (common/explain_spec.py) refuse with INVALID_ARGUMENT and their own message, which
    names the field and says what to change."""
    try:
        yield
    except InvalidInputError as exc:
        raise invalid_argument(str(exc)) from exc
