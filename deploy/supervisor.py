"""Keep the local stack's children running: restart one that dies or stops answering, and give up on one that
keeps failing fast.

The launcher (``python -m deploy.local_stack``) hands each child it started to a :class:`Supervisor` with a
readiness check, and vLLM also with a :class:`HealthCheck`. A child that exits, or fails its health check that many
times in a row (then it is killed, with its whole process group), is started again with the same command, its
output appended to the same log after a marker line. The restart after a healthy run is immediate; a child that
fails again soon (before it was ready, or within ``fast_failure_window_s`` of being ready) waits longer each time,
and after ``give_up_after`` such fast failures in a row the supervisor raises :class:`GaveUp`, which says what
failed, how, and how its log ends, so that the launcher can stop the whole stack and exit non-zero.

Everything runs in the caller's thread, one :meth:`Supervisor.check` pass at a time (so a probe that hangs delays
the others by at most its timeout), and a pass starts nothing once the stop event is set: no child is restarted
during shutdown.
"""

from __future__ import annotations

import enum
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class RestartableProcess(Protocol):
    """What the supervisor needs of a child (``deploy.local_stack.Child`` is one)."""

    name: str
    log_path: Path
    process: subprocess.Popen[bytes]

    def alive(self) -> bool: ...

    def kill(self) -> None: ...

    def restart(self, reason: str) -> None: ...

    def log_tail(self, lines: int = 30) -> str: ...


@dataclass(frozen=True)
class RestartPolicy:
    # The wait before restarting a child that failed fast once; it doubles with each further fast failure.
    backoff_base_s: float = 1.0
    backoff_max_s: float = 30.0
    # A failure is fast when the child fails before it was ready, or within this long of becoming ready.
    fast_failure_window_s: float = 60.0
    # Fast failures in a row that make the supervisor give up on a child (and the launcher stop the stack).
    give_up_after: int = 5

    def __post_init__(self) -> None:
        if not 0 <= self.backoff_base_s <= self.backoff_max_s:
            raise ValueError(
                f"restart backoff needs 0 <= base <= max, not base {self.backoff_base_s:g} s, "
                f"max {self.backoff_max_s:g} s"
            )
        if self.fast_failure_window_s <= 0:
            raise ValueError(f"the fast-failure window must be positive, not {self.fast_failure_window_s:g} s")
        if self.give_up_after < 1:
            raise ValueError(f"give-up-after must be at least 1, not {self.give_up_after}")

    def delay_s(self, fast_failures: int) -> float:
        """The wait before restarting a child that has just failed fast ``fast_failures`` times in a row; 0 (at once)
        when its failure came after a healthy run."""
        if fast_failures == 0:
            return 0.0
        return float(min(self.backoff_max_s, self.backoff_base_s * 2 ** (fast_failures - 1)))

    def describe(self) -> str:
        return (
            f"at once after a healthy run, else after {self.backoff_base_s:g} s doubling up to "
            f"{self.backoff_max_s:g} s; "
            f"gives up after {self.give_up_after} fast failures in a row (before ready or within "
            f"{self.fast_failure_window_s:g} s of it)"
        )


@dataclass(frozen=True)
class HealthCheck:
    """A liveness probe of a running child: ``probe`` is called every ``interval_s`` and says whether the child is
    healthy; ``failures`` unhealthy answers in a row get it killed and restarted."""

    probe: Callable[[], bool]
    interval_s: float
    failures: int
    # What the probe asks of the child, for the restart message, e.g. "answer GET /health".
    description: str


@dataclass(frozen=True)
class Supervised:
    """One child: how to tell it is ready after a restart, how long that may take, and how to tell it is healthy."""

    child: RestartableProcess
    ready: Callable[[], bool]
    start_timeout_s: float
    health: HealthCheck | None = None


class GaveUp(RuntimeError):
    """A child kept failing fast; the message says which, how often, its last failure and how its log ends."""


class _Phase(enum.Enum):
    RUNNING = "running"
    STARTING = "starting"
    WAITING = "waiting to restart"


