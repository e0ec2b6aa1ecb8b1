"""Scaling past one process, measured with real processes on this machine (what deploy/k8s scales):

    .venv/bin/python benchmarks/scale_out.py [--jobs 24] [--clients 16] [--seconds 6]
    .venv/bin/python benchmarks/scale_out.py --smoke          # tiny sizes: checks it runs, no timing claims

Sections (JSON in benchmarks/results/scale_out.json):

- **workers**: one Redis, two gateways (python -m server) and 1, then 2 explainer workers (python -m explainers,
  one torch thread each) explaining a fixed workload: ``--jobs`` ASYNC Explain calls, method ``attention`` over 37 +
  24 forced token ids (distinct per job, so no hidden-state cache hit), submitted alternately to the two gateways and
  each fetched with GetExplanation from the *other* gateway. Reported: wall time from the first submit to the last
  result, jobs/s, and the checks: every job SUCCEEDED on its first attempt, XACK was called exactly once per job
  (none lost, none done twice), and every cross-gateway fetch returned the record. The gateways ask their vLLM only
  for the served model's name, so a benchmarks/fake_vllm.py process stands in for it.
- **vllm_replicas**: benchmarks/fake_vllm.py replicas with a fixed decode time per token and a capacity
  (``--max-running``: at most that many completions decode at once), behind one gateway. Closed-loop throughput of
  ``--clients`` unary callers with one replica and with two (the routing's spread; the fakes stand in for vLLM,
  two real vLLM servers do not fit on two cores). Then a mixed unary/stream load on two replicas with one SIGKILLed
  a third of the way in: calls that failed and could have been retried (must be 0: unary calls and streams that had
  sent nothing), streams cut after sending tokens (UNAVAILABLE), failover time (from the SIGKILL to the gateway
  taking the replica out of routing, read from its log), and the added latency of unary calls moved to the survivor.
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import cast

import bench_util
import grpc
import httpx
import redis
from bench_util import JsonDict
from sightline.v1 import explanations_pb2, explanations_pb2_grpc, inference_pb2, inference_pb2_grpc, types_pb2

from deploy.local_stack import Child, free_port
from explainers.embedded_model import MODEL_NAME, default_model_dir

FAKE_VLLM = Path(__file__).with_name("fake_vllm.py")
PROMPT_TOKENS, OUTPUT_TOKENS = 37, 24
METHOD = "attention"
HOST = "127.0.0.1"


@dataclass
class Processes:
    """Every child this benchmark started, stopped in reverse order at the end."""

    logs: Path
    children: list[Child]

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        child = Child(name, argv, {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, self.logs / f"{name}.log")
        self.children.append(child)
        return child

    def stop_all(self) -> None:
        for child in reversed(self.children):
            child.stop(timeout=30)


@contextmanager
def processes() -> Iterator[Processes]:
    started = Processes(Path(tempfile.mkdtemp(prefix="sightline-scale-out-")), [])
    try:
        yield started
    finally:
        started.stop_all()


def start_fake_vllm(procs: Processes, name: str, token_ms: float, max_running: int = 0) -> tuple[Child, str]:
    port = free_port()
    argv = [bench_util.PYTHON, str(FAKE_VLLM), "--port", str(port), "--token-ms", str(token_ms)]
    child = procs.start(name, [*argv, "--max-running", str(max_running), "--model", MODEL_NAME])
    url = f"http://{HOST}:{port}"
    bench_util.wait_for(lambda: httpx.get(f"{url}/health", timeout=1).status_code == 200, [child], name, 60)
    return child, url


def start_gateway(procs: Processes, name: str, vllm_url: str, redis_url: str, service: str) -> tuple[str, Child]:
    address = f"{HOST}:{free_port()}"
    argv = [bench_util.PYTHON, "-m", "server", "--listen", address, "--vllm-url", vllm_url, "--redis-url", redis_url]
    child = procs.start(name, argv, {"OMP_NUM_THREADS": "1", "OTEL_SDK_DISABLED": "true"})
    bench_util.wait_for(lambda: bench_util.grpc_serving(address, service), [child], name, 120)
    return address, child


def logged_at(log: Path, text: str) -> float | None:
    """Wall-clock time of the first log line containing ``text`` (the gateway's logging format, ms resolution)."""
    for line in log.read_text(errors="replace").splitlines():
        if text in line:
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            return stamp.timestamp()
    return None


# Workers


def explain_request(job: int, round_number: int) -> explanations_pb2.ExplainRequest:
    # Ids from [1000, 40000): no special tokens; distinct per job and round, so every job misses the cache.
    first = 1000 + (round_number * 10_000 + job * (PROMPT_TOKENS + OUTPUT_TOKENS)) % 39_000
    ids = list(range(first, first + PROMPT_TOKENS + OUTPUT_TOKENS))
    return explanations_pb2.ExplainRequest(
        prompt_token_ids=ids[:PROMPT_TOKENS],
        output_token_ids=ids[PROMPT_TOKENS:],
        explain=types_pb2.ExplainSpec(methods=[types_pb2.MethodSpec(name=METHOD)], mode=types_pb2.EXPLAIN_MODE_ASYNC),
    )


def xack_calls(client: redis.Redis) -> int:
    stats = cast(dict[str, dict[str, int]], client.info("commandstats"))
    return int(stats.get("cmdstat_xack", {}).get("calls", 0))


def run_workload(gateways: Sequence[str], client: redis.Redis, jobs: int, round_number: int) -> JsonDict:
    """Submit ``jobs`` explanations alternately to each gateway; fetch each from another gateway."""
    acks_before = xack_calls(client)
    channels = [grpc.insecure_channel(address) for address in gateways]
    stubs = [explanations_pb2_grpc.ExplanationsServiceStub(channel) for channel in channels]
    try:
        started = time.monotonic()
        submitted = [
            (index, stubs[index % len(stubs)].Explain(explain_request(index, round_number), timeout=30).explanation_id)
            for index in range(jobs)
        ]

        def fetch(item: tuple[int, str]) -> types_pb2.Explanation:
            index, explanation_id = item
            other = stubs[(index + 1) % len(stubs)]
            request = explanations_pb2.GetExplanationRequest(explanation_id=explanation_id, wait_seconds=300)
            reply: explanations_pb2.GetExplanationResponse = other.GetExplanation(request, timeout=310)
            return reply.explanation

        with ThreadPoolExecutor(8) as pool:
            fetched = list(pool.map(fetch, submitted))
        wall = time.monotonic() - started
    finally:
        for channel in channels:
            channel.close()
    time.sleep(0.5)  # the last XACK is in the same transaction as the record; let INFO catch up
    succeeded = sum(e.state == types_pb2.EXPLANATION_STATE_SUCCEEDED for e in fetched)
    return {
        "jobs": jobs,
        "wall_s": wall,
        "jobs_per_s": jobs / wall,
        "succeeded": succeeded,
        "first_attempt": sum(e.attempts == 1 for e in fetched),
        "xack_calls": xack_calls(client) - acks_before,
        "distinct_ids": len({explanation_id for _, explanation_id in submitted}),
        "fetched_from_other_gateway": sum(e.explanation_id == i for e, (_, i) in zip(fetched, submitted, strict=True)),
    }


def wait_for_workers(client: redis.Redis, consumers: Sequence[str], children: Sequence[Child]) -> None:
    def polling() -> bool:
        names = {c["name"] for c in client.client_list() if c["cmd"] == "xreadgroup"}
        return set(consumers) <= names

    bench_util.wait_for(polling, list(children), "explainer workers", timeout=600)


def section_workers(jobs: int) -> JsonDict:
    model_dir = Path(os.environ.get("SIGHTLINE_MODEL_DIR", default_model_dir()))
    with ExitStack() as stack:
        redis_url = stack.enter_context(bench_util.redis_server())
        procs = stack.enter_context(processes())
        client = redis.Redis.from_url(redis_url)
        _, vllm_url = start_fake_vllm(procs, "fake-vllm", 0.0)
        workers: list[Child] = []

        def add_worker() -> None:
            consumer = f"worker-{len(workers) + 1}"
            argv = [bench_util.PYTHON, "-m", "explainers", "--model-dir", str(model_dir), "--redis-url", redis_url]
            env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "OTEL_SDK_DISABLED": "true"}
            workers.append(procs.start(consumer, [*argv, "--threads", "1", "--consumer", consumer], env))
            wait_for_workers(client, [f"worker-{n + 1}" for n in range(len(workers))], workers)

        add_worker()
        gateways = [start_gateway(procs, f"gateway-{n}", vllm_url, redis_url, "")[0] for n in (1, 2)]
        # One untimed job per worker count: the first forward pass of a process pays one-off costs.
        run_workload(gateways, client, 1, round_number=90)
        one = run_workload(gateways, client, jobs, round_number=1)
        add_worker()
        run_workload(gateways, client, 2, round_number=91)
        two = run_workload(gateways, client, jobs, round_number=2)
        client.close()
    return {
        "method": METHOD,
        "tokens": [PROMPT_TOKENS, OUTPUT_TOKENS],
        "gateways": 2,
        "one_worker": one,
        "two_workers": two,
        "speedup": two["jobs_per_s"] / one["jobs_per_s"],
    }


