"""Texts of token ids an explanation does not contain (alternatives, logit-lens tokens), for the viewer.

The gateway has no tokenizer: it asks vLLM's ``/detokenize``, one id at a time (decoding ids together would merge
them), a few at once, and remembers every answer: a model's vocabulary does not change while it is served.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Protocol

from server.errors import GatewayError

# Ids one viewer request may ask for: a layer-by-token logit-lens window and the selected token's alternatives.
MAX_IDS_PER_REQUEST = 1024
CONCURRENT_LOOKUPS = 8
LOOKUP_TIMEOUT_SECONDS = 10.0


class Detokenizer(Protocol):
    """What the gateway's vLLM client offers for this (server/vllm_client.py)."""

    async def detokenize(self, model: str, token_ids: Sequence[int], timeout: float | None) -> str: ...


class TokenTexts:
    def __init__(self, vllm: Detokenizer) -> None:
        self._vllm = vllm
        self._known: dict[tuple[str, int], str] = {}
        self._lookups = asyncio.Semaphore(CONCURRENT_LOOKUPS)

    async def texts(self, model: str, token_ids: Sequence[int]) -> dict[int, str]:
        """Each id's text; ids vLLM cannot decode (or ids of a model it no longer serves) are left out."""
        missing = sorted({i for i in token_ids if (model, i) not in self._known})
        await asyncio.gather(*(self._look_up(model, token_id) for token_id in missing))
        return {i: self._known[(model, i)] for i in token_ids if (model, i) in self._known}

    async def _look_up(self, model: str, token_id: int) -> None:
        # An id vLLM cannot decode stays out, and the page shows it as its id.
        async with self._lookups:
            with contextlib.suppress(GatewayError):
                self._known[(model, token_id)] = await self._vllm.detokenize(model, [token_id], LOOKUP_TIMEOUT_SECONDS)
