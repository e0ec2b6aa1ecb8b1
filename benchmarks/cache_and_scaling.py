"""The explainer engine in-process: what the hidden-state cache saves, how methods scale with generation length,
how much memory they need, and how close they come to the machine's matrix-multiply peak.

    .venv/bin/python benchmarks/cache_and_scaling.py [--max-generated 1024] [--point-budget-s 15] [--threads 1]
    .venv/bin/python benchmarks/cache_and_scaling.py --sections cache        # only one part
    .venv/bin/python benchmarks/cache_and_scaling.py --smoke                 # tiny sizes, < 60 s, no timing claims

A full run takes about 25 minutes on 2 idle cores, most of it in the chunking section's largest group of each
gradient method at G = 1,024 and in the scaling points cut short at `--point-budget-s`. Everything runs
`explainers.engine.explain` on the embedded model loaded with `explainers.model.load_model` (float32, SDPA
attention), with `--threads` torch threads (default 1: the explainer's deployed setting, and robust to other jobs on
this 2-core machine). Sequences are forced, random but fixed token ids (numpy seed 0, ids drawn uniformly from [100,
vocab), so no special tokens): a prompt of `--prompt-tokens` (64) ids followed by G generated ids, every generated
token explained. The cost of every method depends only on the lengths, not on which ids they are. Each measured call
also records its CPU time (`cpu_s`): with one thread, a wall time well above it means other jobs took the cores. The
next point of a method is planned at the rate its last one had per CPU second and thread (`uncontended_gflops`), so
that such a burst does not make it skip.

Sections:

- **peak**: torch.matmul of 2048x2048 float32 at 1 and 2 threads, GFLOP/s (2 * 2048**3 per product); and of 512x512
  bfloat16, what a reduced-precision path would run at on this CPU.
- **cache**: with a HiddenStateCache on a redis-server started here (free port, no persistence), one subprocess
  explains the same sequence cold (database flushed first: one forward pass that fills the cache) and warm (hit),
  alternating, per method; ratio = median cold / median warm. Target: >= 5x. A third call per round hits the states
  after every derived entry (what was read out of them: step scores, a kept logit lens) has been deleted, which is
  what a first request for another k or other tokens costs: "readouts dropped".
- **scaling**: input_x_gradient, saliency, integrated_gradients (16 steps), occlusion, attention and logit_lens at
  G = 16, 64, 256, 1024 (capped by `--max-generated`), default parameters, each point in a fresh subprocess: wall
  time of explain() (the engine's own forward pass included, no cache) and peak RSS (ru_maxrss, model included).
  Growth exponent = least-squares slope of log time vs log G. The gradient and perturbation methods run a loop of
  items of different sizes (gradient chunks, perturbation batches: see FLOPs below), which the subprocess observes
  (`score_gradients` is wrapped; a forward hook on the model sees every pass that runs on cached keys and values,
  i.e. every perturbation batch) and checks against the FLOP model's plan of them. A point whose predicted time
  exceeds `--point-budget-s` runs only its first items and its full time is extrapolated by FLOPs: time = FLOPs of
  the whole call / FLOP rate measured over the part that ran. A gradient method's chunks grow with their prefix, so
  the first ones are its smallest and the peak RSS of such a point is a lower bound (marked ≥; the chunking section
  measures the largest group); occlusion's first batch is its largest, so its peak is the full run's. A point whose
  first item alone is predicted over 10x the budget is skipped, with the reason.
- **chunking**: the target "a 1,024-token generation explained with any gradient method within 4 GiB peak RSS of the
  explainer, by chunking, with results identical to unchunked". Memory: every gradient method with its DEFAULT
  parameters at G = max size, in a fresh process that runs the engine on the whole sequence, the method's recording
  forward pass, and then only its largest group of gradient chunks, where RSS peaks: the one with the most FLOPs
  (groups are capped at MAX_GROUP_ROWS rows, so this is one of the last, whose prefixes are the longest).
  `score_gradients` is started at that group's first target, which reproduces the full run's groups from there on
  (grouping is greedy from the first target) and records the same forward pass. Identity: each gradient method
  unchunked (one chunk, one pass of path points) vs chunked (a quarter
  of the targets per chunk, one path point per pass) at G = 16, in one subprocess. Chunks run different prefixes, so
  float32 sums differ in rounding: the criterion is max |chunked - unchunked| <= 1e-5 x max |unchunked|; bitwise
  equality is reported too. Where float32 rounding alone exceeds that (integrated gradients at G = 16: about 1e-4
  against float64, chunked or not), the pair is rerun with the model in float64, where the same criterion must hold, and
  the float32 result's own error against float64 is reported beside it.
- **efficiency**: achieved FLOP/s of each measured point (FLOPs of what ran / wall time) over the matmul peak.

FLOPs: see benchmarks/cache_and_scaling_flops.py (`method_flops`). The child-process measurements are in
benchmarks/cache_and_scaling_children.py, the targets, verdicts and markdown in benchmarks/cache_and_scaling_report.py.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import bench_util
from bench_util import GIB, JsonDict
from cache_and_scaling_children import (
    IDENTITY_TOLERANCE,
    CacheSpec,
    IdentitySpec,
    Outcome,
    PointSpec,
    child_main,
    matmul_gflops,
    run_child,
)
from cache_and_scaling_flops import GRADIENT_METHODS, FlopPlan, ModelShape, method_flops
from cache_and_scaling_report import (
    CACHE_TARGET_RATIO,
    MEMORY_TARGET_GIB,
    failures,
    memory_verdict,
    params_text,
    render_markdown,
)

# A point too long for --point-budget-s runs its first loop items only, at least one; it is skipped when that one
# alone is predicted to take more than this times the budget.
SKIP_OVER_BUDGET = 10.0
SCALING_METHODS: dict[str, dict[str, Any]] = {
    "input_x_gradient": {},
    "saliency": {},
    "integrated_gradients": {"steps": 16},
    "occlusion": {},
    "attention": {},
    "logit_lens": {},
}
# Smoke runs: one method per kind of loop, cut short after its first item.
SMOKE_SCALING_METHODS: dict[str, dict[str, Any]] = {
    "input_x_gradient": {"target_batch_size": 2},
    "occlusion": {"batch_size": 2},
}


# ------------------------------------------------------------------------------------------------ parent sections


@dataclass
class Settings:
    model_dir: Path
    shape: ModelShape
    threads: int
    prompt: int
    sizes: list[int]
    budget_s: float
    rss_limit_bytes: int
    repeats: int
    smoke: bool
    peak_gflops: dict[int, float] = field(default_factory=dict)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_spec(
    settings: Settings,
    kind: str,
    spec: PointSpec | IdentitySpec | CacheSpec,
    *,
    timeout_s: float,
    in_process: bool,
) -> Outcome:
    """run_child for `spec` on the settings' model, with their RSS guard and threads."""
    return run_child(
        kind,
        {**asdict(spec), "model_dir": str(settings.model_dir)},
        timeout_s=timeout_s,
        rss_limit_bytes=settings.rss_limit_bytes,
        threads=settings.threads,
        in_process=in_process,
    )


