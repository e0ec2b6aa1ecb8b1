"""A tenant's explanation slot, taken before generating: given back on any failure before its job is enqueued,
kept by the job once it is (the worker gives it back with the final record). Against a real Redis."""

from __future__ import annotations

import asyncio
from typing import cast

import grpc
import pytest
import redis
from sightline.v1 import types_pb2

from common.jobs import JOB_STREAM, ExplainOptions, MethodRequest, tenant_inflight_key
from server.errors import GatewayError
from server.explanations import ExplanationBroker, ExplanationSlot
from server.limits import Tenant, TenantLimits
from tests.server.conftest import MODEL

SERIAL = Tenant("serial", TenantLimits(max_concurrent_explanations=1))


def in_flight(redis_client: redis.Redis) -> list[str]:
    return [member.decode() for member in cast(list[bytes], redis_client.zrange(tenant_inflight_key("serial"), 0, -1))]


async def enqueue(broker: ExplanationBroker, slot: ExplanationSlot, output_token: int = 4) -> str:
    record = await broker.submit(
        slot=slot,
        tenant=SERIAL,
        model=MODEL,
        prompt_token_ids=[1, 2, 3],
        output_tokens=[types_pb2.Token(id=output_token)],
        served_logprobs=None,
        methods=[MethodRequest("logit_lens")],
        options=ExplainOptions(),
        trace_id="t",
    )
    return record.explanation_id


async def test_a_slot_goes_back_on_failure_or_cancellation_and_stays_with_an_enqueued_job(
    broker: ExplanationBroker, redis_client: redis.Redis
) -> None:
    with pytest.raises(RuntimeError, match="generation failed"):
        async with broker.reserve(SERIAL) as slot:
            assert in_flight(redis_client) == [slot.explanation_id]
            raise RuntimeError("generation failed")
    assert in_flight(redis_client) == []

    async def cancelled_generation() -> None:
        async with broker.reserve(SERIAL):
            await asyncio.sleep(3600)

    task = asyncio.create_task(cancelled_generation())
    while not in_flight(redis_client):
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert in_flight(redis_client) == []

    # Refused at submit (a token past the vocabulary): nothing enqueued, the slot goes back.
    with pytest.raises(GatewayError) as refused:
        async with broker.reserve(SERIAL) as slot:
            await enqueue(broker, slot, output_token=100)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert in_flight(redis_client) == [] and redis_client.xlen(JOB_STREAM) == 0

    async with broker.reserve(SERIAL) as slot:
        explanation_id = await enqueue(broker, slot)
    assert explanation_id == slot.explanation_id and slot.enqueued
    assert in_flight(redis_client) == [explanation_id]
    # At the limit: refused before the block, so before anything would be generated.
    with pytest.raises(GatewayError) as exhausted:
        async with broker.reserve(SERIAL):
            pytest.fail("a slot past the limit was handed out")
    assert exhausted.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert in_flight(redis_client) == [explanation_id]
