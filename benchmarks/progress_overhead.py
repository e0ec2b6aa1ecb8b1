"""What publishing a job's progress costs: the same explanation with and without it, on the embedded model.

    .venv/bin/python benchmarks/progress_overhead.py            # 3 rounds of each side
    .venv/bin/python benchmarks/progress_overhead.py --smoke    # 1 round, a short job (CI: checks it still runs)

Each round runs one integrated-gradients job (in-process, through explainers.engine.explain, no hidden-state cache so
every run computes) without tracking and with tracking published the way a worker publishes it
(explainers.worker.progress_publisher: one pipelined HSET + HGET to a real redis-server per publish, at most every
0.25 s); the sides alternate so drift on a shared machine hits both. Reported: median seconds per side, the
overhead (on minus off, relative), the publishes per job and the mean round trip of one publish.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import bench_util
import redis
from bench_util import JsonDict, fmt, markdown_table
from sightline.v1 import types_pb2

from common.jobs import RECORD_TENANT, explanation_key
from explainers.embedded_model import default_model_dir, prepare_model
from explainers.engine import explain
from explainers.model import LoadedModel, load_model
from explainers.progress import Tracking
from explainers.worker import progress_publisher

RESULT = bench_util.RESULTS_DIR / "progress_overhead.json"
SMOKE_RESULT = bench_util.RESULTS_DIR / "progress_overhead_smoke.json"


def _job(loaded: LoadedModel, tokens: int, steps: int, tracking: Tracking | None) -> float:
    prompt = [1000 + (7 * i) % 5000 for i in range(tokens - tokens // 4)]
    output = [2000 + (11 * i) % 5000 for i in range(tokens // 4)]
    started = time.perf_counter()
    explain(loaded, None, prompt, output, [("integrated_gradients", {"steps": steps})], None, None, tracking)
    return time.perf_counter() - started


def run(rounds: int, tokens: int, steps: int) -> JsonDict:
    prepare_model()
    loaded = load_model(default_model_dir())
    off: list[float] = []
    on: list[float] = []
    publishes: list[int] = []
    publish_seconds: list[float] = []
    with bench_util.redis_server() as url:
        client = redis.Redis.from_url(url)
        record = types_pb2.Explanation(explanation_id="exp_bench")
        client.hset(explanation_key(record.explanation_id), RECORD_TENANT, "bench")
        publish = progress_publisher(client, record)

        def timed_publish(snapshot: types_pb2.ExplanationProgress) -> str | None:
            started = time.perf_counter()
            answer = publish(snapshot)
            publish_seconds.append(time.perf_counter() - started)
            return answer

        _job(loaded, tokens, steps, None)  # warm-up
        for _ in range(rounds):
            off.append(_job(loaded, tokens, steps, None))
            before = len(publish_seconds)
            on.append(_job(loaded, tokens, steps, Tracking(timed_publish, seconds_per_pass=0.1)))
            publishes.append(len(publish_seconds) - before)
        client.close()
    off_median, on_median = statistics.median(off), statistics.median(on)
    return {
        "benchmark": "progress_overhead",
        "command": bench_util.command_line("progress_overhead.py", []),
        "environment": bench_util.environment(),
        "job": {"method": "integrated_gradients", "steps": steps, "tokens": tokens, "targets": tokens // 4},
        "rounds": rounds,
        "seconds_off": off,
        "seconds_on": on,
        "median_seconds_off": off_median,
        "median_seconds_on": on_median,
        "overhead_relative": (on_median - off_median) / off_median,
        "publishes_per_job": statistics.median(publishes),
        "mean_publish_seconds": statistics.fmean(publish_seconds),
        "publish_seconds_per_job": statistics.fmean(publish_seconds) * statistics.median(publishes),
    }


def render_markdown(result: JsonDict) -> str:
    job = result["job"]
    return markdown_table(
        ["job", "off (median s)", "on (median s)", "overhead", "publishes/job", "one publish (ms)"],
        [
            [
                f"{job['method']}, {job['steps']} steps, {job['tokens']} tokens",
                fmt(result["median_seconds_off"]),
                fmt(result["median_seconds_on"]),
                f"{result['overhead_relative'] * 100:+.1f}%",
                fmt(result["publishes_per_job"], 0),
                fmt(result["mean_publish_seconds"] * 1000, 3),
            ]
        ],
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--smoke", action="store_true", help="one round of a short job")
    args = parser.parse_args(argv)
    result = run(1, 24, 2) if args.smoke else run(3, 48, 4)
    bench_util.write_result(SMOKE_RESULT if args.smoke else RESULT, result)
    print(render_markdown(result))


if __name__ == "__main__":
    main()
