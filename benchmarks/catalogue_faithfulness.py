"""The whole catalogue with faithfulness on the France question: seconds per method, for faithfulness and in all.

    .venv/bin/python benchmarks/catalogue_faithfulness.py                        # this checkout, 1 repeat
    .venv/bin/python benchmarks/catalogue_faithfulness.py --baseline 4ac23f8     # before (that commit) vs after
    .venv/bin/python benchmarks/catalogue_faithfulness.py --smoke                # checks it runs (see SMOKE_SKIPS)
    .venv/bin/python benchmarks/catalogue_faithfulness.py --methods occlusion,attention   # some methods only

The question is "What is the capital of France?" rendered with the embedded SmolLM2's chat template (its default
system prompt included), and the answer is the model's own greedy one (transformers' generate, up to 32 tokens,
ending with and counting <|im_end|>). Every method in the registry is asked for at once with its default
parameters and faithfulness on, every generated token explained, through `explainers.engine.explain` with no
hidden-state cache, as a worker runs a job. Each method's `attribute` and the engine's `faithfulness_of` are
wrapped with a timer (wall and process CPU seconds); "forward" is what the engine does besides (its one
hidden-state pass, aggregation, token roles).

Each measurement runs in its own process with PYTHONPATH on one checkout. With `--baseline REF`, a detached
`git worktree` of REF is made in a temporary directory and the two checkouts alternate (baseline, this, baseline,
this, ...), so that a burst of other work on the shared machine hits both; CPU time is reported beside wall time
because wall time also counts what the scheduler gave to others. The children's results are compared: the largest
difference of any faithfulness number and of any attribution between the two checkouts (both must be ~0: the
speed-up must not change results).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bench_util
from bench_util import JsonDict, markdown_table

QUESTION = "What is the capital of France?"
MAX_NEW_TOKENS = 32
TARGET_S = 60.0
# Left out of --smoke (which checks that the script runs, in under a minute): their default cost grows with layers
# x positions or permutations x positions, not with the one explained token.
SMOKE_SKIPS = ("activation_patching", "shapley_sampling", "value_zeroing")
FAITHFULNESS_FIELDS = ("comprehensiveness", "sufficiency", "random_comprehensiveness", "random_sufficiency")


def measure_here(smoke: bool, threads: int, only: list[str]) -> JsonDict:
    """One run of the catalogue on the checkout this process imports (a child's work)."""
    import torch

    import explainers
    from common.jobs import ExplainOptions
    from explainers import engine
    from explainers.embedded_model import default_model_dir
    from explainers.methods import registry
    from explainers.methods.base import tensor_array
    from explainers.model import load_model

    torch.set_num_threads(threads)
    loaded = load_model(default_model_dir())
    messages = [{"role": "user", "content": QUESTION}]
    prompt = loaded.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = loaded.tokenizer(prompt, add_special_tokens=False).input_ids
    eos = loaded.tokenizer.eos_token_id
    with torch.no_grad():
        generated = loaded.model.generate(  # type: ignore[operator]
            torch.tensor([prompt_ids]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=eos
        )
    output_ids = generated[0, len(prompt_ids) :].tolist()

    timings: dict[str, tuple[float, float]] = {}

    def timed(name: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            started, cpu_started = time.perf_counter(), time.process_time()
            try:
                return call(*args, **kwargs)
            finally:
                timings[name] = (time.perf_counter() - started, time.process_time() - cpu_started)
                print(f"  {name}: {timings[name][0]:.1f} s ({timings[name][1]:.1f} s CPU)", file=sys.stderr, flush=True)

        return run

    methods = [
        method
        for method in registry.all_methods()
        if (method.name in only if only else not (smoke and method.name in SMOKE_SKIPS))
    ]
    for method in methods:
        method.attribute = timed(method.name, method.attribute)  # type: ignore[method-assign]
    engine.faithfulness_of = timed("faithfulness", engine.faithfulness_of)  # type: ignore[attr-defined]
    # Only the user's question: the smoke run explains the first generated token, the full run all of them.
    options = ExplainOptions(faithfulness=True, output_indices=[0] if smoke else [])
    started, cpu_started = time.perf_counter(), time.process_time()
    explanation = engine.explain(
        loaded, None, prompt_ids, output_ids, [(m.name, {}) for m in methods], None, options, None, messages
    )
    total = (time.perf_counter() - started, time.process_time() - cpu_started)
    results = {}
    for result in explanation.results:
        packed = result.attributions if result.HasField("attributions") else None
        results[result.method] = {
            "attributions": [] if packed is None else tensor_array(packed).reshape(-1).tolist(),
            "faithfulness": {f: list(getattr(result.faithfulness, f)) for f in FAITHFULNESS_FIELDS},
        }
    accounted = sum(wall for wall, _ in timings.values()), sum(cpu for _, cpu in timings.values())
    return {
        "explainers": str(Path(explainers.__file__).resolve().parent.parent),
        "prompt_tokens": len(prompt_ids),
        "answer_tokens": len(output_ids),
        "answer": loaded.tokenizer.decode(output_ids),
        "explained_tokens": len(explanation.target_positions),
        "token_ids": prompt_ids + output_ids,
        "seconds": {name: wall for name, (wall, _) in timings.items()}
        | {"forward": total[0] - accounted[0], "total": total[0]},
        "cpu_seconds": {name: cpu for name, (_, cpu) in timings.items()}
        | {"forward": total[1] - accounted[1], "total": total[1]},
        "results": results,
    }


@contextlib.contextmanager
def worktree_at(ref: str) -> Iterator[tuple[Path, str]]:
    """A detached git worktree of ref in a temporary directory, removed afterwards; yields (path, commit)."""
    commit = subprocess.run(
        ["git", "-C", str(bench_util.REPO_ROOT), "rev-parse", "--short", ref],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="catalogue-baseline-") as parent:
        path = Path(parent) / "checkout"
        subprocess.run(
            ["git", "-C", str(bench_util.REPO_ROOT), "worktree", "add", "--detach", "--quiet", str(path), commit],
            check=True,
        )
        try:
            yield path, commit
        finally:
            subprocess.run(
                ["git", "-C", str(bench_util.REPO_ROOT), "worktree", "remove", "--force", str(path)], check=False
            )


def run_child(checkout: Path, smoke: bool, threads: int, only: list[str]) -> JsonDict:
    """measure_here() in a process importing checkout's code."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = dict(os.environ)
        env["PYTHONPATH"] = f"{checkout}:{checkout / 'clients' / 'python' / 'src'}"
        env["OMP_NUM_THREADS"] = str(threads)
        command = [bench_util.PYTHON, str(Path(__file__).resolve()), "--child-out", out.name, "--threads", str(threads)]
        command += ["--methods", ",".join(only)] if only else []
        subprocess.run([*command, *(["--smoke"] if smoke else [])], cwd=checkout, env=env, check=True)
        measured: JsonDict = json.loads(Path(out.name).read_text())
    if Path(measured["explainers"]) != checkout.resolve():
        raise RuntimeError(f"the child imported {measured['explainers']}, not {checkout}")
    return measured


def largest_differences(before: JsonDict, after: JsonDict) -> JsonDict:
    """Per method, the largest |before - after| of its faithfulness numbers and of its attributions."""
    differences = {}
    for method, old in before["results"].items():
        new = after["results"].get(method)
        if new is None:
            continue
        old_numbers = [x for field in FAITHFULNESS_FIELDS for x in old["faithfulness"][field]]
        new_numbers = [x for field in FAITHFULNESS_FIELDS for x in new["faithfulness"][field]]
        differences[method] = {
            "faithfulness": max((abs(a - b) for a, b in zip(old_numbers, new_numbers, strict=True)), default=0.0),
            "attributions": max(
                (abs(a - b) for a, b in zip(old["attributions"], new["attributions"], strict=True)), default=0.0
            ),
        }
    return differences


def summarise(runs: dict[str, list[JsonDict]]) -> list[JsonDict]:
    """One row per timed part (methods, faithfulness, forward, total): median wall and CPU seconds per checkout."""
    first = next(iter(runs.values()))[0]
    parts = [name for name in first["seconds"] if name not in ("faithfulness", "forward", "total")]
    rows = []
    for part in [*sorted(parts), "faithfulness", "forward", "total"]:
        row: JsonDict = {"part": part}
        for label, measured in runs.items():
            row[f"{label}_s"] = statistics.median(m["seconds"].get(part, float("nan")) for m in measured)
            row[f"{label}_cpu_s"] = statistics.median(m["cpu_seconds"].get(part, float("nan")) for m in measured)
        rows.append(row)
    return rows


def render_markdown(result: JsonDict) -> str:
    labels = result["checkouts"]
    columns = [f"{label} ({result['commits'][label]}) s" for label in labels]
    columns += [f"{label} CPU s" for label in labels]
    rows = [
        [
            row["part"],
            *(bench_util.fmt(row[f"{label}_s"], 1) for label in labels),
            *(bench_util.fmt(row[f"{label}_cpu_s"], 1) for label in labels),
        ]
        for row in result["rows"]
    ]
    lines = [
        f"France question, {result['prompt_tokens']} prompt + {result['answer_tokens']} answer tokens "
        f"({result['answer']!r}), {result['explained_tokens']} explained; {len(rows) - 3} methods at default "
        f"parameters with faithfulness; median of {result['repeats']}, {result['threads']} thread(s).",
        "",
        markdown_table(["part", *columns], rows),
    ]
    if "largest_differences" in result:
        worst = result["largest_differences"]
        lines += [
            "",
            f"Largest difference between the checkouts: faithfulness "
            f"{max((d['faithfulness'] for d in worst.values()), default=0.0):.2e}, attributions "
            f"{max((d['attributions'] for d in worst.values()), default=0.0):.2e}.",
        ]
    for label in [] if result["smoke"] else labels:
        total = next(row for row in result["rows"] if row["part"] == "total")[f"{label}_s"]
        lines.append(f"- {label}: total {total:.1f} s, target {TARGET_S:.0f} s {bench_util.verdict(total <= TARGET_S)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default=None, help="a git ref to measure beside this checkout")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--smoke", action="store_true", help="one explained token, one repeat, no SMOKE_SKIPS; no timing claims"
    )
    parser.add_argument("--methods", default="", help="comma-separated: only these (default: the whole registry)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    only = [name for name in args.methods.split(",") if name]
    if args.child_out is not None:
        bench_util.write_result(args.child_out, measure_here(args.smoke, args.threads, only))
        return 0

    repeats = 1 if args.smoke else args.repeats
    runs: dict[str, list[JsonDict]] = {}
    commits = {"this": bench_util.environment()["commit"]}
    with contextlib.ExitStack() as stack:
        checkouts = {"this": bench_util.REPO_ROOT}
        if args.baseline:
            path, commit = stack.enter_context(worktree_at(args.baseline))
            checkouts = {"baseline": path, **checkouts}
            commits["baseline"] = commit
        for _ in range(repeats):
            for label, checkout in checkouts.items():
                measured = run_child(checkout, args.smoke, args.threads, only)
                runs.setdefault(label, []).append(measured)
                print(f"{label}: total {measured['seconds']['total']:.1f} s", file=sys.stderr, flush=True)
    first = runs["this"][0]
    if any(m["token_ids"] != first["token_ids"] for measured in runs.values() for m in measured):
        raise RuntimeError("the checkouts explained different token ids")
    result: JsonDict = {
        "benchmark": "catalogue_faithfulness",
        "command": bench_util.command_line("catalogue_faithfulness.py", sys.argv[1:] if argv is None else argv),
        "environment": bench_util.environment(),
        "smoke": args.smoke,
        "repeats": repeats,
        "threads": args.threads,
        "methods": only or "all",
        "checkouts": list(runs),
        "commits": commits,
        **{key: first[key] for key in ("prompt_tokens", "answer_tokens", "answer", "explained_tokens")},
        "rows": summarise(runs),
        "runs": {
            label: [{k: m[k] for k in ("seconds", "cpu_seconds")} for m in measured] for label, measured in runs.items()
        },
    }
    if "baseline" in runs:
        result["largest_differences"] = largest_differences(runs["baseline"][-1], runs["this"][-1])
    name = "catalogue_faithfulness_smoke.json" if args.smoke else "catalogue_faithfulness.json"
    if only and not args.smoke:
        name = "catalogue_faithfulness_some_methods.json"
    bench_util.write_result(args.out or bench_util.RESULTS_DIR / name, result)
    print(render_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
