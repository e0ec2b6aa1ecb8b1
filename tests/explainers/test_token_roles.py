"""Each token's role from the chat template (explainers/token_roles.py), with a ChatML-like template over the word
tokenizer: token id i is the word "w{i}", so every rendering's tokens and offsets are known exactly."""

from __future__ import annotations

from sightline.v1 import types_pb2
from transformers import PreTrainedTokenizerFast

from explainers.token_roles import assign_roles
from tests.explainers.conftest import word_tokenizer

# <start> <role> content <end>, with w1..w4 as the default system prompt when the chat has none.
TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}w5 w9 w1 w2 w3 w4 w8 {% endif %}"
    "{% for m in messages %}w5 {{ {'system': 'w9', 'user': 'w6', 'assistant': 'w7'}[m['role']] }} "
    "{{ m['content'] }} w8 {% endfor %}"
    "{% if add_generation_prompt %}w5 w7 {% endif %}"
)
T, SYSTEM, USER, ASSISTANT = (
    types_pb2.TOKEN_ROLE_TEMPLATE,
    types_pb2.TOKEN_ROLE_SYSTEM,
    types_pb2.TOKEN_ROLE_USER,
    types_pb2.TOKEN_ROLE_ASSISTANT,
)
OUTPUT = types_pb2.TOKEN_ROLE_OUTPUT


def _tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = word_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def _tokens(words: str) -> list[types_pb2.Token]:
    return [types_pb2.Token(id=int(word[1:]), text=word) for word in words.split()]


def _roles(tokens: list[types_pb2.Token]) -> list[tuple[int, int | None]]:
    return [(t.role, t.message_index if t.HasField("message_index") else None) for t in tokens]


def test_a_chat_without_system_message_has_the_templates_default_system_prompt() -> None:
    tokens = _tokens("w5 w9 w1 w2 w3 w4 w8 w5 w6 w20 w21 w8 w5 w7 w30 w31")
    assign_roles(_tokenizer(), tokens, 14, [{"role": "user", "content": "w20 w21"}])
    assert _roles(tokens) == [
        *[(T, None)] * 2,
        *[(SYSTEM, None)] * 4,  # no message of the caller's: the template's own system prompt
        *[(T, None)] * 3,
        (USER, 0),
        (USER, 0),
        *[(T, None)] * 3,
        (OUTPUT, None),
        (OUTPUT, None),
    ]


def test_each_message_content_is_marked_with_its_index() -> None:
    chat = [
        {"role": "system", "content": "w10"},
        {"role": "user", "content": "w11 w12"},
        {"role": "assistant", "content": "w13"},
        {"role": "user", "content": "  w14  "},  # a template may keep or trim surrounding space
    ]
    tokens = _tokens("w5 w9 w10 w8 w5 w6 w11 w12 w8 w5 w7 w13 w8 w5 w6 w14 w8 w5 w7")
    assign_roles(_tokenizer(), tokens, len(tokens), chat)
    assert _roles(tokens) == [
        (T, None),
        (T, None),
        (SYSTEM, 0),
        (T, None),
        (T, None),
        (T, None),
        (USER, 1),
        (USER, 1),
        (T, None),
        (T, None),
        (T, None),
        (ASSISTANT, 2),
        (T, None),
        (T, None),
        (T, None),
        (USER, 3),
        (T, None),
        (T, None),
        (T, None),
    ]


def test_a_rendering_that_does_not_reproduce_the_prompt_leaves_its_roles_unknown() -> None:
    # The prompt's ids are not what the template renders (a different template served them): no guessing.
    tokens = _tokens("w5 w6 w20 w8 w40")
    assign_roles(_tokenizer(), tokens, 4, [{"role": "user", "content": "w20"}])
    assert _roles(tokens) == [(types_pb2.TOKEN_ROLE_UNSPECIFIED, None)] * 4 + [(OUTPUT, None)]


def test_a_prompt_without_chat_structure_is_all_the_callers() -> None:
    tokens = _tokens("w1 w2 w3")
    assign_roles(_tokenizer(), tokens, 2, None)
    assert _roles(tokens) == [(types_pb2.TOKEN_ROLE_PROMPT, None)] * 2 + [(OUTPUT, None)]
