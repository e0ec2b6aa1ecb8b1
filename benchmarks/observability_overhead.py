"""Observability costs: tracing + metrics per request (side by side with them off), and the viewer's page load.

    .venv/bin/python benchmarks/observability_overhead.py            # 600 requests per side, 5 page loads
    .venv/bin/python benchmarks/observability_overhead.py --smoke    # a few of each (CI: checks it still runs)

Per request: two real gateways (``python -m server``) in front of the same instant fake vLLM
(benchmarks/fake_vllm.py) and Redis. "on" exports every span over OTLP/gRPC to a collector in this process (which
decodes and drops them) and serves /metrics, scraped every second (Prometheus scrapes every 15 s by default);
"off" has ``OTEL_SDK_DISABLED=true`` and no metrics endpoint (its counters still count: they are plain in-process
increments). The sides alternate in rounds of unary ``Generate`` calls (16 tokens, one caller at a time) so drift
on a shared machine hits both. Reported: p50/p99 latency of each side and the gateway's CPU time per request
(utime + stime from /proc, the steadiest number on a shared machine); the overhead is on minus off.

Page load: a 1,024-token explanation (512 prompt + 512 generated tokens, input_x_gradient over every generated
token with word aggregation and faithfulness, logit lens over every layer) is written to Redis in the record
layout of common/jobs.py, then opened in headless Chromium (Selenium) at /explanations/<id> with an API key.
Timed: from navigation to every token rendered, and from a click on the last generated token to its sources
listed. The JSON payload's size is reported too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent import futures
from pathlib import Path

import bench_util
import grpc
import httpx
import numpy as np
import redis
from bench_util import JsonDict, fmt, markdown_table, percentile
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from sightline.v1 import explanations_pb2, inference_pb2, inference_pb2_grpc, types_pb2

from common.jobs import (
    RECORD_ATTEMPTS,
    RECORD_EXPLANATION,
    RECORD_STATE,
    RECORD_SUMMARY,
    RECORD_TENANT,
    explanation_key,
    new_explanation_id,
    tenant_explanations_key,
)
from deploy.local_stack import Child, free_port
from server.keys import hash_key, new_key

MODEL = "smollm2-135m-instruct"
HOST = "127.0.0.1"
TENANT = "bench"
LAYERS = 31  # the embedded model's 30 decoder layers and the embedding output
PROMPT_TOKENS = GENERATED_TOKENS = 512


class DroppingCollector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC endpoint that decodes every export (as a collector must) and keeps only the span count."""

    def __init__(self) -> None:
        self.spans = 0
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port(f"{HOST}:0")
        self._server.start()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def stop(self) -> None:
        self._server.stop(grace=None)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def gateway(name: str, env: dict[str, str], logs: Path) -> tuple[Child, str]:
    address = f"{HOST}:{free_port()}"
    child = Child(name, [bench_util.PYTHON, "-m", "server", "--listen", address], {**env}, logs / f"{name}.log")
    return child, address


