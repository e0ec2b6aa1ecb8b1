"""Per-tenant limits: their configuration, the checks on a request, and the Redis-held rate and concurrency."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import grpc
import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from common.jobs import tenant_inflight_key, tenant_rate_key
from server.errors import ConfigError, GatewayError
from server.limits import LocalRateBuckets, Tenant, TenantLimiter, TenantLimits


def test_defaults_come_from_the_environment() -> None:
    limits = TenantLimits.from_env(
        {"SIGHTLINE_REQUESTS_PER_MINUTE": "600", "SIGHTLINE_MAX_EXPLANATION_COST": "1e6", "UNRELATED": "x"}
    )
    assert limits == TenantLimits(requests_per_minute=600, max_explanation_cost=1e6)
    assert TenantLimits.from_env({}) == TenantLimits()
    with pytest.raises(ConfigError, match="SIGHTLINE_MAX_TOKENS: limit 'max_tokens' must be a number >= 0"):
        TenantLimits.from_env({"SIGHTLINE_MAX_TOKENS": "lots"})
    with pytest.raises(ConfigError, match="SIGHTLINE_MAX_PROMPT_TOKENS: limit 'max_prompt_tokens' must be a whole"):
        TenantLimits.from_env({"SIGHTLINE_MAX_PROMPT_TOKENS": "10.5"})


def test_worker_share_is_set_like_a_limit_but_must_be_above_zero() -> None:
    assert TenantLimits().worker_share == 1
    assert TenantLimits.from_env({"SIGHTLINE_WORKER_SHARE": "2.5"}).worker_share == 2.5
    assert TenantLimits().with_overrides({"worker_share": 3}, source="keys.json").worker_share == 3
    # 0 lifts a limit; a share of 0 would starve the tenant, so it is refused rather than read as "none".
    for bad in ("0", "1001", "-1", "inf"):
        with pytest.raises(ConfigError, match=r"SIGHTLINE_WORKER_SHARE: (worker_share must be > 0 and <= 1000|limit)"):
            TenantLimits.from_env({"SIGHTLINE_WORKER_SHARE": bad})


def refused(check: object) -> GatewayError:
    assert callable(check)
    with pytest.raises(GatewayError) as caught:
        check()
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    return caught.value


def test_token_limits_name_the_limit_its_value_and_where_it_is_set() -> None:
    tenant = Tenant("acme", TenantLimits(max_prompt_tokens=100, max_tokens=32))
    tenant.check_prompt_tokens(100)
    tenant.check_max_tokens(32, "sampling.max_tokens is 32")
    prompt = refused(lambda: tenant.check_prompt_tokens(101))
    assert prompt.message == (
        "the prompt has 101 tokens, over the max_prompt_tokens limit of 100 for tenant 'acme' "
        "(SIGHTLINE_MAX_PROMPT_TOKENS, or the tenant's entry in the API key file); send at most 100 prompt tokens"
    )
    output = refused(lambda: tenant.check_max_tokens(33, "sampling.max_tokens is 33"))
    assert output.message.startswith("sampling.max_tokens is 33, over the max_tokens limit of 32 for tenant 'acme'")


def test_zero_means_no_limit_and_the_default_max_tokens_fits_the_limit() -> None:
    unlimited = Tenant("acme", TenantLimits())
    unlimited.check_prompt_tokens(10**9)
    unlimited.check_max_tokens(10**9, "x")
    assert unlimited.max_tokens_or(64) == 64
    assert Tenant("acme", TenantLimits(max_tokens=16)).max_tokens_or(64) == 16
    assert Tenant("acme", TenantLimits(max_tokens=128)).max_tokens_or(64) == 64


@pytest.fixture
async def async_redis(redis_client: redis.Redis, redis_server: int) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(port=redis_server)
    yield client
    await client.aclose()


def limiter(client: aioredis.Redis, lease_seconds: float = 60.0) -> TenantLimiter:
    return TenantLimiter(client, "redis://test", lease_seconds=lease_seconds)


async def exhausted(call: object) -> GatewayError:
    assert asyncio.iscoroutine(call)
    with pytest.raises(GatewayError) as caught:
        await call
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    return caught.value


def retry_seconds(message: str) -> float:
    found = re.search(r"retry in ([0-9.]+) s$", message)
    assert found, message
    return float(found.group(1))


async def test_rate_allows_a_minute_of_burst_then_refuses_with_the_wait(
    async_redis: aioredis.Redis, redis_client: redis.Redis
) -> None:
    acme = Tenant("acme", TenantLimits(requests_per_minute=3))
    globex = Tenant("globex", TenantLimits(requests_per_minute=3))
    # Two limiters on two connections stand for two gateway replicas: they share one bucket per tenant.
    second_connection = aioredis.Redis(port=async_redis.connection_pool.connection_kwargs["port"])
    replicas = [limiter(async_redis), limiter(second_connection)]
    try:
        for replica in (*replicas, replicas[0]):
            await replica.admit_request(acme)
        error = await exhausted(replicas[1].admit_request(acme))
        await replicas[1].admit_request(globex)
    finally:
        await second_connection.aclose()

    assert error.message.startswith(
        "too many requests, over the requests_per_minute limit of 3 for tenant 'acme' (SIGHTLINE_REQUESTS_PER_MINUTE"
    )
    # One request's worth refills every 20 s.
    assert 19.0 < retry_seconds(error.message) <= 20.0
    assert 0 < redis_client.pttl(tenant_rate_key("acme")) <= 60_000


async def test_rate_refills_continuously(async_redis: aioredis.Redis) -> None:
    tenant = Tenant("acme", TenantLimits(requests_per_minute=120))  # one every 0.5 s, bursts of 120
    rate = limiter(async_redis)
    for _ in range(120):
        await rate.admit_request(tenant)
    wait = retry_seconds((await exhausted(rate.admit_request(tenant))).message)
    assert 0 < wait <= 0.5
    await asyncio.sleep(wait + 0.05)
    await rate.admit_request(tenant)
    await exhausted(rate.admit_request(tenant))


async def test_no_rate_limit_touches_nothing(async_redis: aioredis.Redis, redis_client: redis.Redis) -> None:
    for _ in range(5):
        await limiter(async_redis).admit_request(Tenant("acme", TenantLimits()))
    assert not redis_client.exists(tenant_rate_key("acme"))


async def test_concurrent_explanations_are_counted_until_released(
    async_redis: aioredis.Redis, redis_client: redis.Redis
) -> None:
    tenant = Tenant("acme", TenantLimits(max_concurrent_explanations=2))
    slots = limiter(async_redis)
    await slots.acquire_explanation(tenant, "exp_a")
    await slots.acquire_explanation(tenant, "exp_b")
    error = await exhausted(slots.acquire_explanation(tenant, "exp_c"))
    assert error.message.startswith(
        "2 explanations are still pending or running, over the max_concurrent_explanations limit of 2 for tenant "
        "'acme' (SIGHTLINE_MAX_CONCURRENT_EXPLANATIONS"
    )
    await slots.acquire_explanation(Tenant("globex", tenant.limits), "exp_g")

    # What a worker's final write does: remove the id from the tenant's set.
    redis_client.zrem(tenant_inflight_key("acme"), "exp_a")
    await slots.acquire_explanation(tenant, "exp_c")
    await slots.release_explanation(tenant, "exp_b")
    assert sorted(redis_client.zrange(tenant_inflight_key("acme"), 0, -1)) == [b"exp_c"]


async def test_an_expired_lease_frees_its_slot(async_redis: aioredis.Redis, redis_client: redis.Redis) -> None:
    tenant = Tenant("acme", TenantLimits(max_concurrent_explanations=1))
    slots = limiter(async_redis, lease_seconds=0.2)
    await slots.acquire_explanation(tenant, "exp_lost")  # its job is never finished
    await exhausted(slots.acquire_explanation(tenant, "exp_next"))
    await asyncio.sleep(0.3)
    await slots.acquire_explanation(tenant, "exp_next")
    assert redis_client.zrange(tenant_inflight_key("acme"), 0, -1) == [b"exp_next"]
    assert 0 < redis_client.pttl(tenant_inflight_key("acme")) <= 200


async def test_without_a_concurrency_limit_slots_are_still_tracked(
    async_redis: aioredis.Redis, redis_client: redis.Redis
) -> None:
    tenant = Tenant("acme", TenantLimits())
    for index in range(5):
        await limiter(async_redis).acquire_explanation(tenant, f"exp_{index}")
    assert redis_client.zcard(tenant_inflight_key("acme")) == 5


async def test_redis_down_counts_the_rate_in_the_gateway_and_refuses_explanations_as_unavailable() -> None:
    """Regression (issue 13): with Redis down, a rate-limited tenant's generation failed UNAVAILABLE naming "the
    explanation store". The rate is now counted by the gateway alone until Redis is back; explanation slots, which
    only explanations (stored in Redis anyway) need, stay UNAVAILABLE."""
    # Nothing listens on port 1; no retries, so the refusal is immediate.
    unreachable = aioredis.Redis(port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    tenant = Tenant("acme", TenantLimits(requests_per_minute=2, max_concurrent_explanations=1))
    rate = limiter(unreachable)
    try:
        await rate.admit_request(tenant)
        await rate.admit_request(tenant)
        error = await exhausted(rate.admit_request(tenant))
        # Another tenant has a bucket of its own.
        await rate.admit_request(Tenant("globex", TenantLimits(requests_per_minute=1)))
        with pytest.raises(GatewayError) as caught:
            await rate.acquire_explanation(tenant, "exp_a")
    finally:
        await unreachable.aclose()
    assert error.message.startswith(
        "too many requests (counted by this gateway alone while Redis is unreachable), over the requests_per_minute "
        "limit of 2 for tenant 'acme'"
    )
    # One request's worth refills every 30 s.
    assert 29.0 < retry_seconds(error.message) <= 30.0
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert "the explanation store (Redis at redis://test) is unreachable" in caught.value.message


def test_local_rate_buckets_burst_a_window_then_refill_continuously() -> None:
    now = [100.0]
    buckets = LocalRateBuckets(clock=lambda: now[0])
    # 3 a minute: one every 20 s, bursts of 3.
    assert [buckets.wait_ms("acme", 20_000, 60_000) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.wait_ms("acme", 20_000, 60_000) == pytest.approx(20_000)
    now[0] += 5
    assert buckets.wait_ms("acme", 20_000, 60_000) == pytest.approx(15_000)
    now[0] += 15
    assert buckets.wait_ms("acme", 20_000, 60_000) == 0.0
    assert buckets.wait_ms("acme", 20_000, 60_000) == pytest.approx(20_000)
