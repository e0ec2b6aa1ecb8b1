"""Memory of the fast path vs the general path: the peak resident memory one explanation of the embedded model
(SmolLM2) adds, per method, on each path. The speed of the same explanations is benchmarks/explain_paths.py's, whose
methods and sequence this uses.

    .venv/bin/python benchmarks/explain_path_memory.py [--generated 32] [--threads 1] [--methods saliency ...]
    .venv/bin/python benchmarks/explain_path_memory.py --smoke     # 8 generated tokens, saliency only: checks it runs

Each (path, method) runs in a fresh process: it loads the model with `load_model` (float32) and copies its weights
out of the mmapped file into anonymous memory (file pages come and go with memory pressure), runs the method once to
warm up, resets the kernel's peak-RSS mark (`/proc/self/clear_refs` 5, Linux), runs it again through
`explainers.engine.explain` (no cache) and reads the peak back (`VmHWM`). glibc is told to map every block of 64 KiB
or more on its own and unmap it when freed (`MALLOC_MMAP_THRESHOLD_`), so resident memory follows the live tensors
instead of keeping the warm-up's freed blocks. Reported: the peak minus the resident memory just before the measured
run (the working set one explanation needs on top of the loaded model), and the process's resident memory after
loading. A fresh process per (path, method) keeps one run's leftovers out of the next one's numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import bench_util
import numpy as np
import torch
from bench_util import JsonDict, markdown_table
from explain_paths import METHODS, PROMPT_TOKENS
from sightline.v1 import types_pb2

PATHS = ("fast", "general")
PROTO_PATHS = {"fast": types_pb2.EXPLAIN_PATH_FAST, "general": types_pb2.EXPLAIN_PATH_GENERAL}
SMOKE_METHODS = ("saliency",)


def _status_kib(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_one(model_dir: Path, path: str, method: str, generated: int) -> JsonDict:
    """In this process: load, warm up, then the peak RSS one explanation adds (the child's half of the benchmark)."""
    from explainers.engine import explain
    from explainers.model import load_model

    loaded = load_model(model_dir)
    # Weights still backed by the mmapped safetensors file count as resident only while the kernel keeps their pages,
    # which under memory pressure it drops and faults back in mid-run: copied into anonymous memory, they stay put.
    with torch.no_grad():
        for tensor in [*loaded.model.parameters(), *loaded.model.buffers()]:
            tensor.data = tensor.data.clone()
    gc.collect()
    if path == "general":
        loaded = dataclasses.replace(loaded, force_general_path=True)
    rng = np.random.default_rng(0)
    ids = rng.integers(100, loaded.vocab_size, PROMPT_TOKENS + generated).tolist()
    prompt, output = ids[:PROMPT_TOKENS], ids[PROMPT_TOKENS:]
    params = dict(METHODS)[method]
    loaded_kib = _status_kib("VmRSS")
    explain(loaded, None, prompt, output, [(method, params)], None)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before_kib = _status_kib("VmRSS")
    explanation = explain(loaded, None, prompt, output, [(method, params)], None)
    peak_kib = _status_kib("VmHWM")
    if explanation.explain_path != PROTO_PATHS[path]:
        raise RuntimeError(f"asked for the {path} path, explained on {explanation.explain_path}")
    return {
        "path": path,
        "method": method,
        "loaded_rss_mib": loaded_kib / 1024,
        "before_rss_mib": before_kib / 1024,
        "peak_rss_mib": peak_kib / 1024,
        "added_peak_mib": (peak_kib - before_kib) / 1024,
    }


def run_child(model_dir: Path, path: str, method: str, generated: int, threads: int) -> JsonDict:
    argv = [
        bench_util.PYTHON, __file__, "--child", path, method,
        "--model-dir", str(model_dir), "--generated", str(generated), "--threads", str(threads),
    ]  # fmt: skip
    # Every allocation of 64 KiB or more gets its own mapping, unmapped when freed (glibc would otherwise raise that
    # threshold as big blocks are freed and keep them resident): resident memory then follows live tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    done = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{path} {method} failed:\n{done.stderr[-3000:]}")
    row: JsonDict = json.loads(done.stdout.strip().splitlines()[-1])
    return row


def measure(model_dir: Path, methods: tuple[str, ...], generated: int, threads: int) -> list[JsonDict]:
    rows = []
    for method in methods:
        by_path = {path: run_child(model_dir, path, method, generated, threads) for path in PATHS}
        fast, general = by_path["fast"]["added_peak_mib"], by_path["general"]["added_peak_mib"]
        rows.append(
            {
                "method": method,
                "params": dict(METHODS)[method],
                "fast": by_path["fast"],
                "general": by_path["general"],
                "general_over_fast": general / fast if fast > 0 else None,
            }
        )
        print(f"{method}: fast +{fast:.1f} MiB, general +{general:.1f} MiB", file=sys.stderr)
    return rows


def render_markdown(result: JsonDict) -> str:
    rows = [
        [
            row["method"],
            bench_util.fmt(row["fast"]["added_peak_mib"], 1),
            bench_util.fmt(row["general"]["added_peak_mib"], 1),
            bench_util.fmt(row["general_over_fast"], 2),
        ]
        for row in result["methods"]
    ]
    loaded = max(row[path]["loaded_rss_mib"] for row in result["methods"] for path in PATHS)
    heading = (
        f"{result['model']}, {result['prompt_tokens']} prompt + {result['generated']} generated tokens, all explained; "
        f"peak resident memory one explanation adds to a worker holding the loaded model (about {loaded:.0f} MiB "
        f"resident after loading), {result['threads']} thread(s)."
    )
    table = markdown_table(["method", "fast path (MiB)", "general path (MiB)", "general / fast"], rows)
    return heading + "\n\n" + table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generated", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--methods", nargs="+", metavar="METHOD", help="a subset of explain_paths.py's methods")
    parser.add_argument("--smoke", action="store_true", help="8 generated tokens, saliency only; no claims")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", nargs=2, metavar=("PATH", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from explainers.embedded_model import default_model_dir

    torch.set_num_threads(args.threads)
    model_dir = args.model_dir or default_model_dir()
    if args.child:
        path, method = args.child
        print(json.dumps(measure_one(model_dir, path, method, args.generated)))
        return 0
    generated = 8 if args.smoke else args.generated
    methods = SMOKE_METHODS if args.smoke else tuple(args.methods or (method for method, _ in METHODS))
    unknown = set(methods) - set(dict(METHODS))
    if unknown:
        parser.error(f"not among explain_paths.py's methods: {', '.join(sorted(unknown))}")
    result: JsonDict = {
        "benchmark": "explain_path_memory",
        "command": bench_util.command_line("explain_path_memory.py", sys.argv[1:] if argv is None else argv),
        "environment": bench_util.environment(),
        "smoke": args.smoke,
        "threads": args.threads,
        "model": model_dir.name,
        "prompt_tokens": PROMPT_TOKENS,
        "generated": generated,
        "methods": measure(model_dir, methods, generated, args.threads),
    }
    name = "explain_path_memory_smoke.json" if args.smoke else "explain_path_memory.json"
    bench_util.write_result(args.out or bench_util.RESULTS_DIR / name, result)
    print(render_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
