"""Per-tenant limits: what a tenant may ask for, and the Redis state that enforces rate and concurrency.

Every limit has a deployment-wide default (``SIGHTLINE_<LIMIT>`` in the environment) that the API
key file can override per tenant; 0 means no limit. Over a limit, a call fails with
RESOURCE_EXHAUSTED and a message naming the limit, its value and where it is set.

Rate and concurrency are counted in Redis, not in the gateway: replicas are stateless and a
tenant's calls land on any of them, so a per-process count would multiply the limit by the
number of replicas and forget everything on a restart.

* Request rate is a token bucket per tenant, kept as one key holding the bucket's "theoretical
  arrival time" (GCRA). A tenant may burst up to a minute's worth of requests, and the bucket
  refills continuously, so there is no window edge at which twice the rate gets through, and the
  time to wait for the next free request is exact. The key expires once the bucket is full again.
* Concurrent explanations are a sorted set per tenant of unfinished explanation ids, each scored
  by the end of its lease. Admitting one removes expired leases, counts, and adds the id in one
  script, so replicas cannot race past the limit. The worker that writes an explanation's final
  record removes its id in the same transaction; a job lost together with its gateway or its data
  frees its slot when the lease ends, so no crash leaves a tenant locked out for good.

Both scripts read the clock of the Redis server, so replicas with skewed clocks agree.

While Redis is unreachable the request rate is counted by each gateway alone, with the same bucket
kept in the process (see ``LocalRateBuckets``): generation without an explanation needs nothing
else from Redis, so a Redis outage does not take inference down for tenants with a rate limit, and
no call goes unchecked. A tenant may then get up to its limit from each replica.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import cast

import redis.asyncio as aioredis

from common.jobs import tenant_inflight_key, tenant_rate_key
from server.errors import (
    REDIS_UNREACHABLE,
    ConfigError,
    GatewayError,
    redis_errors_as_unavailable,
    resource_exhausted,
)

log = logging.getLogger(__name__)

RATE_WINDOW_MS = 60_000
# The largest worker_share: a tenant's jobs are 1 / share apart in virtual time, far above float rounding.
MAX_WORKER_SHARE = 1000.0

# KEYS[1]: the tenant's bucket. ARGV[1]: ms per request at the sustained rate; ARGV[2]: the burst
# window in ms (a full bucket holds ARGV[2] / ARGV[1] requests). Returns {1, 0} when admitted, else
# {0, ms until the next request is}. Numbers go back as strings: Lua would truncate them to integers.
_RATE_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
local interval = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local arrival = tonumber(redis.call('GET', KEYS[1]) or '0')
if arrival < now then arrival = now end
local next_arrival = arrival + interval
if next_arrival - now > window then
  return {0, tostring(next_arrival - window - now)}
end
redis.call('SET', KEYS[1], tostring(next_arrival), 'PX', math.ceil(next_arrival - now))
return {1, '0'}
"""

# KEYS[1]: the tenant's in-flight set. ARGV[1]: the limit (0: none); ARGV[2]: the explanation id;
# ARGV[3]: the lease in ms. Returns {1, count} with the id added, or {0, count} when at the limit.
_ACQUIRE_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local in_flight = redis.call('ZCARD', KEYS[1])
local limit = tonumber(ARGV[1])
if limit > 0 and in_flight >= limit then
  return {0, in_flight}
