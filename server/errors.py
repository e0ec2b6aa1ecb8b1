"""Errors the gateway turns into precise gRPC statuses."""

from __future__ import annotations

import grpc


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
