"""Which part of the sequence each token is: the chat template's markup, a system prompt, a message's content, a
prompt without structure, or generated output (``Token.role`` and ``Token.message_index``).

For a chat prompt the roles come from the model's own chat template: the messages are rendered to text as the
serving engine renders them, each message's content is found in that text in order, and the text is tokenized with
character offsets; a token belongs to the content that holds most of its characters, else to the template. The
default system prompt a template inserts when the messages have none is the text that changes when an empty system
message is added. When the rendering does not reproduce the prompt's token ids, the prompt's roles stay unknown
rather than guessed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sightline.v1 import types_pb2
from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

MESSAGE_ROLES = {
    "system": types_pb2.TOKEN_ROLE_SYSTEM,
    "user": types_pb2.TOKEN_ROLE_USER,
    "assistant": types_pb2.TOKEN_ROLE_ASSISTANT,
}


@dataclass(frozen=True)
class Segment:
    """Characters [start, end) of the rendered chat that are one message's content (or the default system prompt)."""

    start: int
    end: int
    role: types_pb2.TokenRole
    message_index: int | None


def assign_roles(
    tokenizer: PreTrainedTokenizerBase,
    tokens: Sequence[types_pb2.Token],
    prompt_length: int,
    chat: Sequence[Mapping[str, str]] | None,
) -> None:
    """Set the role (and message index) of every token: output after ``prompt_length``, and for the prompt either
    its chat structure (``chat``: the messages it was rendered from) or TOKEN_ROLE_PROMPT (text or token ids)."""
    for token in tokens[prompt_length:]:
        token.role = types_pb2.TOKEN_ROLE_OUTPUT
    prompt = tokens[:prompt_length]
    if chat is None:
        for token in prompt:
            token.role = types_pb2.TOKEN_ROLE_PROMPT
        return
    try:
        rendered, segments = chat_segments(tokenizer, chat)
        offsets = _token_offsets(tokenizer, rendered, [token.id for token in prompt])
    except Exception as exc:  # a template or tokenizer that cannot say: the roles stay unknown
        log.warning("cannot tell the chat prompt's token roles: %s", exc)
        return
    if offsets is None:
        log.warning("the chat template's rendering does not reproduce the prompt's token ids; roles left unknown")
        return
    for token, (start, end) in zip(prompt, offsets, strict=True):
        segment = _holding_segment(segments, start, end)
        if segment is None:
            token.role = types_pb2.TOKEN_ROLE_TEMPLATE
            continue
        token.role = segment.role
        if segment.message_index is not None:
            token.message_index = segment.message_index


def chat_segments(tokenizer: PreTrainedTokenizerBase, chat: Sequence[Mapping[str, str]]) -> tuple[str, list[Segment]]:
    """The chat rendered as the serving engine renders it (with the generation prompt), and where in it each
    message's content (and a default system prompt the template inserts) lies. Raises ValueError when a message's
    content is not in the rendering."""
    messages = [{"role": m["role"], "content": m["content"]} for m in chat]
    rendered = _render(tokenizer, messages)
    segments: list[Segment] = []
    cursor = 0
    if not any(m["role"] == "system" for m in messages):
        default = _default_system_prompt(tokenizer, messages, rendered)
        if default is not None:
            segments.append(default)
            cursor = default.end
    for index, message in enumerate(messages):
        content = message["content"]
        # Some templates trim the content; look for it as given first.
        for candidate in (content, content.strip()):
            found = rendered.find(candidate, cursor) if candidate else -1
            if found >= 0:
                break
        else:
            if content.strip():
                raise ValueError(f"message {index}'s content is not in the chat template's rendering")
            continue
        end = found + len(candidate)
        segments.append(Segment(found, end, MESSAGE_ROLES[message["role"]], index))
        cursor = end
    return rendered, segments


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def _default_system_prompt(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], rendered: str
) -> Segment | None:
    """The text the template puts where an empty system message's content would go, when the chat has none."""
    try:
        with_empty = _render(tokenizer, [{"role": "system", "content": ""}, *messages])
    except Exception:  # e.g. a template without a system role
        return None
    prefix = 0
    limit = min(len(rendered), len(with_empty))
    while prefix < limit and rendered[prefix] == with_empty[prefix]:
        prefix += 1
    suffix = 0
    while suffix < limit - prefix and rendered[-1 - suffix] == with_empty[-1 - suffix]:
        suffix += 1
    inserted = rendered[prefix : len(rendered) - suffix]
    if not inserted.strip() or len(with_empty) - suffix != prefix:
        return None  # nothing inserted, or the empty system message changed more than the content
    return Segment(prefix, len(rendered) - suffix, types_pb2.TOKEN_ROLE_SYSTEM, None)


def _token_offsets(
    tokenizer: PreTrainedTokenizerBase, rendered: str, prompt_ids: list[int]
) -> list[tuple[int, int]] | None:
    """Character offsets of each prompt token in ``rendered``, when tokenizing it gives exactly ``prompt_ids``."""
    # Chat templates write the special tokens themselves; the engine adds none (some tokenizers would add a BOS).
    for add_special_tokens in (False, True):
        encoded = tokenizer(rendered, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        if list(encoded["input_ids"]) == prompt_ids:
            return [(int(start), int(end)) for start, end in encoded["offset_mapping"]]
    return None


def _holding_segment(segments: Sequence[Segment], start: int, end: int) -> Segment | None:
    """The segment that holds most of characters [start, end), if one holds more than half of them."""
    length = end - start
    for segment in segments:
        overlap = min(end, segment.end) - max(start, segment.start)
        if length > 0 and overlap * 2 > length:
            return segment
    return None