@dataclass
class _State:
    phase: _Phase
    # When the current phase began (RUNNING: when the child became ready).
    since: float
    restart_at: float = 0.0
    fast_failures: int = 0
    restarts: int = 0
    failed_probes: int = 0
    next_probe: float = 0.0
    last_failure: str = ""


def describe_exit(returncode: int) -> str:
    """How a process ended, as a person reads it: "was killed by SIGKILL", "exited with code 1"."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


class Supervisor:
    def __init__(
        self,
        members: list[Supervised],
        policy: RestartPolicy,
        stop: threading.Event,
        *,
        say: Callable[[str], None] = print,
    ) -> None:
        self.policy = policy
        self._stop = stop
        self._say = say
        now = time.monotonic()
        # Every member is running and ready when handed over: the launcher waited for each one at start.
        self._members = [(member, _State(_Phase.RUNNING, since=now)) for member in members]
        for member, state in self._members:
            if member.health is not None:
                state.next_probe = now + member.health.interval_s

    def restarts(self, name: str) -> int:
        """How many times the child called ``name`` was restarted."""
        return next(state.restarts for member, state in self._members if member.child.name == name)

    def run(self, poll_s: float = 0.5) -> None:
        """Supervise until the stop event is set; raises :class:`GaveUp` when a child keeps failing fast."""
        while not self._stop.is_set():
            self.check()
            self._stop.wait(poll_s)

    def check(self) -> None:
        """One pass over every child: restart what is due; notice what died, became ready or stopped answering."""
        for member, state in self._members:
            if self._stop.is_set():
                return
            self._check(member, state)

    def _check(self, member: Supervised, state: _State) -> None:
        child = member.child
        now = time.monotonic()
        if state.phase is _Phase.WAITING:
            if now >= state.restart_at:
                state.restarts += 1
                child.restart(f"restart {state.restarts}: it {state.last_failure}")
                state.phase, state.since = _Phase.STARTING, now
                self._say(f"{child.name} restarted (restart {state.restarts}, pid {child.process.pid})")
        elif state.phase is _Phase.STARTING:
            if not child.alive():
                self._fail(member, state, f"{describe_exit(child.process.returncode)} before it was ready")
            elif member.ready():
                ready_at = time.monotonic()
                self._say(f"{child.name} is ready again, {ready_at - state.since:.1f} s after restart {state.restarts}")
                state.phase, state.since, state.failed_probes = _Phase.RUNNING, ready_at, 0
                if member.health is not None:
                    state.next_probe = ready_at + member.health.interval_s
            elif now - state.since > member.start_timeout_s:
                self._fail(member, state, f"was not ready within {member.start_timeout_s:g} s of starting")
        elif not child.alive():
            self._fail(member, state, describe_exit(child.process.returncode))
        elif member.health is not None and now >= state.next_probe:
            health = member.health
            state.next_probe = now + health.interval_s
            state.failed_probes = 0 if health.probe() else state.failed_probes + 1
            if state.failed_probes >= health.failures:
                self._fail(
                    member,
                    state,
                    f"did not {health.description} {health.failures} times in a row ({health.interval_s:g} s apart)",
                )

    def _fail(self, member: Supervised, state: _State, how: str) -> None:
        child = member.child
        # Whatever is left of it (a hung process, helpers in its group) goes before a new one starts.
        child.kill()
        now = time.monotonic()
        fast = state.phase is _Phase.STARTING or now - state.since < self.policy.fast_failure_window_s
        state.fast_failures = state.fast_failures + 1 if fast else 0
        state.last_failure = how
        if state.fast_failures >= self.policy.give_up_after:
            raise GaveUp(
                f"giving up on {child.name}: it failed {state.fast_failures} times in a row, each time before it was "
                f"ready or within {self.policy.fast_failure_window_s:g} s of it; last it {how}. "
                f"The end of its log {child.log_path}:\n{child.log_tail()}"
            )
        delay = self.policy.delay_s(state.fast_failures)
        state.phase, state.restart_at = _Phase.WAITING, now + delay
        when = "now"
        if delay > 0:
            when = f"in {delay:g} s (fast failure {state.fast_failures} of {self.policy.give_up_after})"
        self._say(f"{child.name} {how}; restarting it {when} (log {child.log_path})")