end
local lease = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], now + lease, ARGV[2])
redis.call('PEXPIRE', KEYS[1], lease)
return {1, in_flight + 1}
"""


@dataclass(frozen=True)
class TenantLimits:
    """What one tenant may ask for; 0 means no limit."""

    requests_per_minute: int = 0
    # Explanations submitted and not yet finished (pending or running), SYNC and ASYNC alike.
    max_concurrent_explanations: int = 0
    # Tokens of one prompt, after the chat template (Generate) or as sent (Explain).
    max_prompt_tokens: int = 0
    # Tokens one call may generate (sampling.max_tokens), or explain (Explain's output_token_ids).
    max_tokens: int = 0
    # Token-forward passes of one explanation, from the methods' cost models (server/costs.py): 50M
    # is integrated gradients with 16 steps over a 1,024-token generation several times over.
    max_explanation_cost: float = 50e6
    # Not a limit but the tenant's weight when tenants with explanations queued share the explainer workers
    # (common/fair_queue.py): share 2 gets twice the job starts of share 1. Above 0, at most MAX_WORKER_SHARE.
    worker_share: float = 1.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> TenantLimits:
        """The deployment's defaults: ``SIGHTLINE_<LIMIT>`` for each limit, e.g. ``SIGHTLINE_MAX_TOKENS``."""
        limits = cls()
        for name in limit_names():
            if env_var(name) in environ:
                limits = limits.with_overrides({name: environ[env_var(name)]}, source=env_var(name))
        return limits

    def with_overrides(self, overrides: Mapping[str, object], *, source: str) -> TenantLimits:
        """These limits with some replaced; raises ConfigError naming ``source`` for an unknown or bad one."""
        known = limit_names()
        values: dict[str, int | float] = {}
        for name, raw in overrides.items():
            if name not in known:
                raise ConfigError(f"{source}: unknown limit {name!r}; the limits are {', '.join(known)}")
            values[name] = _limit_value(name, raw, integer=isinstance(getattr(self, name), int), source=source)
            if name == "worker_share" and not 0 < values[name] <= MAX_WORKER_SHARE:
                raise ConfigError(f"{source}: worker_share must be > 0 and <= {MAX_WORKER_SHARE:g}, got {raw!r}")
        return dataclasses.replace(self, **values)  # type: ignore[arg-type]


def limit_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(TenantLimits))


def env_var(limit: str) -> str:
    return f"SIGHTLINE_{limit.upper()}"


def _limit_value(name: str, raw: object, *, integer: bool, source: str) -> int | float:
    where = f"{source}: limit {name!r}"
    if isinstance(raw, bool):
        raise ConfigError(f"{where} must be a number, got {raw!r}")
    try:
        value = float(raw) if isinstance(raw, str | int | float) else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{where} must be a number >= 0 (0: no limit), got {raw!r}")
    if integer:
        if not value.is_integer():
            raise ConfigError(f"{where} must be a whole number, got {raw!r}")
        return int(value)
    return value


@dataclass(frozen=True)
class Tenant:
    """Who a call acts for: every record it creates belongs to ``name``."""

    name: str
    limits: TenantLimits

    def limit_exceeded(self, limit: str, detail: str, advice: str) -> GatewayError:
        """RESOURCE_EXHAUSTED naming the limit, its value and where it is configured."""
        value = getattr(self.limits, limit)
        return resource_exhausted(
            f"{detail}, over the {limit} limit of {value:,.0f} for tenant {self.name!r} "
            f"({env_var(limit)}, or the tenant's entry in the API key file); {advice}"
        )

    def max_tokens_or(self, default: int) -> int:
        """The max_tokens of a call that sets none: the deployment default, within this tenant's limit."""
        limit = self.limits.max_tokens
        return min(default, limit) if limit else default

    def check_max_tokens(self, num_tokens: int, detail: str) -> None:
        """Refuse generating (or explaining) more than max_tokens tokens; ``detail`` says what asked for them."""
        limit = self.limits.max_tokens
        if limit and num_tokens > limit:
            raise self.limit_exceeded("max_tokens", detail, f"ask for at most {limit} tokens")

    def check_prompt_tokens(self, num_tokens: int) -> None:
        limit = self.limits.max_prompt_tokens
        if limit and num_tokens > limit:
            raise self.limit_exceeded(
                "max_prompt_tokens", f"the prompt has {num_tokens} tokens", f"send at most {limit} prompt tokens"
            )