def point_plan(settings: Settings, spec: PointSpec) -> FlopPlan:
    return method_flops(settings.shape, spec.method, spec.params, spec.prompt + spec.generated, spec.positions)


def measure_point(settings: Settings, spec: PointSpec, rate_flops: float | None, *, fresh: bool = False) -> JsonDict:
    """Plan (full, cut short, or skipped) and run one point; returns its row."""
    plan = point_plan(settings, spec)
    if rate_flops is None:
        # No earlier point of this method: assume half the same-thread matmul peak.
        rate_flops = settings.peak_gflops[settings.threads] * 1e9 / 2
    predicted_full = plan.total / rate_flops
    row: JsonDict = {
        "label": spec.label or spec.method,
        "method": spec.method,
        "params": spec.params,
        "prompt": spec.prompt,
        "generated": spec.generated,
        "tokens": spec.prompt + spec.generated,
        "flops_total": plan.total,
        "predicted_full_s": predicted_full,
        "fresh_process": not (settings.smoke and not fresh),
    }
    if spec.max_items is None and predicted_full > settings.budget_s:
        if not plan.items:
            row.update(status="skipped", reason=f"predicted {predicted_full:.0f} s > budget {settings.budget_s:.0f} s")
            say(f"  {row['label']} G={spec.generated}: skipped, {row['reason']}")
            return row
        items = plan.affordable_items(settings.budget_s * rate_flops)
        predicted = plan.done(plan.items[:items], finished=False) / rate_flops
        if predicted > SKIP_OVER_BUDGET * settings.budget_s:
            kind = "chunks" if spec.method in GRADIENT_METHODS else "batches"
            row.update(
                status="skipped",
                reason=(
                    f"predicted {predicted_full:.0f} s in full and {predicted:.0f} s for its first {items} of "
                    f"{len(plan.items)} {kind}, over {SKIP_OVER_BUDGET:g}x the {settings.budget_s:.0f} s budget"
                ),
            )
            say(f"  {row['label']} G={spec.generated}: skipped, {row['reason']}")
            return row
        if items < len(plan.items):
            spec = replace(spec, max_items=items)
    to_run = plan.items_from(spec.first_target)[: spec.max_items]
    predicted_run = plan.done(to_run, finished=spec.max_items is None) / rate_flops
    say(
        f"  {row['label']} G={spec.generated} "
        + ("" if spec.max_items is None else f"({spec.max_items} of {len(plan.items)} items) ")
        + f"predicted {predicted_run:.0f} s ({predicted_full:.0f} s in full)"
    )
    outcome = run_spec(
        settings, "point", spec, timeout_s=max(300.0, 4 * predicted_run + 120), in_process=settings.smoke and not fresh
    )
    if not outcome.ok:
        row.update(status="failed", reason=outcome.error, **outcome.data)
        say(f"    -> failed: {outcome.error}")
        return row
    data = outcome.data
    ran = [tuple(shape) for shape in data["item_shapes"]]
    planned = [item.shape for item in to_run]
    if ran != planned[: len(ran)] or (data["finished"] and len(ran) != len(planned)):
        # The FLOP model no longer describes the method's loop: no number derived from it would mean anything.
        row.update(status="failed", reason=f"FLOP plan out of date: ran {ran[:4]}..., planned {planned[:4]}...")
        say(f"    -> failed: {row['reason']}")
        return row
    complete = data["finished"] and spec.first_target == 0
    done = plan.done(to_run[: len(ran)], finished=data["finished"])
    rate = done / data["seconds"]
    largest = plan.largest_item() if plan.items else None
    row.update(
        status="measured" if complete else "extrapolated",
        items_done=len(ran),
        items_total=len(plan.items),
        item_shapes=ran,
        measured_s=data["seconds"],
        cpu_s=data["cpu_seconds"],
        time_s=data["seconds"] if complete else plan.total / rate,
        method_s=data["method_seconds"],
        peak_rss_bytes=data["peak_rss_bytes"],
        # The largest loop item ran, so this peak is the whole call's; otherwise a lower bound.
        peak_rss_is_full=complete or largest is None or largest in to_run[: len(ran)],
        rss_after_load_bytes=data["rss_after_load_bytes"],
        flops_done=done,
        achieved_gflops=rate / 1e9,
        # With its threads' cores to itself: what plans the next point, so that another job's burst does not.
        uncontended_gflops=done * settings.threads / max(data["cpu_seconds"], 1e-9) / 1e9,
        matmul_gflops_same_threads=data["matmul_gflops_same_threads"],
        efficiency_same_threads=rate / 1e9 / data["matmul_gflops_same_threads"],
        efficiency_vs_2_thread_peak=rate / 1e9 / settings.peak_gflops[2],
    )
    say(
        f"    -> {row['status']} {row['time_s']:.1f} s ({row['measured_s']:.1f} s measured, {row['cpu_s']:.1f} s CPU), "
        f"peak RSS {row['peak_rss_bytes'] / GIB:.2f} GiB, {row['achieved_gflops']:.1f} GFLOP/s"
    )
    return row


