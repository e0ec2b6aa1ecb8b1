"""The launcher's supervisor (deploy/supervisor.py) on small real processes: restarts with backoff, gives up on a
child that keeps failing fast, kills and restarts a hung one, and starts nothing once asked to stop.

The launcher itself, supervising the real stack, is tested in test_launcher_supervision.py.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from deploy.local_stack import Child
from deploy.supervisor import GaveUp, HealthCheck, RestartPolicy, Supervised, Supervisor
from tests.faults.cluster import wait_until

FAILS_AT_ONCE = [sys.executable, "-c", "import sys; print('cannot start: no such thing', flush=True); sys.exit(3)"]
RUNS = [sys.executable, "-c", "import time; time.sleep(120)"]


class Said:
    """What the supervisor said, each line with when."""

    def __init__(self) -> None:
        self.lines: list[tuple[float, str]] = []

    def __call__(self, line: str) -> None:
        self.lines.append((time.monotonic(), line))

    def containing(self, text: str) -> list[tuple[float, str]]:
        return [(at, line) for at, line in self.lines if text in line]


def _child(tmp_path: Path, argv: list[str], name: str = "flaky") -> Child:
    return Child(name, argv, dict(os.environ), tmp_path / f"{name}.log")


def _check_until(supervisor: Supervisor, condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    def checked() -> bool:
        supervisor.check()
        return condition()

    wait_until(checked, timeout, what, interval=0.02)


def test_backoff_doubles_from_base_to_max_and_policies_that_make_no_sense_are_refused() -> None:
    policy = RestartPolicy(backoff_base_s=1, backoff_max_s=30)
    assert [policy.delay_s(n) for n in range(8)] == [0, 1, 2, 4, 8, 16, 30, 30]
    with pytest.raises(ValueError, match="0 <= base <= max"):
        RestartPolicy(backoff_base_s=10, backoff_max_s=5)
    with pytest.raises(ValueError, match="at least 1"):
        RestartPolicy(give_up_after=0)
    with pytest.raises(ValueError, match="window must be positive"):
        RestartPolicy(fast_failure_window_s=0)


def test_a_child_that_keeps_failing_fast_is_restarted_with_backoff_then_given_up_on(tmp_path: Path) -> None:
    child = _child(tmp_path, FAILS_AT_ONCE)
    said = Said()
    policy = RestartPolicy(backoff_base_s=0.2, backoff_max_s=0.4, fast_failure_window_s=30, give_up_after=4)
    supervisor = Supervisor([Supervised(child, lambda: False, 10)], policy, threading.Event(), say=said)
    pids = {child.process.pid}

    with pytest.raises(GaveUp) as gave_up:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            supervisor.check()
            pids.add(child.process.pid)
            time.sleep(0.02)

    message = str(gave_up.value)
    assert message.startswith("giving up on flaky: it failed 4 times in a row, each time before it was ready")
    assert "last it exited with code 3 before it was ready" in message
    assert f"The end of its log {child.log_path}" in message and "cannot start: no such thing" in message
    assert supervisor.restarts("flaky") == 3 and len(pids) == 4
    # Each restart waited its backoff: 0.2 s, then 0.4 s (the maximum) twice.
    failures = said.containing("restarting it in")
    assert [line.split("restarting it ")[1].split(" (log")[0] for _, line in failures] == [
        "in 0.2 s (fast failure 1 of 4)",
        "in 0.4 s (fast failure 2 of 4)",
        "in 0.4 s (fast failure 3 of 4)",
    ]
    restarted = said.containing("flaky restarted")
    for (failed_at, _), (restarted_at, _), backoff in zip(failures, restarted, (0.2, 0.4, 0.4), strict=True):
        assert restarted_at - failed_at >= backoff
    # One log across the restarts, a marker line before each start, saying why it restarted.
    log = child.log_path.read_text()
    assert log.count("launcher: starting flaky") == 1
    assert log.count("launcher: restarting flaky (restart ") == 3
    assert "(restart 3: it exited with code 3 before it was ready)" in log
    assert log.count("cannot start: no such thing") == 4
    assert not child.alive()


def test_a_child_that_ran_healthy_is_restarted_at_once_every_time(tmp_path: Path) -> None:
    child = _child(tmp_path, RUNS, name="steady")
    said = Said()
    # One fast failure would be enough to give up: failures after a healthy run never count.
    policy = RestartPolicy(backoff_base_s=5, backoff_max_s=5, fast_failure_window_s=0.3, give_up_after=1)
    supervisor = Supervisor([Supervised(child, child.alive, 10)], policy, threading.Event(), say=said)
    try:
        for restart in (1, 2):
            time.sleep(0.4)
            killed = child.process.pid
            os.kill(killed, signal.SIGKILL)
            _check_until(supervisor, lambda: supervisor.restarts("steady") == restart, f"restart {restart}")  # noqa: B023
            assert child.process.pid != killed and child.alive()
            _check_until(supervisor, lambda: bool(said.containing(f"after restart {restart}")), "ready")  # noqa: B023
        assert len(said.containing("steady was killed by SIGKILL; restarting it now (log ")) == 2
        assert said.containing("steady is ready again")
    finally:
        child.stop(timeout=5)


def test_a_hung_child_is_killed_with_its_group_and_restarted(tmp_path: Path) -> None:
    # A parent with a helper in its group, like vLLM's API server and engine core.
    argv = [
        sys.executable,
        "-c",
        "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        "time.sleep(120)",
    ]
    child = _child(tmp_path, argv, name="hangs")
    said = Said()

    def answering() -> bool:
        return bool(psutil.Process(child.process.pid).status() != psutil.STATUS_STOPPED)

    health = HealthCheck(answering, interval_s=0.1, failures=3, description="run")
    supervisor = Supervisor([Supervised(child, child.alive, 10, health)], RestartPolicy(), threading.Event(), say=said)
    try:
        wait_until(lambda: psutil.Process(child.process.pid).children(), 10, "the helper to start")
        hung = psutil.Process(child.process.pid)
        group = [hung, *hung.children()]
        os.killpg(hung.pid, signal.SIGSTOP)
        _check_until(supervisor, lambda: supervisor.restarts("hangs") == 1, "the hung child to be restarted")
        _, alive = psutil.wait_procs(group, timeout=5)
        assert not alive, "the hung child and its helper are gone"
        assert child.alive() and child.process.pid != hung.pid
        assert said.containing("hangs did not run 3 times in a row (0.1 s apart); restarting it")
    finally:
        child.stop(timeout=5)


def test_nothing_is_restarted_once_stopping(tmp_path: Path) -> None:
    child = _child(tmp_path, RUNS, name="late")
    said = Said()
    stop = threading.Event()
    policy = RestartPolicy(fast_failure_window_s=0.1)
    supervisor = Supervisor([Supervised(child, child.alive, 10)], policy, stop, say=said)
    try:
        time.sleep(0.2)
        os.kill(child.process.pid, signal.SIGKILL)
        _check_until(supervisor, lambda: bool(said.containing("restarting it now")), "the death to be noticed")
        # Due at once, but the stop comes first: no pass starts it, and run() returns without one.
        stop.set()
        supervisor.check()
        started = time.monotonic()
        supervisor.run(poll_s=5)
        assert time.monotonic() - started < 1
        assert supervisor.restarts("late") == 0 and not child.alive()
        assert child.log_path.read_text().count("launcher: restarting") == 0
    finally:
        child.stop(timeout=5)
