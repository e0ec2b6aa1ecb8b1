"""How tenants share the explainer workers: start-time fair queueing behind one job stream.

The gateway enqueues a job with :data:`ENQUEUE_SCRIPT`: the explanation id goes into the fair
queue (``sl:jobs:queue``) at its virtual start time, and one *turn* goes onto the job stream
(``sl:jobs``). A worker reads turns through the consumer group as before (``XREADGROUP``, or
``XAUTOCLAIM`` for a dead worker's) and, with :data:`TAKE_TURN_SCRIPT`, learns which job its turn
runs: the one already assigned to it (a claimed turn), else the queued job with the earliest
virtual start time, which is then assigned to the turn. Each enqueue adds one id and one turn and
each first take removes one of each, atomically, so there is a queued job for every turn not yet
taken. Everything the consumer group gives (a job pending until acknowledged with its result,
claimed when its worker dies, its lease renewed while it runs) applies to turns unchanged.

Why turns rather than a stream per tenant: the stream's group then still counts the whole backlog
(lag: jobs not started; pending: jobs running), which the gateway's queue bound and an autoscaler
both read, and workers need no list of tenants to poll.

Virtual times: a job starts at the later of the clock (``sl:jobs:clock``, the start time of the
latest job taken) and its tenant's next start (``sl:jobs:next-start``), which then moves
``1 / share`` on. So tenants with jobs queued get jobs started in proportion to their shares, and
a tenant with none queued starts at the clock: at the front, where each other tenant has at most
one job (start times of one tenant's jobs differ). The bound, whatever the length of the other
tenants' queues: a job of a tenant with nothing queued (and none started within its last share)
starts after at most one job of each other tenant, besides the jobs already running. Emptying its
queue for a moment gains a tenant nothing: its next job still starts one share after its last.
Ties go by explanation id (random).
"""

from __future__ import annotations

from common.jobs import (
    JOB_ASSIGNED_KEY,
    JOB_CLOCK_KEY,
    JOB_NEXT_START_KEY,
    JOB_QUEUE_KEY,
    JOB_STREAM,
    TURN_EXPLANATION_ID,
    TURN_TENANT,
)

# KEYS: ENQUEUE_KEYS. ARGV[1]: the tenant; ARGV[2]: the explanation id; ARGV[3]: the tenant's share (> 0).
# Returns the turn's entry id. Times are written with 17 digits: Lua's tostring keeps only 14.
ENQUEUE_SCRIPT = f"""
local clock = tonumber(redis.call('GET', KEYS[2]) or '0')
local start = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
if start < clock then start = clock end
redis.call('ZADD', KEYS[1], string.format('%.17g', start), ARGV[2])
redis.call('HSET', KEYS[3], ARGV[1], string.format('%.17g', start + 1 / tonumber(ARGV[3])))
return redis.call('XADD', KEYS[4], '*', '{TURN_EXPLANATION_ID}', ARGV[2], '{TURN_TENANT}', ARGV[1])
"""
ENQUEUE_KEYS = (JOB_QUEUE_KEY, JOB_CLOCK_KEY, JOB_NEXT_START_KEY, JOB_STREAM)

# KEYS: TAKE_TURN_KEYS. ARGV[1]: the turn's entry id. Returns the explanation id the turn runs, or nil when
# the turn has none assigned and nothing is queued (a turn not added by ENQUEUE_SCRIPT).
TAKE_TURN_SCRIPT = """
local assigned = redis.call('HGET', KEYS[1], ARGV[1])
if assigned then return assigned end
local first = redis.call('ZPOPMIN', KEYS[2])
if #first == 0 then return false end
if tonumber(first[2]) > tonumber(redis.call('GET', KEYS[3]) or '0') then
  redis.call('SET', KEYS[3], first[2])
end
redis.call('HSET', KEYS[1], ARGV[1], first[1])
return first[1]
"""
TAKE_TURN_KEYS = (JOB_ASSIGNED_KEY, JOB_QUEUE_KEY, JOB_CLOCK_KEY)
