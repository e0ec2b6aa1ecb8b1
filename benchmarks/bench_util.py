"""Helpers the benchmark scripts share: result files, Markdown tables, percentiles, the machine they ran on.

Every benchmark writes one JSON document to benchmarks/results/ with at least ``benchmark``, ``command``,
``environment`` and its own data, and prints the same numbers as Markdown; ``benchmarks/run_all.py`` turns the JSON
back into docs/performance.md's tables through each script's ``render_markdown``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
PYTHON = sys.executable
GIB = 1024**3

JsonDict = dict[str, Any]


def command_line(script: str, argv: Sequence[str]) -> str:
    """The shell command that regenerates a result: ``.venv/bin/python benchmarks/<script> <args>``."""
    return shlex.join([".venv/bin/python", f"benchmarks/{script}", *argv])


def environment() -> JsonDict:
    """What the numbers depend on: CPU, core count, load, versions, commit."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = bool(
        subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    )
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "python": platform.python_version(),
        "commit": commit + ("+dirty" if dirty else ""),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_result(path: Path, result: JsonDict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def read_result(path: Path) -> JsonDict:
    data: JsonDict = json.loads(path.read_text())
    return data


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks, as numpy's default."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def fmt(value: float | None, digits: int = 2) -> str:
    """A number for a table cell; '—' for None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def verdict(met: bool | None) -> str:
    return "—" if met is None else ("met" if met else "**missed**")


def grpc_serving(address: str, service: str = "sightline.v1.InferenceService", timeout_s: float = 2.0) -> bool:
    """Whether the gRPC health service at `address` reports `service` ("": the server as a whole) SERVING; an
    unreachable server raises, which wait_for takes as not ready yet."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout_s)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def wait_for(ready: Callable[[], bool], children: Sequence[Any], name: str, timeout: float) -> None:
    """Poll ready() until it returns True; fail at once if one of the child processes (deploy.local_stack.Child)
    exits, and after `timeout` seconds, with the last child's log tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in children:
            if not child.alive():
                raise RuntimeError(f"{child.name} exited: {child.log_tail()}")
        try:
            if ready():
                return
        except Exception:  # not up yet: connection refused, a half-started server
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{name} was not ready within {timeout:.0f} s: {children[-1].log_tail()}")


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A throwaway redis-server on a free port, without persistence, for as long as the block runs; yields its URL."""
    import redis

    from deploy.local_stack import Child, free_port

    state = Path(tempfile.mkdtemp(prefix="sightline-bench-redis-"))
    port = free_port()
    server = Child(
        "redis",
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--dir", str(state)],
        dict(os.environ),
        state / "redis.log",
    )  # fmt: skip
    try:
        wait_for(lambda: bool(redis.Redis(port=port).ping()), [server], "redis-server", timeout=30)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.stop()
        shutil.rmtree(state, ignore_errors=True)