# vLLM replicas


@dataclass
class Call:
    streaming: bool
    started: float
    ended: float
    code: str
    tokens: int


def one_call(stub: inference_pb2_grpc.InferenceServiceStub, streaming: bool, max_tokens: int) -> Call:
    started = time.monotonic()
    tokens = 0
    sampling = types_pb2.SamplingParams(max_tokens=max_tokens)
    source = inference_pb2.GenerationInput(prompt="spread the load")
    try:
        if streaming:
            stream_request = inference_pb2.GenerateRequest(input=source, sampling=sampling)
            for reply in stub.GenerateStream(stream_request, timeout=60):
                tokens += len(reply.delta.output_tokens)
        else:
            unary_request = inference_pb2.GenerateRequest(input=source, sampling=sampling)
            tokens = len(stub.Generate(unary_request, timeout=60).output_tokens)
    except grpc.RpcError as exc:
        return Call(streaming, started, time.monotonic(), exc.code().name, tokens)
    return Call(streaming, started, time.monotonic(), "OK", tokens)


def closed_loop(
    address: str, clients: int, seconds: float, max_tokens: int, streaming: Callable[[int, int], bool]
) -> list[Call]:
    calls: list[Call] = []
    lock = threading.Lock()
    ends = time.monotonic() + seconds

    def client(index: int) -> None:
        with grpc.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            for number in itertools.count():
                if time.monotonic() >= ends:
                    return
                call = one_call(stub, streaming(index, number), max_tokens)
                with lock:
                    calls.append(call)

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return calls