class LocalRateBuckets:
    """Each tenant's request-rate bucket kept in this process: the limiter's fallback while Redis is unreachable.

    The same GCRA as _RATE_SCRIPT, on this process's monotonic clock; one entry per tenant that called during an
    outage, and tenants come from the key file, so the map stays small.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._arrivals: dict[str, float] = {}

    def wait_ms(self, tenant: str, interval_ms: float, window_ms: float) -> float:
        """0 when one more call is admitted (and counted), else the ms until the next one would be."""
        now = self._clock() * 1000
        arrival = max(self._arrivals.get(tenant, now), now)
        next_arrival = arrival + interval_ms
        if next_arrival - now > window_ms:
            return next_arrival - window_ms - now
        self._arrivals[tenant] = next_arrival
        return 0.0


class TenantLimiter:
    """The Redis-held limits: request rate and concurrent explanations."""

    def __init__(self, client: aioredis.Redis, redis_url: str, *, lease_seconds: float) -> None:
        self._redis = client
        self._redis_url = redis_url
        self._lease_ms = int(lease_seconds * 1000)
        self._rate = client.register_script(_RATE_SCRIPT)
        self._acquire = client.register_script(_ACQUIRE_SCRIPT)
        self._local_rate = LocalRateBuckets()
        self._counting_locally = False

    async def admit_request(self, tenant: Tenant) -> None:
        """Count one call against the tenant's request rate; RESOURCE_EXHAUSTED with a retry time when over.

        Counted in Redis, shared by every replica; while Redis is unreachable, by this gateway alone.
        """
        per_minute = tenant.limits.requests_per_minute
        if not per_minute:
            return
        interval_ms = RATE_WINDOW_MS / per_minute
        detail = "too many requests"
        try:
            admitted, redis_wait_ms = cast(
                list[bytes | int],
                await self._rate(keys=[tenant_rate_key(tenant.name)], args=[interval_ms, RATE_WINDOW_MS]),
            )
            wait_ms = 0.0 if int(admitted) == 1 else max(float(redis_wait_ms), 1.0)
            if self._counting_locally:
                self._counting_locally = False
                log.warning("rate limiter: Redis is back; request rates are counted in Redis again")
        except REDIS_UNREACHABLE as exc:
            if not self._counting_locally:
                self._counting_locally = True
                log.warning(
                    "rate limiter: Redis at %s is unreachable (%s); counting request rates in this gateway alone "
                    "until it is back",
                    self._redis_url,
                    exc,
                )
            wait_ms = self._local_rate.wait_ms(tenant.name, interval_ms, RATE_WINDOW_MS)
            detail = "too many requests (counted by this gateway alone while Redis is unreachable)"
        if wait_ms > 0:
            raise tenant.limit_exceeded("requests_per_minute", detail, f"retry in {math.ceil(wait_ms) / 1000:g} s")

    async def acquire_explanation(self, tenant: Tenant, explanation_id: str) -> None:
        """Take one of the tenant's concurrent-explanation slots for ``explanation_id``, or refuse."""
        limit = tenant.limits.max_concurrent_explanations
        with redis_errors_as_unavailable(self._redis_url):
            admitted, in_flight = cast(
                list[int],
                await self._acquire(
                    keys=[tenant_inflight_key(tenant.name)], args=[limit, explanation_id, self._lease_ms]
                ),
            )
        if admitted != 1:
            raise tenant.limit_exceeded(
                "max_concurrent_explanations",
                f"{in_flight} explanations are still pending or running",
                "wait for one to finish (GetExplanation with wait_seconds) and retry",
            )

    async def release_explanation(self, tenant: Tenant, explanation_id: str) -> None:
        """Give a slot back for an explanation that was never enqueued (workers release finished ones)."""
        with redis_errors_as_unavailable(self._redis_url):
            await self._redis.zrem(tenant_inflight_key(tenant.name), explanation_id)