def fit_exponent(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of log(y) against log(x)."""
    if len(points) < 2:
        return None
    xs = [math.log(x) for x, _ in points]
    ys = [math.log(y) for _, y in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    denominator = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / denominator


def section_scaling(settings: Settings) -> JsonDict:
    rows = []
    exponents = {}
    methods = SMOKE_SCALING_METHODS if settings.smoke else SCALING_METHODS
    for method, params in methods.items():
        rate: float | None = None
        method_rows = []
        for generated in settings.sizes:
            spec = PointSpec(method, params, generated, settings.prompt, settings.threads)
            if settings.smoke and point_plan(settings, spec).items:
                spec = replace(spec, max_items=1)  # smoke: the cut-short path, whatever the machine's speed
            row = measure_point(settings, spec, rate)
            if row["status"] in ("measured", "extrapolated"):
                rate = row["uncontended_gflops"] * 1e9
            method_rows.append(row)
        timed = [(r["generated"], r["time_s"]) for r in method_rows if "time_s" in r]
        model = [(r["generated"], r["flops_total"]) for r in method_rows]
        exponents[method] = {"measured": fit_exponent(timed), "flop_model": fit_exponent(model)}
        rows += method_rows
    return {"rows": rows, "exponents": exponents}


def identity_cases(settings: Settings, generated: int) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(method, unchunked params, chunked params): unchunked runs all targets in one chunk and all path points in
    one pass; chunked a quarter of the targets per chunk (so each chunk has its own prefix) and one point per pass."""
    middle, high = settings.shape.layers // 2, settings.shape.layers - 2
    whole, split = {"target_batch_size": generated}, {"target_batch_size": max(1, generated // 4)}
    one_pass, per_point = {"steps": 2, "internal_batch_size": 2}, {"steps": 2, "internal_batch_size": 1}
    cases = [
        ("input_x_gradient", whole, split),
        ("saliency", whole, split),
        ("gradient_x_activation", {"layer": middle, **whole}, {"layer": middle, **split}),
        ("integrated_gradients", {**one_pass, **whole}, {**per_point, **split}),
        ("layer_integrated_gradients", {"layer": high, **one_pass, **whole}, {"layer": high, **per_point, **split}),
    ]
    return [cases[0], cases[3]] if settings.smoke else cases


def section_chunking(settings: Settings) -> JsonDict:
    """Peak RSS at G = max size for every gradient method with its default parameters, over its largest chunks;
    chunked vs unchunked results at G = 16."""
    big = max(settings.sizes)
    # Smoke: sequences too short for the defaults to chunk; smaller chunks exercise the skip to the largest ones.
    memory_cases = [("integrated_gradients", {"target_batch_size": 2})] if settings.smoke else [
        (method, {}) for method in GRADIENT_METHODS
    ]  # fmt: skip
    memory_rows = []
    for method, params in memory_cases:
        label = f"{method} ({params_text(params)})"
        spec = PointSpec(method, params, big, settings.prompt, settings.threads, label=label)
        largest = point_plan(settings, spec).largest_item()
        # Smoke runs keep one fresh process here, so the subprocess plumbing stays covered.
        row = measure_point(settings, replace(spec, first_target=largest.first_target, max_items=1), None, fresh=True)
        peak = row.get("peak_rss_bytes")
        row["within_target"] = None if peak is None else peak <= MEMORY_TARGET_GIB * GIB
        memory_rows.append(row)

    small = min(16, big)
    identity = IdentitySpec(settings.threads, settings.prompt, small, identity_cases(settings, small))
    say(f"  identity: {len(identity.cases)} methods unchunked vs chunked at G={small}")
    outcome = run_spec(settings, "identity", identity, timeout_s=3600, in_process=settings.smoke)
    identity_rows = outcome.data.get("rows", []) if outcome.ok else []
    for pair in identity_rows:
        relative = pair["max_abs_diff"] / pair["max_abs_value"] if pair["max_abs_value"] else pair["max_abs_diff"]
        pair["relative_diff"] = relative
        # Only a comparison of one chunk with several counts.
        pair["chunking_compared"] = pair["unchunked_chunks"] == 1 and pair["chunked_chunks"] > 1
        in_float64 = pair["float64_relative_diff"]
        agree = relative <= IDENTITY_TOLERANCE or (in_float64 is not None and in_float64 <= IDENTITY_TOLERANCE)
        pair["within_tolerance"] = pair["chunking_compared"] and agree
    return {
        "memory": memory_rows,
        "identity": identity_rows,
        "identity_error": None if outcome.ok else outcome.error,
        "identity_tolerance": IDENTITY_TOLERANCE,
        "generated": big,
    }


def section_cache(settings: Settings) -> JsonDict:
    high = settings.shape.layers - 2
    if settings.smoke:
        cases: list[tuple[str, dict[str, Any], int]] = [
            ("logit_lens", {}, 4),
            ("gradient_x_activation", {"layer": high}, 4),
            ("layer_integrated_gradients", {"layer": high, "steps": 2}, 4),
            ("attention", {}, 4),
            ("attention_rollout", {}, 4),
        ]
    else:
        cases = [
            ("logit_lens", {}, 16),
            ("layer_integrated_gradients", {"layer": high}, 16),
            ("gradient_x_activation", {"layer": high}, 16),
            ("attention", {}, 16),
            ("attention_rollout", {}, 16),
            ("logit_lens", {}, 256),
            ("attention", {}, 256),
            ("attention_rollout", {}, 256),
        ]
    with bench_util.redis_server() as redis_url:
        spec = CacheSpec(
            redis_url=redis_url,
            threads=settings.threads,
            repeats=settings.repeats,
            cases=cases,
            prompt=settings.prompt,
        )
        say(f"  cache: {len(cases)} cases x {settings.repeats} repeats")
        outcome = run_spec(settings, "cache", spec, timeout_s=3600, in_process=settings.smoke)
    if not outcome.ok:
        return {"error": outcome.error, "rows": []}
    rows = outcome.data["rows"]
    for row in rows:
        cold, warm = _median(row["cold_s"]), _median(row["warm_s"])
        row.update(cold_median_s=cold, warm_median_s=warm, ratio=cold / warm, met=cold / warm >= CACHE_TARGET_RATIO)
        row["states_only_ratio"] = cold / _median(row["warm_states_only_s"])
        row["cache_get_median_s"] = _median(row["cache_get_s"])
    return {"rows": rows, "peak_rss_bytes": outcome.data["peak_rss_bytes"]}


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def main(argv: Sequence[str] | None = None) -> None:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["--child"]:
        child_main(Path(args_list[1]), Path(args_list[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=["cache", "scaling", "chunking"],
                        choices=["cache", "scaling", "chunking"])  # fmt: skip
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256, 1024], help="generated tokens")
    parser.add_argument("--max-generated", type=int, default=1024, help="drop sizes above this")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the explainer (deployed: 1)")
    parser.add_argument("--point-budget-s", type=float, default=15.0, help="cut short / skip points predicted longer")
    parser.add_argument("--rss-guard-gib", type=float, default=10.0, help="kill a point whose RSS passes this")
    parser.add_argument("--repeats", type=int, default=3, help="cold/warm pairs per cache case")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (< 60 s) so CI can check it still runs")
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--out", type=Path, help="default benchmarks/results/cache_and_scaling[_smoke].json")
    args = parser.parse_args(args_list)

    from explainers.embedded_model import default_model_dir

    model_dir = args.model_dir or default_model_dir()
    sizes = sorted(s for s in args.sizes if s <= args.max_generated)
    if args.smoke:
        sizes, args.prompt_tokens, args.repeats = [4], 8, 1
    if not sizes:
        parser.error("no size left under --max-generated")
    settings = Settings(
        model_dir=model_dir,
        shape=ModelShape.read(model_dir),
        threads=args.threads,
        prompt=args.prompt_tokens,
        sizes=sizes,
        budget_s=args.point_budget_s,
        rss_limit_bytes=int(args.rss_guard_gib * GIB),
        repeats=args.repeats,
        smoke=args.smoke,
    )
    started = time.monotonic()
    settings.peak_gflops = {threads: matmul_gflops(threads) for threads in (1, 2)}
    say(f"matmul peak: {settings.peak_gflops[1]:.1f} GFLOP/s (1 thread), {settings.peak_gflops[2]:.1f} (2 threads)")
    # What a reduced-precision path would have to work with here: bfloat16 products run fast only on CPUs with
    # AVX512-BF16 or AMX; elsewhere they convert and can be many times slower than float32 (smaller, so that a slow
    # one still takes a second).
    bfloat16_peak = {threads: matmul_gflops(threads, 512, 1.0, "bfloat16") for threads in (1, 2)}
    result: JsonDict = {
        "benchmark": "cache_and_scaling",
        "command": bench_util.command_line("cache_and_scaling.py", args_list),
        "smoke": args.smoke,
        "environment": bench_util.environment(),
        "threads": args.threads,
        "prompt_tokens": args.prompt_tokens,
        "sizes": sizes,
        "point_budget_s": args.point_budget_s,
        "model": {"dir": str(model_dir), **asdict(settings.shape), "layer_params": settings.shape.layer_params},
        "peak_gflops": {str(k): v for k, v in settings.peak_gflops.items()},
        "peak_gflops_bfloat16_512": {str(k): v for k, v in bfloat16_peak.items()},
        "targets": {},
    }
    sections: dict[str, Callable[[Settings], JsonDict]] = {
        "cache": section_cache,
        "scaling": section_scaling,
        "chunking": section_chunking,
    }
    for name in args.sections:
        say(f"section {name}")
        result[name] = sections[name](settings)
    if "cache" in result and result["cache"].get("rows"):
        result["targets"]["cache"] = {"met": all(r["met"] for r in result["cache"]["rows"])}
    if "chunking" in result:
        result["targets"]["memory"] = memory_verdict(result["chunking"], max(sizes))
    result["seconds"] = time.monotonic() - started
    result["environment"]["load_average_at_end"] = list(os.getloadavg())
    out = args.out or bench_util.RESULTS_DIR / f"cache_and_scaling{'_smoke' if args.smoke else ''}.json"
    bench_util.write_result(out, result)
    print(render_markdown(result))
    failed = failures(result)
    if failed:
        # Timings claim nothing here, but a point that cannot run at all is a broken benchmark: fail the run.
        sys.exit("failed to run: " + "; ".join(failed))


if __name__ == "__main__":
    main()
