"""What the audit trail costs a request, and how fast its exports are written and verified.

    .venv/bin/python benchmarks/audit_overhead.py            # 400 calls per gateway at concurrency 1, 8 x 100 at 8
    .venv/bin/python benchmarks/audit_overhead.py --smoke    # a quick check that it runs (CI)

Three real gateways (``python -m server``) run side by side in front of one instant fake vLLM
(benchmarks/fake_vllm.py) and one Redis: audit off (``SIGHTLINE_AUDIT=off``), audit in SQLite (the default) and
audit in PostgreSQL 15 (Debian's binaries, fsync on). Calls (unary Generate, 16 tokens) go to the three in
rotating order, so all three see the same machine load; the added latency of a trail is its gateway's percentile
minus the audit-off gateway's. Every audited call waits for its entry's commit (group-committed with whatever
other calls queued meanwhile), so this is the whole cost of "acknowledged means durable".

Also measured: the disk's fdatasync latency (the floor under any durable commit), the audit write alone
(``AuditLog.append`` in this process, no gRPC), export throughput (entries per second through ``sightline audit
export``'s SDK call, proofs included), offline verification throughput, and the database size per thousand
requests. Writes benchmarks/results/audit_overhead[_smoke].json.
Target: added p50 < 1 ms per request at concurrency 1, with SQLite and with PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import bench_util
import grpc
from bench_util import JsonDict, fmt, markdown_table, percentile, verdict
from sightline import Client
from sightline.audit_export import load_public_key, verify_export
from sightline.v1 import inference_pb2, inference_pb2_grpc, types_pb2

from deploy.local_stack import Child, free_port
from deploy.postgres import postgres_server
from server.audit.log import AuditLog, now_ms
from server.audit.signing import load_or_create_signer
from server.audit.store import NewEntry, open_store

HOST = "127.0.0.1"
TARGET_ADDED_P50_MS = 1.0
CONFIGS = ("off", "sqlite", "postgresql")
MAX_TOKENS = 16


def start_gateway(name: str, state_dir: Path, vllm_url: str, redis_url: str, env: dict[str, str]) -> tuple[Child, str]:
    address = f"{HOST}:{free_port()}"
    child = Child(
        f"gateway-{name}",
        [bench_util.PYTHON, "-m", "server"],
        {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "OTEL_SDK_DISABLED": "true",
            "SIGHTLINE_GATEWAY_LISTEN": address,
            "SIGHTLINE_VLLM_URL": vllm_url,
            "SIGHTLINE_REDIS_URL": redis_url,
            "SIGHTLINE_STATE_DIR": str(state_dir / name),
            **env,
        },
        state_dir / "logs" / f"gateway-{name}.log",
    )

    bench_util.wait_for(lambda: bench_util.grpc_serving(address, timeout_s=1.0), [child], f"gateway {name}", timeout=90)
    return child, address


@contextlib.contextmanager
def three_gateways(state_dir: Path, database_url: str) -> Iterator[dict[str, str]]:
    vllm_port = free_port()
    children: list[Child] = []
    with bench_util.redis_server() as redis_url:
        try:
            fake = Child(
                "fake-vllm",
                [bench_util.PYTHON, str(Path(__file__).with_name("fake_vllm.py")), "--port", str(vllm_port)],
                dict(os.environ),
                state_dir / "logs" / "fake_vllm.log",
            )
            children.append(fake)
            vllm_url = f"http://{HOST}:{vllm_port}"
            addresses = {}
            for name, env in (
                ("off", {"SIGHTLINE_AUDIT": "off"}),
                ("sqlite", {}),
                ("postgresql", {"SIGHTLINE_DATABASE_URL": database_url}),
            ):
                child, addresses[name] = start_gateway(name, state_dir, vllm_url, redis_url, env)
                children.append(child)
            yield addresses
        finally:
            for child in reversed(children):
                child.stop()


def request(n: int) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        input=inference_pb2.GenerationInput(prompt=f"benchmark prompt {n}"),
        sampling=types_pb2.SamplingParams(max_tokens=MAX_TOKENS),
    )


def concurrency_one(stubs: dict[str, inference_pb2_grpc.InferenceServiceStub], calls: int) -> dict[str, list[float]]:
    """``calls`` per gateway, one at a time, the gateways' order rotating each round; latencies in ms."""
    latencies: dict[str, list[float]] = {name: [] for name in stubs}
    names = list(stubs)
    for n in range(calls):
        for name in names[n % len(names) :] + names[: n % len(names)]:
            started = time.perf_counter()
            stubs[name].Generate(request(n), timeout=30)
            latencies[name].append((time.perf_counter() - started) * 1000)
    return latencies


