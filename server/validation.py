"""Request validation: turn proto fields into checked values or precise INVALID_ARGUMENT errors."""

from __future__ import annotations

import math

from sightline.v1 import types_pb2

from server.errors import invalid_argument
from server.vllm_client import Sampling

CHAT_ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256


def sampling_from_proto(params: types_pb2.SamplingParams, *, default_max_tokens: int, max_model_len: int) -> Sampling:
    max_tokens = params.max_tokens if params.HasField("max_tokens") else default_max_tokens
    if not 1 <= max_tokens < max_model_len:
        raise invalid_argument(
            f"sampling.max_tokens must be between 1 and {max_model_len - 1} "
            f"(the model's context window is {max_model_len} tokens); got {max_tokens}"
        )
    temperature = params.temperature if params.HasField("temperature") else 0.0
    if not math.isfinite(temperature) or not 0.0 <= temperature <= 100.0:
        raise invalid_argument(f"sampling.temperature must be between 0 and 100 (0 is greedy); got {temperature}")
    top_p = params.top_p if params.HasField("top_p") else 1.0
    if not math.isfinite(top_p) or not 0.0 < top_p <= 1.0:
        raise invalid_argument(f"sampling.top_p must be in (0, 1]; got {top_p}")
    top_k = params.top_k if params.HasField("top_k") else 0
    if top_k < 0:
        raise invalid_argument(f"sampling.top_k must be 0 (disabled) or positive; got {top_k}")
    if len(params.stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_LENGTH for s in params.stop):
        raise invalid_argument(
            f"sampling.stop takes at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_LENGTH} characters"
        )
    return Sampling(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k or None,
        seed=params.seed if params.HasField("seed") else None,
        stop=tuple(params.stop),
    )


def chat_messages(chat: types_pb2.ChatMessages) -> list[dict[str, str]]:
    if not chat.messages:
        raise invalid_argument("input.chat has no messages; send at least one user message")
    for index, message in enumerate(chat.messages):
        if message.role not in CHAT_ROLES:
            raise invalid_argument(
                f"input.chat.messages[{index}].role must be one of {', '.join(CHAT_ROLES)}; got {message.role!r}"
            )
    if all(not m.content.strip() for m in chat.messages):
        raise invalid_argument("input.chat messages are all empty; send some content")
    return [{"role": m.role, "content": m.content} for m in chat.messages]


def token_ids(ids: list[int], *, field: str, max_model_len: int, allow_empty: bool = False) -> list[int]:
    if not ids and not allow_empty:
        raise invalid_argument(f"{field} is empty; send at least one token id")
    negative = [t for t in ids if t < 0]
    if negative:
        raise invalid_argument(f"{field} holds negative token ids {negative[:5]}; token ids are >= 0")
    if len(ids) >= max_model_len:
        raise invalid_argument(
            f"{field} has {len(ids)} tokens; the model's context window is {max_model_len} tokens "
            "and must leave room for at least one generated token"
        )
    return list(ids)
