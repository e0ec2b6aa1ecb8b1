"""The targets of benchmarks/cache_and_scaling.py, the verdicts against them (`memory_verdict`, `failures`) and the
markdown its results render as (`render_markdown`, which benchmarks/run_all.py finds through the entry script).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bench_util import GIB, JsonDict, fmt, markdown_table, verdict
from cache_and_scaling_flops import GRADIENT_METHODS

CACHE_TARGET_RATIO = 5.0
MEMORY_TARGET_GIB = 4.0


def params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "defaults"


def _gib(value: float | None) -> str:
    return "—" if value is None else f"{value / GIB:.2f}"


def _shapes_text(shapes: Sequence[Sequence[int]]) -> str:
    return ", ".join("x".join(str(n) for n in shape) for shape in shapes)


def render_markdown(result: JsonDict) -> str:
    out: list[str] = []
    env = result["environment"]
    peak = result.get("peak_gflops", {})
    bfloat16_peak = result.get("peak_gflops_bfloat16_512", {})
    out.append(
        f"{env['cpus']} CPUs ({env['cpu']}), torch threads {result['threads']}, prompt {result['prompt_tokens']} "
        f"forced random token ids + G generated (forced random ids). Matmul peak (2048² float32): "
        f"{fmt(peak.get('1'), 1)} GFLOP/s at 1 thread, {fmt(peak.get('2'), 1)} GFLOP/s at 2 threads"
        + (
            f"; bfloat16 (512²): {fmt(bfloat16_peak.get('1'), 1)} and {fmt(bfloat16_peak.get('2'), 1)} GFLOP/s"
            if bfloat16_peak
            else ""
        )
        + (". **Smoke run: sizes are tiny, numbers mean nothing.**" if result.get("smoke") else ".")
    )
    cache = result.get("cache")
    if cache:
        out += ["", "**Hidden-state cache: re-explaining a cached generation vs cold**", ""]
        if cache.get("error"):
            out.append(f"failed: {cache['error']}")
        rows = [
            [
                r["method"],
                params_text(r["params"]),
                f"{r['prompt']}+{r['generated']}",
                f"{r['cold_median_s']:.3f}",
                f"{r['warm_median_s']:.3f}",
                f"**{r['ratio']:.2f}x**",
                f"{r['states_only_ratio']:.2f}x",
                f"{r['cache_get_median_s'] * 1000:.1f}",
                verdict(r["met"]),
            ]
            for r in cache.get("rows", [])
        ]
        out.append(
            markdown_table(
                [
                    "method",
                    "params",
                    "tokens",
                    "cold s",
                    "warm s",
                    "cold/warm",
                    "cold/warm, readouts dropped",
                    "cache get ms",
                    f"≥ {CACHE_TARGET_RATIO:g}x",
                ],
                rows,
            )
        )
    scaling = result.get("scaling")
    if scaling:
        out += [
            "",
            "**Scaling with generated tokens** (one fresh process per point; time = whole explain() call; ≈: "
            "extrapolated by FLOPs from the first items; ≥: the largest group did not run, so the peak is a lower "
            "bound)",
            "",
        ]
        rows = []
        for r in scaling["rows"]:
            if r["status"] in ("skipped", "failed"):
                rows.append([r["method"], r["generated"], r["status"], "—", "—", "—", "—", r.get("reason", "")])
                continue
            partial = r["status"] == "extrapolated"
            rows.append(
                [
                    r["method"],
                    r["generated"],
                    ("≈" if partial else "") + f"{r['time_s']:.2f}",
                    f"{r['measured_s']:.1f}" + (f" ({r['items_done']}/{r['items_total']} items)" if partial else ""),
                    ("" if r["peak_rss_is_full"] else "≥ ") + _gib(r["peak_rss_bytes"]),
                    f"{r['achieved_gflops']:.1f}",
                    f"{100 * r['efficiency_same_threads']:.0f}% / {100 * r['efficiency_vs_2_thread_peak']:.0f}%",
                    "",
                ]
            )
        out.append(
            markdown_table(
                ["method", "G", "time s", "measured s", "peak RSS GiB", "GFLOP/s", "eff. (same-thread / 2-thread peak)",
                 "note"],
                rows,
            )
        )  # fmt: skip
        exps = scaling["exponents"]
        out += [
            "",
            markdown_table(
                ["method", "growth exponent (time vs G)", "FLOP-model exponent"],
                [[m, fmt(e["measured"]), fmt(e["flop_model"])] for m, e in exps.items()],
            ),
        ]
    chunking = result.get("chunking")
    if chunking:
        out += [
            "",
            f"**Memory at G = {chunking['generated']}, default parameters: the engine's pass over the whole sequence, "
            "then the method's largest group of chunks** (targets x path points x prefix; full time extrapolated by "
            "FLOPs)",
            "",
        ]
        rows = [
            [
                r["label"],
                r["status"],
                _shapes_text(r.get("item_shapes", [])),
                _gib(r.get("peak_rss_bytes") or r.get("max_rss_seen_bytes")),
                ("≈" if r["status"] == "extrapolated" else "") + fmt(r.get("time_s"), 0),
                verdict(r.get("within_target")),
                r.get("reason", ""),
            ]
            for r in chunking["memory"]
        ]
        out.append(
            markdown_table(
                ["method", "status", "chunks measured", "peak RSS GiB", "full time s", f"≤ {MEMORY_TARGET_GIB:g} GiB",
                 "note"],
                rows,
            )
        )  # fmt: skip
        tolerance = chunking["identity_tolerance"]
        out += ["", f"**Chunked vs unchunked results** (agree: max abs diff ≤ {tolerance:g} x max abs value)", ""]
        if chunking.get("identity_error"):
            out.append(f"failed: {chunking['identity_error']}")
        rows = [
            [
                r["method"],
                r["generated"],
                f"{params_text(r['unchunked_params'])} ({r['unchunked_chunks']} chunk)",
                f"{params_text(r['chunked_params'])} ({r['chunked_chunks']} chunks)",
                "yes" if r["identical"] else "no",
                f"{r['relative_diff']:.1e}",
                "—"
                if r["float64_relative_diff"] is None
                else f"{r['float64_relative_diff']:.1e} ({r['float32_relative_error']:.1e})",
                verdict(r["within_tolerance"]),
            ]
            for r in chunking["identity"]
        ]
        out.append(
            markdown_table(
                ["method", "G", "unchunked", "chunked", "bitwise identical", "max abs diff / max abs value",
                 "same in float64 (float32's own error)", "agree"],
                rows,
            )
        )  # fmt: skip
        target = result["targets"]["memory"]
        out += ["", f"- 1,024-token generation, every gradient method ≤ {MEMORY_TARGET_GIB:g} GiB by chunking, results "
                f"identical to unchunked: {verdict(target['met'])} ({target['summary']})."]  # fmt: skip
    cache_target = result.get("targets", {}).get("cache")
    if cache_target:
        out.append(f"- Cache speed-up ≥ {CACHE_TARGET_RATIO:g}x for every method: {verdict(cache_target['met'])}.")
    return "\n".join(out)


def memory_verdict(chunking: JsonDict, size: int) -> JsonDict:
    fits = {row["method"]: row.get("within_target") is True for row in chunking["memory"] if not row["params"]}
    agree = {row["method"]: row["within_tolerance"] for row in chunking["identity"]}
    bitwise = sum(row["identical"] for row in chunking["identity"])
    met = (
        size >= 1024
        and set(fits) >= set(GRADIENT_METHODS)
        and all(fits.values())
        and set(agree) >= set(GRADIENT_METHODS)
        and all(agree.values())
    )
    summary = (
        f"G = {size}, default parameters: "
        + (", ".join(f"{m} {'fits' if ok else 'does not fit'}" for m, ok in fits.items()) or "none measured")
        + f"; chunked agrees with unchunked for {sum(agree.values())}/{len(agree)} methods"
        + f" ({bitwise}/{len(agree)} bitwise)"
    )
    return {"met": met, "summary": summary}


def failures(result: JsonDict) -> list[str]:
    """What could not run: every failed point of the scaling and chunking sections, and a section's own error."""
    found = []
    for name in ("cache", "scaling", "chunking"):
        section = result.get(name) or {}
        found += [f"{name}: {section[key]}" for key in ("error", "identity_error") if section.get(key)]
        for row in [*section.get("rows", []), *section.get("memory", [])]:
            if row.get("status") == "failed":
                found.append(f"{name} {row['method']} G={row['generated']}: {row.get('reason')}")
    return found
