"""How an error message quotes what it refuses: in part, so that a 100,000-character input is never echoed whole."""

from __future__ import annotations


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: a message names what it refuses without echoing all of it."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value):,} characters" if isinstance(value, str) else f"{len(text):,} characters written out"
    return f"{text[:limit]}… ({size})"
