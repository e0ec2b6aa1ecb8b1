"""The gateway's control of explanation jobs once queued: cancel them, watch their progress, estimate their cost.

Cancelling is one script on the job's record (see :data:`CANCEL_SCRIPT`): a job not yet started becomes CANCELLED
at once, with its tenant's slot freed, and its turn on the job stream is acknowledged by the worker that takes it
(which finds the record final); a running job gets a ``cancel`` field naming who asked, which its worker reads at
its next checkpoint (explainers/progress.py) and answers by storing the record CANCELLED as far as it got, freeing
the slot and acknowledging the turn in its usual ack-with-result transaction. A worker that marks a job RUNNING
does so atomically with that check (explainers/worker.py, MARK_RUNNING_SCRIPT), so a cancel never slips between.

Watching polls the record at most every :data:`WATCH_POLL_SECONDS` and wakes at once on the completion channel:
workers publish progress at most that often, so a faster poll would only re-read the same progress, and a
per-job progress channel would cost every publish a PUBLISH for watchers that are rarely there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import cast

import redis.asyncio as aioredis
from sightline.v1 import explanations_pb2, types_pb2

from common.jobs import (
    DONE_CHANNEL,
    FINAL_STATES,
    PASS_SECONDS_KEY,
    RECORD_CANCEL,
    RECORD_EXPLANATION,
    RECORD_JOB,
    RECORD_PROGRESS,
    RECORD_STATE,
    RECORD_TENANT,
    explanation_key,
    tenant_inflight_key,
)
from server.costs import PlannedMethod, total_passes
from server.errors import redis_errors_as_unavailable
from server.explanations import ExplanationBroker

log = logging.getLogger(__name__)

# How often a watcher re-reads a running job's progress: the rate workers publish it at, at most.
WATCH_POLL_SECONDS = 0.25

# KEYS[1]: the record; KEYS[2]: its tenant's in-flight set. ARGV[1]: the caller's tenant; ARGV[2]: who cancels;
# ARGV[3]: the record as CANCELLED, stored if the job has not started; ARGV[4]: the explanation id. Returns
# "missing" (no such record for this tenant), "final" (already finished), "cancelled" (stopped before it started)
# or "requested" (running: its worker stops at its next checkpoint). A second cancel keeps the first one's name.
CANCEL_SCRIPT = f"""
if redis.call('HGET', KEYS[1], '{RECORD_TENANT}') ~= ARGV[1] then return 'missing' end
local state = tonumber(redis.call('HGET', KEYS[1], '{RECORD_STATE}'))
if state == {types_pb2.EXPLANATION_STATE_SUCCEEDED} or state == {types_pb2.EXPLANATION_STATE_FAILED}
    or state == {types_pb2.EXPLANATION_STATE_CANCELLED} then
  return 'final'
end
redis.call('HSETNX', KEYS[1], '{RECORD_CANCEL}', ARGV[2])
if state ~= {types_pb2.EXPLANATION_STATE_PENDING} then return 'requested' end
redis.call('HSET', KEYS[1], '{RECORD_EXPLANATION}', ARGV[3], '{RECORD_STATE}', {types_pb2.EXPLANATION_STATE_CANCELLED})
redis.call('HDEL', KEYS[1], '{RECORD_JOB}', '{RECORD_PROGRESS}')
redis.call('ZREM', KEYS[2], ARGV[4])
redis.call('PUBLISH', '{DONE_CHANNEL}', ARGV[4])
return 'cancelled'
"""


@dataclass(frozen=True)
class Estimate:
    """An explanation's predicted cost on this deployment."""

    methods: list[explanations_pb2.MethodEstimate]
    passes: float
    seconds: float
    seconds_per_token_pass: float


class JobControl:
    """Cancels, watches and estimates explanation jobs; reads and writes only through the broker's Redis."""

    def __init__(self, client: aioredis.Redis, redis_url: str, broker: ExplanationBroker) -> None:
        self._redis = client
        self._redis_url = redis_url
        self._broker = broker
        self._cancel = client.register_script(CANCEL_SCRIPT)
        # Cancels started for callers that went away, kept referenced until they finish.
        self._background: set[asyncio.Task[types_pb2.Explanation]] = set()

    async def cancel(
        self, explanation_id: str, tenant: str, cancelled_by: str, wait_seconds: float
    ) -> types_pb2.Explanation:
        """Ask for the job to stop; the record, once CANCELLED (or final), or as it is after ``wait_seconds``.
        NOT_FOUND, like GetExplanation, for an id that is not the tenant's."""
        # Read first: NOT_FOUND with GetExplanation's message, and the record to store if it has not started.
        record = await self._broker.get(explanation_id, tenant)
        if record.state in FINAL_STATES:
            return record
        cancelled = types_pb2.Explanation()
        cancelled.CopyFrom(record)
        cancelled.state = types_pb2.EXPLANATION_STATE_CANCELLED
        cancelled.cancelled_by = cancelled_by
        cancelled.ClearField("progress")
        cancelled.completed_at.GetCurrentTime()
        with redis_errors_as_unavailable(self._redis_url):
            outcome = await self._cancel(
                keys=[explanation_key(explanation_id), tenant_inflight_key(tenant)],
                args=[tenant, cancelled_by, cancelled.SerializeToString(), explanation_id],
            )
        log.info("cancel of %s by %s: %s", explanation_id, cancelled_by, outcome.decode())
        # "missing" only if the record expired since it was read: get() reports it NOT_FOUND.
        return await self._broker.wait(explanation_id, tenant, wait_seconds)

    def cancel_in_background(self, explanation_id: str, tenant: str, cancelled_by: str) -> None:
        """Cancel a job for a caller whose call is itself being cancelled (its client went away)."""
        task = asyncio.get_running_loop().create_task(self.cancel(explanation_id, tenant, cancelled_by, 0.0))
        self._background.add(task)
        task.add_done_callback(self._cancelled_in_background)

    def _cancelled_in_background(self, task: asyncio.Task[types_pb2.Explanation]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("could not cancel an abandoned SYNC explanation: %s", task.exception())

    async def watch(self, explanation_id: str, tenant: str) -> AsyncIterator[types_pb2.Explanation]:
        """The record now and each time its state or progress changes, ending with the final record."""
        record = await self._broker.get(explanation_id, tenant)
        last: tuple[int, bytes] | None = None
        while True:
            seen = (int(record.state), record.progress.SerializeToString())
            if seen != last:
                last = seen
                yield record
            if record.state in FINAL_STATES:
                return
            record = await self._broker.wait(explanation_id, tenant, WATCH_POLL_SECONDS)

    async def estimate(
        self,
        model: str,
        methods: list[PlannedMethod],
        *,
        num_tokens: int,
        num_targets: int,
        faithfulness: bool,
    ) -> Estimate:
        """Passes from the methods' published cost models, seconds from the workers' measured pass time."""
        with redis_errors_as_unavailable(self._redis_url):
            measured = await self._redis.hget(PASS_SECONDS_KEY, model)
        # Until a worker has finished a job there is no measurement: passes only, seconds 0.
        per_token_pass = 0.0 if measured is None else float(cast(bytes, measured))
        estimates = []
        for method in methods:
            passes = total_passes([method], num_tokens=num_tokens, num_targets=num_targets, faithfulness=faithfulness)
            estimates.append(
                explanations_pb2.MethodEstimate(
                    method=method.request.name, passes=passes, seconds=passes * num_tokens * per_token_pass
                )
            )
        passes = sum(e.passes for e in estimates)
        return Estimate(estimates, passes, passes * num_tokens * per_token_pass, per_token_pass)
