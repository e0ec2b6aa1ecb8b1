"""The gateway's ExplanationBroker on the tests' real Redis, built one way for every test that drives it directly."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import redis.asyncio as aioredis

from server.explanations import ExplanationBroker
from server.limits import TenantLimiter

# What the broker and its limiter name the Redis they use in spans and logs; they talk through the client given.
REDIS_URL = "redis://test"


def explanation_broker(
    client: aioredis.Redis,
    *,
    lease_seconds: int = 60,
    record_ttl_seconds: int = 3600,
    max_unfinished_jobs: int = 1000,
) -> ExplanationBroker:
    """A broker on `client`, with a TenantLimiter on the same client whose slot leases last `lease_seconds`."""
    return ExplanationBroker(
        client,
        REDIS_URL,
        record_ttl_seconds=record_ttl_seconds,
        limiter=TenantLimiter(client, REDIS_URL, lease_seconds=lease_seconds),
        max_unfinished_jobs=max_unfinished_jobs,
    )


@contextlib.asynccontextmanager
async def open_explanation_broker(redis_port: int, *, lease_seconds: int = 60) -> AsyncIterator[ExplanationBroker]:
    """explanation_broker on a client of its own to the Redis at `redis_port`, closed on the way out."""
    client = aioredis.Redis(port=redis_port)
    try:
        yield explanation_broker(client, lease_seconds=lease_seconds)
    finally:
        await client.aclose()