def concurrency_many(
    stubs: dict[str, inference_pb2_grpc.InferenceServiceStub], clients: int, calls: int, rounds: int
) -> dict[str, JsonDict]:
    """``clients`` threads of ``calls`` each per gateway, one gateway at a time, ``rounds`` times in rotation."""
    latencies: dict[str, list[float]] = {name: [] for name in stubs}
    walls: dict[str, float] = dict.fromkeys(stubs, 0.0)
    names = list(stubs)
    for round_ in range(rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            stub = stubs[name]
            lock = threading.Lock()

            def caller(
                stub: inference_pb2_grpc.InferenceServiceStub = stub, name: str = name, lock: threading.Lock = lock
            ) -> None:
                for n in range(calls):
                    started = time.perf_counter()
                    stub.Generate(request(n), timeout=30)
                    elapsed = (time.perf_counter() - started) * 1000
                    with lock:
                        latencies[name].append(elapsed)

            threads = [threading.Thread(target=caller) for _ in range(clients)]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            walls[name] += time.perf_counter() - started
    return {
        name: {
            "p50_ms": percentile(values, 50),
            "p99_ms": percentile(values, 99),
            "requests_per_s": len(values) / walls[name],
        }
        for name, values in latencies.items()
    }


def append_alone(database_url: str | None, state_dir: Path, count: int) -> JsonDict:
    """The audit write without gRPC or HTTP: AuditLog.append awaited one at a time, into a fresh log."""
    store = open_store(database_url, state_dir)
    audit = AuditLog(store, load_or_create_signer(state_dir / "append-key.pem"), retention_days=183)
    fields = {"kind": "request", "rpc": "Generate", "output_token_ids": list(range(MAX_TOKENS)), "status": "OK"}

    async def run() -> list[float]:
        timings = []
        for _ in range(count):
            started = time.perf_counter()
            await audit.append(NewEntry("bench", now_ms(), dict(fields)))
            timings.append((time.perf_counter() - started) * 1000)
        await audit.stop()
        return timings

    timings = asyncio.run(run())
    return {"appends": count, "p50_ms": percentile(timings, 50), "p99_ms": percentile(timings, 99)}


def export_and_verify(address: str, public_key_pem: Path, out: Path) -> JsonDict:
    with Client(address, timeout=600) as client:
        started = time.perf_counter()
        entries = client.export_audit(out, tenant="*")
        export_s = time.perf_counter() - started
    started = time.perf_counter()
    verified = verify_export(out, load_public_key(public_key_pem.read_bytes()))
    verify_s = time.perf_counter() - started
    assert verified.entries == entries
    return {
        "entries": entries,
        "export_entries_per_s": entries / export_s,
        "verify_entries_per_s": entries / verify_s,
        "export_bytes_per_entry": out.stat().st_size / max(entries, 1),
    }


def disk_fsync(directory: Path, count: int) -> JsonDict:
    """The floor under a durable commit: appending 512 bytes to a file in ``directory`` and fdatasync-ing it."""
    path = directory / "fsync-probe"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    timings = []
    try:
        for _ in range(count):
            os.write(descriptor, b"x" * 512)
            started = time.perf_counter()
            os.fdatasync(descriptor)
            timings.append((time.perf_counter() - started) * 1000)
    finally:
        os.close(descriptor)
        path.unlink()
    return {"fdatasyncs": count, "p50_ms": percentile(timings, 50), "p99_ms": percentile(timings, 99)}


def database_bytes_per_1000(database_url: str | None, state_dir: Path) -> JsonDict:
    store = open_store(database_url, state_dir)
    try:
        entries, size = store.size(), store.database_bytes()
    finally:
        store.close()
    return {"entries": entries, "bytes": size, "bytes_per_1000_requests": size / max(entries, 1) * 1000}


def run(calls: int, clients: int, many_calls: int, rounds: int, appends: int) -> JsonDict:
    state_dir = Path(tempfile.mkdtemp(prefix="sightline-bench-audit-"))
    try:
        return measure(state_dir, calls, clients, many_calls, rounds, appends)
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


def measure(state_dir: Path, calls: int, clients: int, many_calls: int, rounds: int, appends: int) -> JsonDict:
    with postgres_server("bench") as database_url, three_gateways(state_dir, database_url) as addresses:
        channels = {name: grpc.insecure_channel(address) for name, address in addresses.items()}
        stubs = {name: inference_pb2_grpc.InferenceServiceStub(channel) for name, channel in channels.items()}
        concurrency_one(stubs, 20)  # warm-up: connections, first-call paths
        one = concurrency_one(stubs, calls)
        many = concurrency_many(stubs, clients, many_calls, rounds)
        for channel in channels.values():
            channel.close()
        database_urls = {"sqlite": None, "postgresql": database_url}
        exports = {
            name: export_and_verify(
                addresses[name], state_dir / name / "audit" / "signing-key.pem.pub", state_dir / f"{name}.jsonl"
            )
            for name in ("sqlite", "postgresql")
        }
        sizes = {name: database_bytes_per_1000(url, state_dir / name) for name, url in database_urls.items()}
        fsync = disk_fsync(state_dir, appends // 3)
        with postgres_server("append") as append_url:
            alone = {
                "sqlite": append_alone(None, state_dir / "append-sqlite", appends),
                "postgresql": append_alone(append_url, state_dir / "append-pg", appends),
            }
    off_p50 = percentile(one["off"], 50)
    off_p99 = percentile(one["off"], 99)
    concurrency_1 = {
        name: {
            "calls": len(values),
            "p50_ms": percentile(values, 50),
            "p99_ms": percentile(values, 99),
            "added_p50_ms": percentile(values, 50) - off_p50,
            "added_p99_ms": percentile(values, 99) - off_p99,
        }
        for name, values in one.items()
    }
    targets = {name: concurrency_1[name]["added_p50_ms"] < TARGET_ADDED_P50_MS for name in ("sqlite", "postgresql")}
    return {
        "concurrency_1": concurrency_1,
        f"concurrency_{clients}": many,
        "append_alone": alone,
        "disk_fdatasync": fsync,
        "export_verify": exports,
        "database_size": sizes,
        "target_added_p50_ms": TARGET_ADDED_P50_MS,
        "target_met": targets,
    }


def render_markdown(result: JsonDict) -> str:
    one = result["concurrency_1"]
    rows = [
        [
            name,
            fmt(one[name]["p50_ms"]),
            fmt(one[name]["p99_ms"]),
            f"{one[name]['added_p50_ms']:+.3f}" if name != "off" else "—",
            f"{one[name]['added_p99_ms']:+.3f}" if name != "off" else "—",
            fmt(result["append_alone"][name]["p50_ms"], 3) if name != "off" else "—",
        ]
        for name in CONFIGS
    ]
    parts = [markdown_table(["audit", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms", "append alone p50 ms"], rows)]
    many_key = next(k for k in result if k.startswith("concurrency_") and k != "concurrency_1")
    many = result[many_key]
    parts.append(
        markdown_table(
            ["audit", f"{many_key} p50 ms", "p99 ms", "requests/s"],
            [[n, fmt(many[n]["p50_ms"]), fmt(many[n]["p99_ms"]), fmt(many[n]["requests_per_s"], 0)] for n in CONFIGS],
        )
    )
    parts.append(
        markdown_table(
            ["database", "entries", "export entries/s", "verify entries/s", "export bytes/entry", "DB bytes/1000 req"],
            [
                [
                    name,
                    result["export_verify"][name]["entries"],
                    fmt(result["export_verify"][name]["export_entries_per_s"], 0),
                    fmt(result["export_verify"][name]["verify_entries_per_s"], 0),
                    fmt(result["export_verify"][name]["export_bytes_per_entry"], 0),
                    fmt(result["database_size"][name]["bytes_per_1000_requests"], 0),
                ]
                for name in ("sqlite", "postgresql")
            ],
        )
    )
    disk = result["disk_fdatasync"]
    parts.append(
        f"- The disk under the state directory: fdatasync of a 512-byte append p50 {fmt(disk['p50_ms'], 3)} ms, "
        f"p99 {fmt(disk['p99_ms'], 3)} ms; every durable commit pays one."
    )
    met = result["target_met"]
    parts.append(
        f"- Added p50 < {result['target_added_p50_ms']} ms at concurrency 1: SQLite {verdict(met['sqlite'])}, "
        f"PostgreSQL {verdict(met['postgresql'])}."
    )
    return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a few calls: checks that it runs")
    parser.add_argument("--calls", type=int, default=400, help="calls per gateway at concurrency 1")
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args(argv)
    calls, many_calls, rounds, appends = (30, 5, 1, 50) if args.smoke else (args.calls, 100, 3, 1000)
    result = {
        "benchmark": "audit_overhead",
        "command": bench_util.command_line("audit_overhead.py", list(argv if argv is not None else sys.argv[1:])),
        "environment": bench_util.environment(),
        "smoke": args.smoke,
        **run(calls, args.clients, many_calls, rounds, appends),
    }
    name = "audit_overhead_smoke.json" if args.smoke else "audit_overhead.json"
    bench_util.write_result(bench_util.RESULTS_DIR / name, result)
    print(render_markdown(result))


if __name__ == "__main__":
    main()