def scrape_forever(url: str, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(url, timeout=2)


async def timed_requests(address: str, count: int) -> list[float]:
    request = inference_pb2.GenerateRequest(
        input=inference_pb2.GenerationInput(prompt="Tell me about observability."),
        sampling=types_pb2.SamplingParams(max_tokens=16, temperature=0),
    )
    latencies = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for _ in range(count):
            started = time.perf_counter()
            await stub.Generate(request, timeout=30)
            latencies.append(time.perf_counter() - started)
    return latencies


def measure_overhead(logs: Path, requests_per_round: int, rounds: int) -> JsonDict:
    collector = DroppingCollector()
    redis_port, vllm_port = free_port(), free_port()
    base = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", SIGHTLINE_VIEWER_LISTEN="off")
    base.update(SIGHTLINE_VLLM_URL=f"http://{HOST}:{vllm_port}", SIGHTLINE_REDIS_URL=f"redis://{HOST}:{redis_port}/0")
    metrics_port = free_port()
    sides = {
        "off": {**base, "OTEL_SDK_DISABLED": "true", "SIGHTLINE_METRICS_LISTEN": "off"},
        "on": {
            **base,
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://{HOST}:{collector.port}",
            "OTEL_EXPORTER_OTLP_TRACES_INSECURE": "true",
            "SIGHTLINE_METRICS_LISTEN": f"{HOST}:{metrics_port}",
        },
    }
    children = [
        Child("redis", ["redis-server", "--bind", HOST, "--port", str(redis_port), "--save", ""], base, logs / "r.log"),
        Child(
            "fake-vllm",
            [
                bench_util.PYTHON,
                str(Path(__file__).with_name("fake_vllm.py")),
                "--port",
                str(vllm_port),
                "--token-ms",
                "0",
                "--model",
                MODEL,
            ],
            base,
            logs / "fake_vllm.log",
        ),
    ]
    stop_scraping = threading.Event()
    try:
        addresses = {}
        for name, env in sides.items():
            child, address = gateway(f"gateway-{name}", env, logs)
            children.append(child)
            addresses[name] = (address, child.process.pid)
        for name, (address, _) in addresses.items():
            bench_util.wait_for(lambda a=address: bench_util.grpc_serving(a), children, f"gateway {name}", timeout=120)  # type: ignore[misc]
        scraper = threading.Thread(
            target=scrape_forever, args=(f"http://{HOST}:{metrics_port}/metrics", stop_scraping), daemon=True
        )
        scraper.start()
        for address, _ in addresses.values():
            asyncio.run(timed_requests(address, 10))  # warm-up
        latencies: dict[str, list[float]] = {name: [] for name in sides}
        cpu: dict[str, float] = dict.fromkeys(sides, 0.0)
        for round_index in range(rounds):
            order = list(sides) if round_index % 2 == 0 else list(reversed(sides))
            for name in order:
                address, pid = addresses[name]
                before = cpu_seconds(pid)
                latencies[name] += asyncio.run(timed_requests(address, requests_per_round))
                cpu[name] += cpu_seconds(pid) - before
        time.sleep(1.5)  # the last batch of spans
    finally:
        stop_scraping.set()
        for child in reversed(children):
            child.stop()
        collector.stop()
    result: JsonDict = {"requests_per_side": requests_per_round * rounds, "spans_exported": collector.spans}
    for name in sides:
        values = latencies[name]
        result[name] = {
            "p50_ms": percentile(values, 50) * 1000,
            "p99_ms": percentile(values, 99) * 1000,
            "mean_ms": statistics.fmean(values) * 1000,
            "cpu_ms_per_request": cpu[name] * 1000 / len(values),
        }
    result["overhead"] = {
        "p50_ms": result["on"]["p50_ms"] - result["off"]["p50_ms"],
        "cpu_ms_per_request": result["on"]["cpu_ms_per_request"] - result["off"]["cpu_ms_per_request"],
    }
    return result


def tensor(values: np.ndarray) -> types_pb2.Tensor:
    if values.dtype.kind == "i":
        return types_pb2.Tensor(dtype=types_pb2.DTYPE_INT32, shape=list(values.shape), int_values=values.reshape(-1))
    return types_pb2.Tensor(dtype=types_pb2.DTYPE_FLOAT32, shape=list(values.shape), float_values=values.reshape(-1))


def long_explanation(explanation_id: str) -> types_pb2.Explanation:
    """A 1,024-token explanation shaped as the explainer writes one, with random scores."""
    rng = np.random.default_rng(7)
    total = PROMPT_TOKENS + GENERATED_TOKENS
    words = ["The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", "."]
    tokens = [types_pb2.Token(id=100 + i % 50, text=words[i % len(words)]) for i in range(total)]
    for token in tokens[PROMPT_TOKENS:]:
        token.logprob = float(-rng.random())
    targets = list(range(PROMPT_TOKENS, total))
    matrix = rng.standard_normal((len(targets), total - 1)).astype(np.float32)
    for row, position in enumerate(targets):
        matrix[row, position:] = 0.0
    groups = [types_pb2.SourceGroup(start=s, end=min(s + 2, total), label="word") for s in range(0, total, 2)]
    aggregated = rng.standard_normal((len(targets), len(groups))).astype(np.float32)
    fractions = [0.1, 0.2, 0.3]
    faithfulness = types_pb2.Faithfulness(
        fractions=fractions, comprehensiveness=[0.1] * 3, sufficiency=[0.2] * 3, random_comprehensiveness=[0.05] * 3,
        random_sufficiency=[0.3] * 3, aopc_comprehensiveness=0.1, aopc_sufficiency=0.2,
        random_aopc_comprehensiveness=0.05, random_aopc_sufficiency=0.3,
    )  # fmt: skip
    k = 5
    explanation = types_pb2.Explanation(
        explanation_id=explanation_id,
        state=types_pb2.EXPLANATION_STATE_SUCCEEDED,
        model=MODEL,
        tokens=tokens,
        prompt_length=PROMPT_TOKENS,
        target_positions=targets,
        target_score=types_pb2.TARGET_SCORE_LOGPROB,
        source_groups=groups,
        trace_id="0" * 32,
        step_scores=types_pb2.StepScores(
            logprobs=[-0.5] * len(targets),
            probabilities=[0.6] * len(targets),
            entropies=[1.0] * len(targets),
            ranks=[1] * len(targets),
            top_token_ids=tensor(rng.integers(100, 150, (len(targets), k)).astype(np.int32)),
            top_logprobs=tensor(-rng.random((len(targets), k)).astype(np.float32)),
        ),
        results=[
            types_pb2.MethodResult(
                method="input_x_gradient",
                attributions=tensor(matrix),
                aggregated=tensor(aggregated),
                faithfulness=faithfulness,
                seconds=1.0,
            ),
            types_pb2.MethodResult(
                method="logit_lens",
                extras={
                    "top_token_ids": tensor(rng.integers(100, 150, (LAYERS, len(targets), k)).astype(np.int32)),
                    "top_logprobs": tensor(-rng.random((LAYERS, len(targets), k)).astype(np.float32)),
                    "target_logprobs": tensor(-rng.random((LAYERS, len(targets))).astype(np.float32)),
                },
                seconds=0.5,
            ),
        ],
    )
    explanation.fidelity.max_abs_logprob_diff = 1e-5
    explanation.created_at.GetCurrentTime()
    explanation.completed_at.GetCurrentTime()
    return explanation


def store(client: redis.Redis, explanation: types_pb2.Explanation) -> None:
    summary = explanations_pb2.ExplanationSummary(
        explanation_id=explanation.explanation_id,
        state=explanation.state,
        model=explanation.model,
        methods=[r.method for r in explanation.results],
        created_at=explanation.created_at,
    )
    client.hset(
        explanation_key(explanation.explanation_id),
        mapping={
            RECORD_TENANT: TENANT,
            RECORD_ATTEMPTS: 1,
            RECORD_EXPLANATION: explanation.SerializeToString(),
            RECORD_SUMMARY: summary.SerializeToString(),
            RECORD_STATE: explanation.state,
        },
    )
    client.zadd(tenant_explanations_key(TENANT), {explanation.explanation_id: explanation.created_at.ToMilliseconds()})


def measure_page_load(logs: Path, loads: int) -> JsonDict:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    key = new_key()
    key_file = logs / "keys.json"
    key_file.write_text(json.dumps({"keys": [{"id": "b", "tenant": TENANT, "sha256": hash_key(key).hex()}]}))
    redis_port, vllm_port, viewer_port = free_port(), free_port(), free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", OTEL_SDK_DISABLED="true")
    env.update(
        SIGHTLINE_VLLM_URL=f"http://{HOST}:{vllm_port}",
        SIGHTLINE_REDIS_URL=f"redis://{HOST}:{redis_port}/0",
        SIGHTLINE_API_KEYS_FILE=str(key_file),
        SIGHTLINE_METRICS_LISTEN="off",
        SIGHTLINE_VIEWER_LISTEN=f"{HOST}:{viewer_port}",
    )
    children = [
        Child("redis", ["redis-server", "--bind", HOST, "--port", str(redis_port), "--save", ""], env, logs / "r2.log")
    ]
    driver = None
    try:
        client = redis.Redis(host=HOST, port=redis_port)
        bench_util.wait_for(lambda: bool(client.ping()), children, "redis", timeout=60)
        explanation = long_explanation(new_explanation_id())
        store(client, explanation)
        child, _ = gateway("viewer-gateway", env, logs)
        children.append(child)
        url = f"http://{HOST}:{viewer_port}"

        def viewer_up() -> bool:
            try:
                return httpx.get(url + "/", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        bench_util.wait_for(viewer_up, children, "viewer", timeout=120)
        api = f"{url}/api/explanations/{explanation.explanation_id}"
        payload_bytes = len(httpx.get(api, headers={"Authorization": f"Bearer {key}"}, timeout=30).content)
        options = webdriver.ChromeOptions()
        for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000",
                         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):  # fmt: skip
            options.add_argument(argument)
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "chromedriver"), options=options)
        driver.get(url + "/")
        driver.execute_script("sessionStorage.setItem('sightline-api-key', arguments[0])", key)
        total = PROMPT_TOKENS + GENERATED_TOKENS
        render_s, select_s = [], []
        for _ in range(loads):
            started = time.perf_counter()
            driver.get(f"{url}/explanations/{explanation.explanation_id}")
            WebDriverWait(driver, 120, poll_frequency=0.02).until(
                lambda d: len(d.find_elements(By.CSS_SELECTOR, "#tokens .token")) == total
            )
            render_s.append(time.perf_counter() - started)
            last = driver.find_element(By.CSS_SELECTOR, f'.token.target[data-position="{total - 1}"]')
            started = time.perf_counter()
            last.click()
            WebDriverWait(driver, 60, poll_frequency=0.02).until(
                lambda d: d.find_elements(By.CSS_SELECTOR, "#sources li")
            )
            select_s.append(time.perf_counter() - started)
    finally:
        if driver is not None:
            driver.quit()
        for child in reversed(children):
            child.stop()
    return {
        "tokens": PROMPT_TOKENS + GENERATED_TOKENS,
        "payload_bytes": payload_bytes,
        "loads": loads,
        "render_median_s": statistics.median(render_s),
        "render_max_s": max(render_s),
        "select_token_median_s": statistics.median(select_s),
    }


