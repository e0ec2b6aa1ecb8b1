"""Fixtures the gateway's own tests share."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis

from common.jobs import MODELS_KEY, ModelRecord
from server.explanations import ExplanationBroker
from tests.brokers import open_explanation_broker

# The model registered for `broker`'s requests.
MODEL = "tiny"


@pytest.fixture
async def broker(redis_client: redis.Redis, redis_server: int) -> AsyncIterator[ExplanationBroker]:
    """An ExplanationBroker on the test Redis (flushed) with MODEL registered, as a worker would register it."""
    redis_client.hset(MODELS_KEY, MODEL, ModelRecord("digest", 100).to_json())
    async with open_explanation_broker(redis_server) as opened:
        yield opened
