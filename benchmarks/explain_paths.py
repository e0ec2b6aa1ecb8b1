"""Fast path vs general path: the same explanations of the embedded model (SmolLM2, a Llama), once through the
hand-written backward pass (explainers.backprop) and once through autograd over the Hugging Face module
(explainers.general_path), which explains every other supported family.

    .venv/bin/python benchmarks/explain_paths.py [--generated 32] [--repeats 2] [--threads 1]
    .venv/bin/python benchmarks/explain_paths.py --smoke        # 8 generated tokens, 1 repeat: checks it runs

Both paths run `explainers.engine.explain` (no cache) on one model object loaded with `load_model` (float32, SDPA),
the general one as `dataclasses.replace(loaded, force_general_path=True)`, alternating per repeat so that a burst of
other work on the machine hits both. A sequence is a prompt of 64 fixed random token ids (numpy seed 0, from [100,
vocab)) followed by `--generated` ones, all explained. Reported per method: median wall time of each path and the
ratio general / fast, and the largest difference between the two paths' attributions relative to the largest
attribution (the paths are both exact: this is float32 rounding). Perturbation methods share their code between the
paths (both run the module with its KV cache), so their ratio shows the cost of the forward passes only.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import bench_util
import numpy as np
import torch
from bench_util import JsonDict, markdown_table

PROMPT_TOKENS = 64
METHODS: tuple[tuple[str, dict[str, object]], ...] = (
    ("saliency", {}),
    ("input_x_gradient", {}),
    ("integrated_gradients", {"steps": 8}),
    ("gradient_x_activation", {"layer": 15}),
    ("occlusion", {"replacement": "unk"}),
    ("attention", {}),
    ("logit_lens", {}),
)


def measure(model_dir: Path, generated: int, repeats: int) -> JsonDict:
    from explainers.engine import explain
    from explainers.model import load_model

    fast = load_model(model_dir)
    general = dataclasses.replace(fast, force_general_path=True)
    rng = np.random.default_rng(0)
    ids = rng.integers(100, fast.vocab_size, PROMPT_TOKENS + generated).tolist()
    prompt, output = ids[:PROMPT_TOKENS], ids[PROMPT_TOKENS:]
    rows = []
    for method, params in METHODS:
        seconds: dict[str, list[float]] = {"fast": [], "general": []}
        results: dict[str, np.ndarray] = {}
        for _ in range(repeats):
            for name, loaded in (("fast", fast), ("general", general)):
                started = time.perf_counter()
                explanation = explain(loaded, None, prompt, output, [(method, params)], None)
                seconds[name].append(time.perf_counter() - started)
                result = explanation.results[0]
                packed = result.attributions if result.HasField("attributions") else result.extras["target_logprobs"]
                results[name] = np.array(packed.float_values, dtype=np.float32)
        fast_s, general_s = statistics.median(seconds["fast"]), statistics.median(seconds["general"])
        scale = float(np.abs(results["fast"]).max()) or 1.0
        rows.append(
            {
                "method": method,
                "params": params,
                "fast_s": fast_s,
                "general_s": general_s,
                "general_over_fast": general_s / fast_s,
                "max_relative_difference": float(np.abs(results["fast"] - results["general"]).max()) / scale,
                "all_seconds": seconds,
            }
        )
        print(
            f"{method}: fast {fast_s:.3f} s, general {general_s:.3f} s, ratio {general_s / fast_s:.2f}", file=sys.stderr
        )
    return {"model": fast.model_name, "prompt_tokens": PROMPT_TOKENS, "generated": generated, "methods": rows}


def render_markdown(result: JsonDict) -> str:
    rows = [
        [
            row["method"],
            bench_util.fmt(row["fast_s"], 3),
            bench_util.fmt(row["general_s"], 3),
            bench_util.fmt(row["general_over_fast"], 2),
            f"{row['max_relative_difference']:.1e}",
        ]
        for row in result["methods"]
    ]
    heading = (
        f"{result['model']}, {result['prompt_tokens']} prompt + {result['generated']} generated tokens, all explained; "
        f"median of {result['repeats']}, {result['threads']} thread(s)."
    )
    table = markdown_table(["method", "fast path (s)", "general path (s)", "general / fast", "max rel. diff"], rows)
    return heading + "\n\n" + table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generated", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="8 generated tokens, 1 repeat; no timing claims")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    from explainers.embedded_model import default_model_dir

    torch.set_num_threads(args.threads)
    generated, repeats = (8, 1) if args.smoke else (args.generated, args.repeats)
    result: JsonDict = {
        "benchmark": "explain_paths",
        "command": bench_util.command_line("explain_paths.py", sys.argv[1:] if argv is None else argv),
        "environment": bench_util.environment(),
        "smoke": args.smoke,
        "repeats": repeats,
        "threads": args.threads,
        **measure(args.model_dir or default_model_dir(), generated, repeats),
    }
    name = "explain_paths_smoke.json" if args.smoke else "explain_paths.json"
    bench_util.write_result(args.out or bench_util.RESULTS_DIR / name, result)
    print(render_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