def render_markdown(result: JsonDict) -> str:
    overhead = result["per_request"]
    rows = [
        [name, fmt(overhead[name]["p50_ms"]), fmt(overhead[name]["p99_ms"]), fmt(overhead[name]["cpu_ms_per_request"])]
        for name in ("off", "on")
    ]
    page = result["page_load"]
    return "\n\n".join(
        [
            f"{overhead['requests_per_side']} unary Generate calls per side "
            "(16 tokens, instant fake vLLM, one caller); "
            f"{overhead['spans_exported']} spans exported by the 'on' side.",
            markdown_table(["tracing + metrics", "p50 ms", "p99 ms", "gateway CPU ms/request"], rows),
            f"Overhead: {fmt(overhead['overhead']['p50_ms'])} ms at p50, "
            f"{fmt(overhead['overhead']['cpu_ms_per_request'])} ms of gateway CPU per request.",
            f"Viewer, {page['tokens']}-token explanation ({page['payload_bytes'] / 1e6:.1f} MB of JSON): rendered in "
            f"{fmt(page['render_median_s'], 3)} s (median of {page['loads']}, max {fmt(page['render_max_s'], 3)} s); "
            f"a click on a token shows its sources in {fmt(page['select_token_median_s'], 3)} s.",
        ]
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a few requests and one page load")
    parser.add_argument("--requests-per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--page-loads", type=int, default=5)
    args = parser.parse_args(argv)
    per_round, rounds, loads = (5, 2, 1) if args.smoke else (args.requests_per_round, args.rounds, args.page_loads)
    with tempfile.TemporaryDirectory(prefix="sightline-observability-") as state:
        logs = Path(state) / "logs"
        logs.mkdir()
        result: JsonDict = {
            "benchmark": "observability_overhead",
            "command": bench_util.command_line("observability_overhead.py", argv or []),
            "environment": bench_util.environment(),
            "per_request": measure_overhead(logs, per_round, rounds),
            "page_load": measure_page_load(logs, loads),
        }
    name = "observability_overhead_smoke.json" if args.smoke else "observability_overhead.json"
    bench_util.write_result(bench_util.RESULTS_DIR / name, result)
    print(render_markdown(result))


if __name__ == "__main__":
    main()
