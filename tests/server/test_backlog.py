"""The count the explanation queue's bound applies to (ExplanationBroker.unfinished_jobs), against a real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis
import redis.asyncio as aioredis

from common.jobs import JOB_STREAM, WORKER_GROUP
from tests.brokers import explanation_broker


@pytest.fixture
async def client(redis_client: redis.Redis, redis_server: int) -> AsyncIterator[aioredis.Redis]:
    opened = aioredis.Redis(port=redis_server)
    yield opened
    await opened.aclose()


async def test_unfinished_jobs_are_the_read_and_the_unread_ones(client: aioredis.Redis) -> None:
    broker = explanation_broker(client, record_ttl_seconds=60, max_unfinished_jobs=100)
    assert await broker.unfinished_jobs() == 0  # no stream yet
    ids = [await client.xadd(JOB_STREAM, {"n": str(n)}) for n in range(5)]
    assert await broker.unfinished_jobs() == 5  # no worker group yet: nothing was read
    await client.xgroup_create(JOB_STREAM, WORKER_GROUP, id="0")
    await client.xreadgroup(WORKER_GROUP, "worker", {JOB_STREAM: ">"}, count=2)
    assert await broker.unfinished_jobs() == 5  # two in a worker's hands, three unread
    await client.xack(JOB_STREAM, WORKER_GROUP, ids[0])
    assert await broker.unfinished_jobs() == 4
    # Deleting an unread entry leaves Redis unable to tell the lag; the broker counts the unread entries itself.
    await client.xdel(JOB_STREAM, ids[4])
    assert (await client.xinfo_groups(JOB_STREAM))[0]["lag"] is None
    assert await broker.unfinished_jobs() == 3
