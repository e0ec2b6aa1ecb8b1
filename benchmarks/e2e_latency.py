"""End-to-end latency of the France question through a running gateway, with and without an explanation.

    python benchmarks/e2e_latency.py [--target 127.0.0.1:50051] [--runs 5] [--out benchmarks/results/e2e_latency.json]

Both variants run interleaved in one process against the same stack, so their ratio is a side-by-side
measurement; absolute times depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from sightline import Client

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
VARIANTS: dict[str, list[str]] = {
    "generate": [],
    "generate + input_x_gradient (SYNC)": ["input_x_gradient"],
    "generate + logit_lens (SYNC)": ["logit_lens"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/e2e_latency.json"))
    args = parser.parse_args()

    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with Client(args.target, timeout=600) as client:
        client.generate(QUESTION, max_tokens=16)  # warm-up
        for _ in range(args.runs):
            for name, methods in VARIANTS.items():
                started = time.perf_counter()
                generation = client.generate(QUESTION, max_tokens=16, explain=methods or None)
                seconds[name].append(time.perf_counter() - started)
                assert "Paris" in generation.text, generation.text
    baseline = statistics.median(seconds["generate"])
    results = {
        name: {
            "median_s": statistics.median(values),
            "runs": values,
            "vs_generate": statistics.median(values) / baseline,
        }
        for name, values in seconds.items()
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print("| variant | median (s) | ratio to generate |\n| --- | --- | --- |")
    for name, row in results.items():
        print(f"| {name} | {row['median_s']:.3f} | {row['vs_generate']:.2f} |")


if __name__ == "__main__":
    main()