def section_vllm_replicas(clients: int, seconds: float, token_ms: float, max_running: int) -> JsonDict:
    max_tokens = 16
    with ExitStack() as stack:
        redis_url = stack.enter_context(bench_util.redis_server())
        procs = stack.enter_context(processes())
        replicas = [start_fake_vllm(procs, f"replica-{n}", token_ms, max_running) for n in (1, 2)]
        service = "sightline.v1.InferenceService"
        single, _ = start_gateway(procs, "gateway-one-replica", replicas[0][1], redis_url, service)
        urls = ",".join(url for _, url in replicas)
        pooled, pooled_gateway = start_gateway(procs, "gateway-two-replicas", urls, redis_url, service)
        throughput = {}
        for name, address in (("one_replica", single), ("two_replicas", pooled)):
            closed_loop(address, clients, 1.0, max_tokens, lambda i, n: False)  # warm-up
            calls = closed_loop(address, clients, seconds, max_tokens, lambda i, n: False)
            assert all(call.code == "OK" for call in calls), {call.code for call in calls}
            throughput[name] = len(calls) / seconds

        results: list[Call] = []
        killed_at = 0.0
        killed_at_wall = 0.0

        def kill_later() -> None:
            nonlocal killed_at, killed_at_wall
            time.sleep(seconds / 3)
            killed_at, killed_at_wall = time.monotonic(), time.time()
            replicas[0][0].process.send_signal(signal.SIGKILL)

        killer = threading.Thread(target=kill_later)
        killer.start()
        results = closed_loop(pooled, clients, seconds, max_tokens, lambda i, n: (i + n) % 2 == 0)
        killer.join()
        # Failover time: from the kill until the gateway took the replica out of routing (its first failed call).
        out_at = logged_at(pooled_gateway.log_path, f"vLLM replica {replicas[0][1]} failed a call")
    return {
        "token_ms": token_ms,
        "max_running_per_replica": max_running,
        "clients": clients,
        "max_tokens": max_tokens,
        "calls_per_s": throughput,
        "speedup": throughput["two_replicas"] / throughput["one_replica"],
        "kill": failover_summary(results, killed_at, token_ms * max_tokens / 1000)
        | {"replica_out_of_routing_after_s": None if out_at is None else out_at - killed_at_wall},
    }


def failover_summary(calls: Sequence[Call], killed_at: float, decode_s: float) -> JsonDict:
    spanning = [c for c in calls if c.started < killed_at < c.ended]
    failed = [c for c in calls if c.code != "OK"]
    retryable_failed = [c for c in failed if not c.streaming or c.tokens == 0]
    cut_streams = [c for c in failed if c.streaming and c.tokens > 0]
    before = [c.ended - c.started for c in calls if c.ended < killed_at and not c.streaming and c.code == "OK"]
    moved = [c.ended - c.started for c in spanning if not c.streaming and c.code == "OK"]
    after_failures = [c for c in failed if c.started > killed_at]
    return {
        "calls": len(calls),
        "in_flight_at_kill": len(spanning),
        "failed": len(failed),
        "failed_codes": sorted({c.code for c in failed}),
        "retryable_failed": len(retryable_failed),
        "streams_cut_after_tokens": len(cut_streams),
        "failed_after_kill_started": len(after_failures),
        "unary_latency_before_kill_p50_s": bench_util.percentile(before, 50),
        "unary_latency_spanning_kill_max_s": max(moved, default=float("nan")),
        # A unary call on the killed replica restarts from scratch on the survivor, which now has half the capacity:
        # its added latency is the decode it had done on the dead one, the move, and queueing on the survivor.
        "moved_call_added_latency_max_s": max(moved, default=decode_s) - decode_s,
        "call_log": [asdict(c) | {"started": c.started - killed_at, "ended": c.ended - killed_at} for c in calls],
    }


