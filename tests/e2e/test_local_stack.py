"""`make serve`'s launcher: readiness, clean shutdown, and a clear error for a busy port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from deploy.local_stack import free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def _launcher(tmp_path: Path, *ports: int) -> subprocess.Popen[str]:
    gateway, vllm, redis = ports
    return subprocess.Popen(
        [sys.executable, "-m", "deploy.local_stack", "--state-dir", str(tmp_path),
         "--gateway-port", str(gateway), "--vllm-port", str(vllm), "--redis-port", str(redis),
         "--viewer-port", str(free_port()), "--gateway-metrics-port", str(free_port()),
         "--explainer-metrics-port", str(free_port())],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def test_busy_port_is_reported_by_number(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy = squatter.getsockname()[1]
        launcher = _launcher(tmp_path, busy, free_port(), free_port())
        out, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 1
    assert f"port {busy} on 127.0.0.1 (gateway) is already in use" in err
    assert "Traceback" not in err + out


def test_sigterm_stops_every_child_and_frees_the_ports(tmp_path: Path) -> None:
    ports = (free_port(), free_port(), free_port())
    launcher = _launcher(tmp_path, *ports)
    assert launcher.stdout is not None
    try:
        deadline = time.monotonic() + 600
        for line in launcher.stdout:
            if "is SERVING" in line:
                break
            assert time.monotonic() < deadline
        else:
            pytest.fail(f"the stack never became SERVING: {launcher.stderr.read() if launcher.stderr else ''}")
        summary = [launcher.stdout.readline() for _ in range(2)]
        # Without API keys the launcher says so where nobody can miss it.
        assert "auth             WARNING: OFF, any caller is tenant 'default'" in summary[1], summary
        descendants = psutil.Process(launcher.pid).children(recursive=True)
        assert len(descendants) >= 4, "redis, vLLM (and its engine), explainer and gateway"
        os.kill(launcher.pid, signal.SIGTERM)
        launcher.wait(timeout=90)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0
    _, still_alive = psutil.wait_procs(descendants, timeout=10)
    assert not still_alive, f"orphans left behind: {[p.pid for p in still_alive]}"
    for port in ports:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))
