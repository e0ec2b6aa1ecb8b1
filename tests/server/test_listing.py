"""ListExplanations' store side: the per-tenant index, its pages and cursors, against a real Redis."""

from __future__ import annotations

import base64
import json
import math

import grpc
import pytest
import redis
from sightline.v1 import types_pb2

from common.jobs import ExplainOptions, MethodRequest, explanation_key, tenant_explanations_key
from server.errors import GatewayError
from server.explanations import ExplanationBroker
from server.limits import Tenant, TenantLimits
from tests.server.conftest import MODEL

ACME = Tenant("acme", TenantLimits())
GLOBEX = Tenant("globex", TenantLimits())


async def submit(broker: ExplanationBroker, tenant: Tenant, trace_id: str) -> str:
    async with broker.reserve(tenant) as slot:
        record = await broker.submit(
            slot=slot,
            tenant=tenant,
            model=MODEL,
            prompt_token_ids=[1, 2, 3],
            output_tokens=[types_pb2.Token(id=4)],
            served_logprobs=None,
            methods=[MethodRequest("saliency"), MethodRequest("logit_lens")],
            options=ExplainOptions(),
            trace_id=trace_id,
        )
    return record.explanation_id


async def all_pages(broker: ExplanationBroker, tenant: str, page_size: int) -> list[list[str]]:
    pages, token = [], ""
    while True:
        summaries, token = await broker.list_summaries(tenant, page_size, token)
        pages.append([s.explanation_id for s in summaries])
        if not token:
            return pages


async def test_pages_are_newest_first_and_each_tenant_sees_its_own(broker: ExplanationBroker) -> None:
    created = [await submit(broker, ACME, f"trace-{i}") for i in range(5)]
    foreign = await submit(broker, GLOBEX, "trace-g")

    summaries, token = await broker.list_summaries("acme", 10, "")
    assert [s.explanation_id for s in summaries] == created[::-1] and token == ""
    newest = summaries[0]
    assert newest.state == types_pb2.EXPLANATION_STATE_PENDING
    assert (newest.model, list(newest.methods), newest.trace_id) == (MODEL, ["saliency", "logit_lens"], "trace-4")
    assert newest.created_at.seconds > 0
    assert [s.explanation_id for s in (await broker.list_summaries("globex", 10, ""))[0]] == [foreign]
    assert await broker.list_summaries("initech", 10, "") == ([], "")


async def test_cursors_resume_exactly_even_within_one_millisecond(
    broker: ExplanationBroker, redis_client: redis.Redis
) -> None:
    created = [await submit(broker, ACME, "t") for _ in range(7)]
    # Several explanations created in the same millisecond: the cursor must neither skip nor repeat them.
    index = tenant_explanations_key("acme")
    first_ms = redis_client.zscore(index, created[0])
    assert first_ms is not None
    redis_client.zadd(index, dict.fromkeys(created[1:6], first_ms - 1))
    # Newest first; ties in descending id order.
    expected = [created[6], created[0], *sorted(created[1:6], reverse=True)]

    for page_size in (1, 2, 3, 7):
        pages = await all_pages(broker, "acme", page_size)
        assert [i for page in pages for i in page] == expected
        assert all(len(page) == page_size for page in pages[:-1])


async def test_expired_records_are_left_out_and_bad_tokens_refused(
    broker: ExplanationBroker, redis_client: redis.Redis
) -> None:
    created = [await submit(broker, ACME, "t") for _ in range(3)]
    redis_client.delete(explanation_key(created[1]))

    assert [i for page in await all_pages(broker, "acme", 2) for i in page] == [created[2], created[0]]
    for token in ("not base64!", "bm90IGpzb24=", "WzEsIDJd", "WyJ4IiwgInkiXQ=="):
        with pytest.raises(GatewayError) as caught:
            await broker.list_summaries("acme", 2, token)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "page_token is not one this server issued" in caught.value.message


@pytest.mark.parametrize("created_ms", [math.nan, math.inf, 10**400], ids=["nan", "inf", "huge"])
async def test_tokens_holding_non_finite_or_huge_times_are_refused(
    broker: ExplanationBroker, created_ms: float
) -> None:
    """Regression (found by tests/e2e/test_fuzz.py): NaN reached Redis as a score and 10**400 overflowed float(),
    both answered INTERNAL."""
    token = base64.urlsafe_b64encode(json.dumps([created_ms, "exp_x"]).encode()).decode()
    with pytest.raises(GatewayError) as caught:
        await broker.list_summaries("acme", 2, token)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token is not one this server issued" in caught.value.message
