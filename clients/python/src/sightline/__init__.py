"""Sightline client SDK: explainable LLM inference over gRPC.

Needs only grpcio and protobuf; ``Matrix.to_numpy()`` additionally needs numpy.
"""

from sightline import types
from sightline.client import DEFAULT_TARGET, AsyncClient, Client
from sightline.errors import SightlineError
from sightline.types import (
    ExplainMethods,
    ExplainModeName,
    Explanation,
    ExplanationState,
    Fidelity,
    FinishReason,
    Generation,
    LogitLensLayer,
    Matrix,
    MethodInfo,
    MethodParam,
    MethodResult,
    ParamType,
    Prompt,
    Source,
    StreamChunk,
    Token,
    Usage,
)

__all__ = [
    "DEFAULT_TARGET",
    "AsyncClient",
    "Client",
    "ExplainMethods",
    "ExplainModeName",
    "Explanation",
    "ExplanationState",
    "Fidelity",
    "FinishReason",
    "Generation",
    "LogitLensLayer",
    "Matrix",
    "MethodInfo",
    "MethodParam",
    "MethodResult",
    "ParamType",
    "Prompt",
    "SightlineError",
    "Source",
    "StreamChunk",
    "Token",
    "Usage",
    "types",
]
