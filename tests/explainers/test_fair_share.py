"""Tenants share the explainer workers fairly (common/fair_queue.py), against a real Redis: jobs enqueued by the
gateway's broker, taken and computed by the real worker (on the tiny model), one turn of the job stream at a time.

The bound these tests hold the scheduler to: a job of a tenant with nothing queued starts after at most one queued
job of each other tenant (besides the jobs already running), however many the others have queued.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import cast

import pytest
import redis
from sightline.v1 import types_pb2

import explainers.worker
from common.jobs import (
    DONE_CHANNEL,
    JOB_ASSIGNED_KEY,
    JOB_QUEUE_KEY,
    JOB_STREAM,
    RECORD_EXPLANATION,
    RECORD_JOB,
    WORKER_GROUP,
    ExplainOptions,
    MethodRequest,
    explanation_key,
)
from explainers.model import LoadedModel
from explainers.worker import ExplainerWorker, WorkerSettings
from server.explanations import ExplanationBroker
from server.limits import Tenant, TenantLimits
from tests.brokers import open_explanation_broker
from tests.explainers.conftest import OUTPUT_IDS, PROMPT_IDS

FLOOD = Tenant("flood", TenantLimits())
QUIET = Tenant("quiet", TenantLimits())
CONSUMER = "worker-1"


@pytest.fixture
async def broker(redis_client: redis.Redis, redis_server: int) -> AsyncIterator[ExplanationBroker]:
    async with open_explanation_broker(redis_server, lease_seconds=600) as opened:
        yield opened


@pytest.fixture
def worker(tiny_model_float32: LoadedModel, redis_client: redis.Redis) -> ExplainerWorker:
    registered = ExplainerWorker(redis_client, tiny_model_float32, WorkerSettings(consumer=CONSUMER))
    registered.register()  # the consumer group, and the model record the broker checks jobs against
    return registered


@pytest.fixture
def completions(redis_client: redis.Redis) -> Iterator[redis.client.PubSub]:
    """The workers' completion channel: explanation ids in the order their records became final."""
    pubsub = redis_client.pubsub()
    pubsub.subscribe(DONE_CHANNEL)
    yield pubsub
    pubsub.close()


async def submit(broker: ExplanationBroker, tenant: Tenant, count: int = 1) -> list[str]:
    ids = []
    for _ in range(count):
        async with broker.reserve(tenant) as slot:
            record = await broker.submit(
                slot=slot,
                tenant=tenant,
                model="tiny-llama",
                prompt_token_ids=PROMPT_IDS,
                output_tokens=[types_pb2.Token(id=t) for t in OUTPUT_IDS[:2]],
                served_logprobs=None,
                methods=[MethodRequest("saliency")],
                options=ExplainOptions(),
                trace_id="",
            )
        ids.append(record.explanation_id)
    return ids


def next_completed(completions: redis.client.PubSub, timeout: float = 30) -> str | None:
    """The next explanation id published as final, or None if none is within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        message = completions.get_message(timeout=remaining)
        if message is not None and message["type"] == "message":
            return cast(bytes, message["data"]).decode()
    return None


def completed(completions: redis.client.PubSub) -> str:
    explanation_id = next_completed(completions)
    assert explanation_id is not None, "no explanation completed within 30 s"
    return explanation_id


def read_turns(client: redis.Redis, consumer: str, count: int = 1) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Deliver up to ``count`` new turns of the job stream to ``consumer``, as a worker's XREADGROUP does."""
    response = cast(
        list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]],
        client.xreadgroup(WORKER_GROUP, consumer, {JOB_STREAM: ">"}, count=count),
    )
    return [entry for _, entries in response for entry in entries]


def work(worker: ExplainerWorker, client: redis.Redis, completions: redis.client.PubSub, turns: int) -> list[str]:
    """Let the worker take and run ``turns`` turns, as its loop does; the explanation ids it finished, in order."""
    finished = []
    for _ in range(turns):
        ((entry_id, fields),) = read_turns(client, CONSUMER)
        worker.process(entry_id, fields)
        finished.append(completed(completions))
    return finished


def state(client: redis.Redis, explanation_id: str) -> types_pb2.Explanation:
    return types_pb2.Explanation.FromString(
        cast(bytes, client.hget(explanation_key(explanation_id), RECORD_EXPLANATION))
    )


async def test_a_flooding_tenant_holds_a_quiet_tenants_job_back_by_at_most_one_job(
    broker: ExplanationBroker, worker: ExplainerWorker, redis_client: redis.Redis, completions: redis.client.PubSub
) -> None:
    flood = await submit(broker, FLOOD, 20)
    assert work(worker, redis_client, completions, 5) == flood[:5]
    (quiet,) = await submit(broker, QUIET)
    # FIFO would run the 15 flood jobs queued before it first.
    finished = work(worker, redis_client, completions, 16)
    assert finished.index(quiet) <= 1
    # The flood tenant's own jobs keep their order, and nothing is lost or run twice.
    assert [i for i in finished if i != quiet] == flood[5:]
    assert redis_client.zcard(JOB_QUEUE_KEY) == 0 and redis_client.hlen(JOB_ASSIGNED_KEY) == 0
    assert redis_client.xpending(JOB_STREAM, WORKER_GROUP)["pending"] == 0
    assert state(redis_client, quiet).state == types_pb2.EXPLANATION_STATE_SUCCEEDED
    # The job itself is kept only until the record is final.
    assert redis_client.hget(explanation_key(quiet), RECORD_JOB) is None