def render_markdown(result: JsonDict) -> str:
    lines = []
    if "workers" in result:
        w = result["workers"]
        rows = [
            [name, r["jobs"], bench_util.fmt(r["wall_s"]), bench_util.fmt(r["jobs_per_s"]), r["succeeded"],
             r["first_attempt"], r["xack_calls"], r["fetched_from_other_gateway"]]
            for name, r in (("1 worker", w["one_worker"]), ("2 workers", w["two_workers"]))
        ]  # fmt: skip
        lines += [
            f"Explainer workers ({w['method']}, {w['tokens'][0]} + {w['tokens'][1]} tokens, 2 gateways, one Redis):",
            "",
            bench_util.markdown_table(
                ["workers", "jobs", "wall (s)", "jobs/s", "succeeded", "1st attempt", "XACKs", "fetched via other"],
                rows,
            ),
            "",
            f"Speed-up with 2 workers: {w['speedup']:.2f}x.",
            "",
        ]
    if "vllm_replicas" in result:
        v = result["vllm_replicas"]
        kill = v["kill"]
        lines += [
            f"vLLM replicas (fake, {v['token_ms']} ms/token, {v['max_running_per_replica']} running per replica, "
            f"{v['clients']} clients): {v['calls_per_s']['one_replica']:.1f} calls/s on one replica, "
            f"{v['calls_per_s']['two_replicas']:.1f} on two ({v['speedup']:.2f}x).",
            "",
            f"One of two killed mid-load: {kill['calls']} calls, {kill['in_flight_at_kill']} in flight at the kill, "
            f"{kill['failed']} failed ({', '.join(kill['failed_codes']) or 'none'}), of which retryable: "
            f"{kill['retryable_failed']}; streams cut after sending tokens: {kill['streams_cut_after_tokens']}; "
            f"failed among calls started after the kill: {kill['failed_after_kill_started']}. Unary p50 before: "
            f"{kill['unary_latency_before_kill_p50_s']:.3f} s; slowest unary call moved to the survivor: "
            f"{kill['unary_latency_spanning_kill_max_s']:.3f} s (at most "
            f"{kill['moved_call_added_latency_max_s']:.3f} s added, queueing on the survivor included). "
            "Replica out of routing "
            f"{bench_util.fmt(kill['replica_out_of_routing_after_s'], 3)} s after the kill.",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--token-ms", type=float, default=10.0)
    parser.add_argument("--max-running", type=int, default=4)
    parser.add_argument("--sections", nargs="+", default=["workers", "vllm_replicas"])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs, no timing claims")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/scale_out[_smoke].json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.jobs, args.clients, args.seconds = 2, 4, 2.0
    out = args.out or bench_util.RESULTS_DIR / f"scale_out{'_smoke' if args.smoke else ''}.json"
    result: JsonDict = {
        "benchmark": "scale_out",
        "command": bench_util.command_line("scale_out.py", list(argv if argv is not None else sys.argv[1:])),
        "environment": bench_util.environment(),
        "smoke": args.smoke,
    }
    if "vllm_replicas" in args.sections:
        result["vllm_replicas"] = section_vllm_replicas(args.clients, args.seconds, args.token_ms, args.max_running)
    if "workers" in args.sections:
        result["workers"] = section_workers(args.jobs)
    bench_util.write_result(out, result)
    print(render_markdown(result))
    problems = failures(result)
    if problems:
        raise SystemExit("; ".join(problems))


def failures(result: JsonDict) -> list[str]:
    """What must hold whatever the timings: nothing lost, nothing twice, nothing retryable failed."""
    problems = []
    if "workers" in result:
        for name in ("one_worker", "two_workers"):
            run = result["workers"][name]
            jobs = run["jobs"]
            if not run["succeeded"] == run["first_attempt"] == run["xack_calls"] == run["distinct_ids"] == jobs:
                problems.append(f"{name}: a job was lost, failed or done twice: {run}")
            if run["fetched_from_other_gateway"] != jobs:
                problems.append(f"{name}: another gateway did not serve every explanation")
    if "vllm_replicas" in result:
        kill = result["vllm_replicas"]["kill"]
        if kill["retryable_failed"] or kill["failed_after_kill_started"]:
            problems.append(f"calls that could have been retried failed: {kill['retryable_failed']}")
        if set(kill["failed_codes"]) - {"UNAVAILABLE"}:
            problems.append(f"failures other than UNAVAILABLE: {kill['failed_codes']}")
    return problems


if __name__ == "__main__":
    main()