async def test_a_tenant_that_has_just_had_its_turn_waits_for_the_others(
    broker: ExplanationBroker, worker: ExplainerWorker, redis_client: redis.Redis, completions: redis.client.PubSub
) -> None:
    """Emptying its queue for a moment earns a tenant no place ahead of the tenants still queued."""
    flood = await submit(broker, FLOOD, 6)
    quiet = await submit(broker, QUIET)
    first = work(worker, redis_client, completions, 2)
    assert sorted(first) == sorted([flood[0], quiet[0]])  # both at the front
    quiet += await submit(broker, QUIET)
    # The quiet tenant's second job starts one share after its first, level with the flood's second.
    assert set(work(worker, redis_client, completions, 2)) == {flood[1], quiet[1]}


async def test_tenants_with_jobs_queued_get_job_starts_in_proportion_to_their_shares(
    broker: ExplanationBroker, worker: ExplainerWorker, redis_client: redis.Redis, completions: redis.client.PubSub
) -> None:
    double = Tenant("double", TenantLimits(worker_share=2))
    doubled = await submit(broker, double, 12)
    single = await submit(broker, FLOOD, 12)
    finished = work(worker, redis_client, completions, 9)
    assert [i for i in finished if i in doubled] == doubled[:6]
    assert [i for i in finished if i in single] == single[:3]


class KilledMidJob(BaseException):
    """Stands for SIGKILL inside the computation: nothing after it runs, nothing is cleaned up by the worker."""


@pytest.mark.parametrize("victim", [FLOOD, QUIET], ids=lambda tenant: tenant.name)
async def test_a_dead_workers_turn_is_claimed_and_its_job_finished_exactly_once(
    victim: Tenant,
    broker: ExplanationBroker,
    tiny_model_float32: LoadedModel,
    redis_client: redis.Redis,
    completions: redis.client.PubSub,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dying = ExplainerWorker(redis_client, tiny_model_float32, WorkerSettings(consumer="dying", claim_idle_ms=300))
    survivor = ExplainerWorker(redis_client, tiny_model_float32, WorkerSettings(consumer="survivor", claim_idle_ms=300))
    survivor.register()
    flood = await submit(broker, FLOOD, 4)
    if victim is QUIET:
        # The survivor runs one flood job; the quiet job, enqueued next, is the next to start.
        ((entry_id, fields),) = read_turns(redis_client, "survivor")
        survivor.process(entry_id, fields)
        assert completed(completions) == flood[0]
        quiet = await submit(broker, QUIET)

    def killed(*args: object, **kwargs: object) -> None:
        raise KilledMidJob

    monkeypatch.setattr(explainers.worker, "explain", killed)
    ((dead_turn, fields),) = read_turns(redis_client, "dying")
    with pytest.raises(KilledMidJob):
        dying.process(dead_turn, fields)
    monkeypatch.undo()
    if victim is FLOOD:
        quiet = await submit(broker, QUIET)
    victim_id = quiet[0] if victim is QUIET else flood[0]
    running = state(redis_client, victim_id)
    assert running.state == types_pb2.EXPLANATION_STATE_RUNNING and running.attempts == 1
    assert redis_client.hget(JOB_ASSIGNED_KEY, dead_turn) == victim_id.encode()

    redis_client.config_resetstat()
    remaining = set(flood + quiet) - ({flood[0]} if victim is QUIET else set())
    stop = threading.Event()
    loop = threading.Thread(target=survivor.run, args=(stop,))
    loop.start()
    try:
        finished = [completed(completions) for _ in remaining]
        assert next_completed(completions, timeout=1) is None  # no job completes twice
    finally:
        stop.set()
        loop.join(10)

    assert sorted(finished) == sorted(remaining)  # each once
    claimed = state(redis_client, victim_id)
    assert claimed.state == types_pb2.EXPLANATION_STATE_SUCCEEDED, claimed.error
    assert claimed.attempts == 2
    assert all(state(redis_client, i).attempts == 1 for i in remaining - {victim_id})
    stats = cast(dict[str, dict[str, int]], redis_client.info("commandstats"))
    assert stats["cmdstat_xack"]["calls"] == len(remaining)  # every turn acknowledged once, with its result
    assert redis_client.xpending(JOB_STREAM, WORKER_GROUP)["pending"] == 0
    assert redis_client.zcard(JOB_QUEUE_KEY) == 0 and redis_client.hlen(JOB_ASSIGNED_KEY) == 0
    assert redis_client.xlen(JOB_STREAM) == len(flood + quiet)  # one turn per job
