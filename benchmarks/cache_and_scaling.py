"""The explainer engine in-process: what the hidden-state cache saves, how methods scale with generation length,
how much memory they need, and how close they come to the machine's matrix-multiply peak.

    .venv/bin/python benchmarks/cache_and_scaling.py [--max-generated 1024] [--point-budget-s 240] [--threads 1]
    .venv/bin/python benchmarks/cache_and_scaling.py --sections cache        # only one part
    .venv/bin/python benchmarks/cache_and_scaling.py --smoke                 # tiny sizes, < 60 s, no timing claims

Everything runs `explainers.engine.explain` on the embedded model loaded with `explainers.model.load_model`
(float32, SDPA attention), with `--threads` torch threads (default 1: the explainer's deployed setting, and robust to
other jobs on this 2-core machine). Sequences are forced, random but fixed token ids (numpy seed 0, ids drawn
uniformly from [100, vocab), so no special tokens): a prompt of `--prompt-tokens` (64) ids followed by G generated
ids. The cost of every method depends only on the lengths, not on which ids they are.

Sections:

- **peak**: torch.matmul of 2048x2048 float32 at 1 and 2 threads, GFLOP/s (2 * 2048**3 per product).
- **cache**: with a HiddenStateCache on a redis-server started here (free port, no persistence), one subprocess
  explains the same sequence cold (database flushed first: one forward pass that fills the cache) and warm (hit),
  alternating, per method; ratio = median cold / median warm. Target: >= 5x.
- **scaling**: input_x_gradient, saliency, integrated_gradients (16 steps), occlusion, attention and logit_lens at
  G = 16, 64, 256, 1024 (capped by `--max-generated`), each point in a fresh subprocess: wall time of explain()
  (the engine's own forward pass included, no cache) and peak RSS (ru_maxrss, model included). Growth exponent =
  least-squares slope of log time vs log G. A point whose predicted time exceeds `--point-budget-s` is measured
  over its first gradient chunks / perturbation batches only (the methods' own loop is cut short by wrapping
  `score_gradients` / `token_scores` in the subprocess) and its full time extrapolated at the rate measured up to
  there; the peak RSS of such a run is the full run's (every later chunk has the same shapes). A point that cannot
  even do that within budget is recorded as skipped, with the reason.
- **chunking**: the target "a 1,024-token generation explained with any gradient method within 4 GiB peak RSS of the
  explainer, by chunking, with results identical to unchunked": peak RSS at G = 1024 with the default and smaller
  target_batch_size / internal_batch_size, and chunked vs unchunked results at a size where unchunked fits
  (bitwise equality and max |difference|).
- **efficiency**: achieved FLOP/s of each measured point over the matmul peak. FLOPs are counted as
  forward(n tokens, k scored positions, layers l) = l * (2 * P_layer * n + 2 * n**2 * d) + 2 * V * d * k
  (P_layer = parameters of one decoder layer, d = hidden size, V = vocabulary; 2 * n**2 * d is causal attention's
  QK^T and AV), and a backward pass = l * (2 * P_layer * n + 4 * n**2 * d) + 2 * V * d * k: the weights are
  frozen, so a backward pass computes input gradients only (one matmul per weight matmul, not the usual
  convention's two; with "backward = 2 x forward" the gradient methods would show more than 100% of the matmul
  peak), plus what each method adds (see `method_flops`). Every target of a batched backward pass costs a whole
  backward pass.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import bench_util
from bench_util import JsonDict, fmt, markdown_table, verdict

GIB = 1024**3
MIB = 1024**2
CACHE_TARGET_RATIO = 5.0
MEMORY_TARGET_GIB = 4.0
SCALING_METHODS: dict[str, dict[str, Any]] = {
    "input_x_gradient": {},
    "saliency": {},
    "integrated_gradients": {"steps": 16},
    "occlusion": {},
    "attention": {},
    "logit_lens": {},
}
GRADIENT_METHODS = (
    "input_x_gradient",
    "saliency",
    "integrated_gradients",
    "gradient_x_activation",
    "layer_integrated_gradients",
)
CHUNKED_METHODS = ("occlusion", "shapley_sampling", *GRADIENT_METHODS)


# ---------------------------------------------------------------------------------------------------------- FLOPs


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    @classmethod
    def read(cls, model_dir: Path) -> ModelShape:
        config = json.loads((model_dir / "config.json").read_text())
        heads = int(config["num_attention_heads"])
        return cls(
            layers=int(config["num_hidden_layers"]),
            hidden=int(config["hidden_size"]),
            vocab=int(config["vocab_size"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads", heads)),
            head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
            intermediate=int(config["intermediate_size"]),
        )

    @property
    def layer_params(self) -> int:
        d, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return d * q + 2 * d * kv + q * d + 3 * d * self.intermediate + 2 * d

    def forward(self, tokens: int, scored: int, layers: int | None = None) -> float:
        """FLOPs of a forward pass over `tokens` through `layers` decoder layers (default all), unembedding
        `scored` positions: per layer 2 * P_layer * n for the weights and 2 * n**2 * d for causal attention."""
        layers = self.layers if layers is None else layers
        per_layer = 2 * self.layer_params * tokens + 2 * tokens**2 * self.hidden
        return float(layers * per_layer + 2 * self.vocab * self.hidden * scored)

    def backward(self, tokens: int, scored: int, layers: int | None = None) -> float:
        """FLOPs of one backward pass to the inputs only (the weights are frozen): one matmul per weight matmul
        (dX = dY W^T, no dW), two per attention matmul (both operands depend on the input)."""
        layers = self.layers if layers is None else layers
        per_layer = 2 * self.layer_params * tokens + 4 * tokens**2 * self.hidden
        return float(layers * per_layer + 2 * self.vocab * self.hidden * scored)


@dataclass(frozen=True)
class FlopPlan:
    """FLOPs of one explain() call: a fixed part (engine forward, the method's forwards before its loop) and a
    loop of `items` equal items (gradient chunks or perturbation batches) of `per_item` each, plus `tail`."""

    fixed: float
    per_item: float
    items: int
    tail: float = 0.0

    @property
    def total(self) -> float:
        return self.fixed + self.per_item * self.items + self.tail

    def done(self, items_done: int | None) -> float:
        return self.total if items_done is None else self.fixed + self.per_item * items_done


def method_flops(
    shape: ModelShape, method: str, params: dict[str, Any], tokens: int, generated: int, targets: int
) -> FlopPlan:
    """The FlopPlan of explaining `targets` of `generated` tokens at the end of a `tokens`-long sequence (no cache,
    so the engine's recording forward pass is included).

    A batched vector-Jacobian product over k targets costs k backward passes: autograd does not know that target
    i's one-hot selector is zero elsewhere, so each one runs the whole graph (all positions, all scored rows).
    """
    engine = shape.forward(tokens, generated) + 2 * shape.vocab * shape.hidden * targets  # + step scores
    tbs = int(params.get("target_batch_size", 16))
    if method in ("input_x_gradient", "saliency", "gradient_x_activation"):
        layers = shape.layers - int(params.get("layer", 0))
        forward = shape.forward(tokens, targets, layers)
        backward = shape.backward(tokens, targets, layers)
        chunks = math.ceil(targets / tbs)
        return FlopPlan(engine + forward, backward * targets / chunks, chunks)
    if method in ("integrated_gradients", "layer_integrated_gradients"):
        layers = shape.layers - int(params.get("layer", 0))
        steps = int(params.get("steps", 16))
        ibs = min(int(params.get("internal_batch_size", 16)), steps)
        forward = shape.forward(tokens, targets, layers)
        backward = shape.backward(tokens, targets, layers)
        baseline = shape.forward(tokens, targets) if params.get("baseline", "token") == "token" else 0.0
        batches = math.ceil(steps / ibs)
        chunks_per_batch = math.ceil(targets / tbs)
        # Items are target chunks of one batch of ibs path points; the first batch's forward is in `fixed`, the
        # later batches' forwards and the final two-row forward in `tail` (only the rate matters for extrapolating).
        per_chunk = backward * ibs * targets / chunks_per_batch
        fixed = engine + baseline + forward * ibs
        return FlopPlan(fixed, per_chunk, batches * chunks_per_batch, tail=forward * (steps - ibs) + 2 * forward)
    if method == "occlusion":
        sources = tokens - 1  # the last generated token is a target, so every earlier position is a source
        window = int(params.get("window", 1))
        sequences = math.ceil(sources / window) + 1
        batch = int(params.get("batch_size", 16))
        batches = math.ceil(sequences / batch)
        return FlopPlan(engine, shape.forward(sources, targets) * sequences / batches, batches)
    if method == "attention":
        q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
        per_layer = 2 * shape.hidden * kv * tokens + 2 * shape.hidden * q * targets + 2 * targets * tokens * q
        return FlopPlan(engine + shape.layers * per_layer, 0.0, 0)
    if method == "attention_rollout":
        q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
        per_layer = (2 * shape.hidden * (q + kv) + 2 * tokens * q + 2 * targets * tokens) * tokens
        return FlopPlan(engine + shape.layers * per_layer, 0.0, 0)
    if method == "logit_lens":
        return FlopPlan(engine + (shape.layers + 1) * 2 * shape.vocab * shape.hidden * targets, 0.0, 0)
    raise ValueError(f"no FLOP model for {method}")


# ------------------------------------------------------------------------------------------------ one point (child)


@dataclass(frozen=True)
class PointSpec:
    method: str
    params: dict[str, Any]
    generated: int
    prompt: int
    threads: int
    seed: int = 0
    # Stop the method after this many gradient chunks / perturbation batches (None: run to the end).
    max_items: int | None = None
    # Save the attribution matrix here (.npy) for a chunked-vs-unchunked comparison.
    dump: str | None = None
    label: str = ""


class StopMeasurement(Exception):
    """Raised inside a method's loop once the point has measured what it needs."""


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def matmul_gflops(threads: int, size: int = 2048, seconds: float = 1.5) -> float:
    """Best-of GFLOP/s of float32 size x size matmuls with `threads` torch threads."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        for _ in range(2):
            torch.matmul(a, b)
        best = math.inf
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            torch.matmul(a, b)
            best = min(best, time.perf_counter() - started)
        return 2 * size**3 / best / 1e9
    finally:
        torch.set_num_threads(previous)


def forced_ids(vocab: int, prompt: int, generated: int, seed: int) -> tuple[list[int], list[int]]:
    """The first `prompt` ids of a fixed random stream as the prompt, the next `generated` as the output; the same
    seed gives every size the same prefix."""
    import numpy as np

    stream = np.random.default_rng(seed).integers(100, vocab, size=prompt + generated).tolist()
    return stream[:prompt], stream[prompt:]


@contextlib.contextmanager
def limited_loops(max_items: int | None, counter: list[float]) -> Iterator[None]:
    """Cut the methods' gradient-chunk and perturbation-batch loops short after max_items items, by rebinding
    `score_gradients` and `token_scores` (in this process only) wherever a method module refers to them. counter
    collects each item's completion time."""
    if max_items is None:
        yield
        return
    import explainers.methods.registry  # noqa: F401 - imports every method module
    from explainers import targets
    from explainers.methods import gradients

    originals: dict[str, Callable[..., Any]] = {
        "score_gradients": gradients.score_gradients,
        "token_scores": targets.token_scores,
    }

    def chunks(*args: Any, **kwargs: Any) -> Iterator[Any]:
        for chunk in originals["score_gradients"](*args, **kwargs):
            yield chunk
            counter.append(time.perf_counter())
            if len(counter) >= max_items:
                raise StopMeasurement

    def token_scores(*args: Any, **kwargs: Any) -> Any:
        scores = originals["token_scores"](*args, **kwargs)
        counter.append(time.perf_counter())
        if len(counter) >= max_items:
            raise StopMeasurement
        return scores

    replacements = {"score_gradients": chunks, "token_scores": token_scores}
    rebound: list[tuple[dict[str, Any], str]] = []
    try:
        for module_name, module in list(sys.modules.items()):
            if not module_name.startswith("explainers.methods"):
                continue
            namespace = vars(module)
            for name, original in originals.items():
                if namespace.get(name) is original:
                    namespace[name] = replacements[name]
                    rebound.append((namespace, name))
        yield
    finally:
        for namespace, name in rebound:
            namespace[name] = originals[name]


def run_point(spec: PointSpec, model_dir: Path) -> JsonDict:
    import numpy as np
    import torch

    from common.jobs import ExplainOptions
    from explainers.engine import explain
    from explainers.model import load_model

    torch.set_num_threads(spec.threads)
    peak = matmul_gflops(spec.threads, seconds=1.0)
    loaded = load_model(model_dir)
    # Warm-up on a tiny sequence: first-call costs (lazy init, allocator growth) stay out of the timing.
    warm_params = dict(spec.params)
    if "steps" in warm_params:
        warm_params["steps"] = 2
    warm_prompt, warm_output = forced_ids(loaded.vocab_size, 4, 2, spec.seed + 1)
    explain(loaded, None, warm_prompt, warm_output, [(spec.method, warm_params)], None, ExplainOptions())
    rss_loaded = maxrss_bytes()

    prompt_ids, output_ids = forced_ids(loaded.vocab_size, spec.prompt, spec.generated, spec.seed)
    stamps: list[float] = []
    complete = True
    result = None
    started = time.perf_counter()
    with limited_loops(spec.max_items, stamps):
        try:
            explanation = explain(loaded, None, prompt_ids, output_ids, [(spec.method, spec.params)], None)
            result = explanation.results[0]
        except StopMeasurement:
            complete = False
    elapsed = time.perf_counter() - started
    if spec.dump and result is not None:
        values = np.frombuffer(result.attributions.data, dtype="<f4").reshape(tuple(result.attributions.shape))
        np.save(spec.dump, values)
    return {
        "complete": complete,
        "seconds": elapsed,
        "method_seconds": None if result is None else result.seconds,
        "items_done": len(stamps),
        "item_seconds": [b - a for a, b in itertools.pairwise(stamps)],
        "rss_after_load_bytes": rss_loaded,
        "peak_rss_bytes": maxrss_bytes(),
        "matmul_gflops_same_threads": peak,
        "tokens": spec.prompt + spec.generated,
    }


# -------------------------------------------------------------------------------------------------- cache (child)


@dataclass(frozen=True)
class CacheSpec:
    redis_url: str
    threads: int
    repeats: int
    cases: list[tuple[str, dict[str, Any], int]]  # (method, params, generated)
    prompt: int
    seed: int = 0


def run_cache(spec: CacheSpec, model_dir: Path) -> JsonDict:
    import redis
    import torch

    from explainers.engine import explain
    from explainers.hidden_cache import HiddenStateCache
    from explainers.model import load_model

    torch.set_num_threads(spec.threads)
    loaded = load_model(model_dir)
    client = redis.Redis.from_url(spec.redis_url)
    cache = HiddenStateCache(client, ttl_seconds=3600, tenant="bench")
    rows = []
    for method, params, generated in spec.cases:
        prompt_ids, output_ids = forced_ids(loaded.vocab_size, spec.prompt, generated, spec.seed)
        methods = [(method, params)]
        # Warm-up (also compiles nothing, but pages the weights and sizes the allocator).
        explain(loaded, None, prompt_ids[:4], output_ids[:2], methods, None)
        cold, warm, lookup = [], [], []
        identical: list[bool] = []
        for _ in range(spec.repeats):
            client.flushdb()
            started = time.perf_counter()
            first = explain(loaded, cache, prompt_ids, output_ids, methods, None)
            cold.append(time.perf_counter() - started)
            started = time.perf_counter()
            second = explain(loaded, cache, prompt_ids, output_ids, methods, None)
            warm.append(time.perf_counter() - started)
            if first.cache_hit or not second.cache_hit:
                raise RuntimeError(f"{method}: expected a miss then a hit, got {first.cache_hit}, {second.cache_hit}")
            # A hit must reproduce the miss exactly (the methods see bf16-rounded states either way).
            a, b = first.results[0], second.results[0]
            a.seconds = b.seconds = 0.0
            identical.append(a.SerializeToString() == b.SerializeToString())
            started = time.perf_counter()
            cache.get(loaded.weights_digest, [*prompt_ids, *output_ids])
            lookup.append(time.perf_counter() - started)
        entry = client.get(HiddenStateCache.key("bench", loaded.weights_digest, [*prompt_ids, *output_ids]))
        rows.append(
            {
                "method": method,
                "params": params,
                "prompt": spec.prompt,
                "generated": generated,
                "cold_s": cold,
                "warm_s": warm,
                "cache_get_s": lookup,
                "hit_identical_to_miss": all(identical),
                "entry_bytes": len(entry) if isinstance(entry, bytes) else None,
            }
        )
    return {"rows": rows, "peak_rss_bytes": maxrss_bytes()}


# ------------------------------------------------------------------------------------------- subprocess plumbing


@dataclass
class Outcome:
    ok: bool
    data: JsonDict = field(default_factory=dict)
    error: str = ""


def run_child(
    kind: str, spec: JsonDict, *, timeout_s: float, rss_limit_bytes: int, threads: int, in_process: bool = False
) -> Outcome:
    """Run this script with --child in a fresh process; kill it past timeout_s or rss_limit_bytes.

    in_process (smoke runs only) calls the same code here instead, to save the ~10 s a fresh process spends
    importing torch and transformers; its peak RSS is then this process's.
    """
    import psutil

    if in_process:
        try:
            return Outcome(True, run_request({"kind": kind, "spec": dict(spec)}))
        except Exception as exc:
            return Outcome(False, {}, f"{type(exc).__name__}: {exc}")

    with tempfile.TemporaryDirectory(prefix="sightline-point-") as scratch:
        spec_path, out_path = Path(scratch) / "spec.json", Path(scratch) / "out.json"
        spec_path.write_text(json.dumps({"kind": kind, "spec": spec}))
        env = dict(
            os.environ,
            OMP_NUM_THREADS=str(threads),
            MKL_NUM_THREADS=str(threads),
            TOKENIZERS_PARALLELISM="false",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
        )
        command = [bench_util.PYTHON, __file__, "--child", str(spec_path), str(out_path)]
        with subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) as child:
            watched = psutil.Process(child.pid)
            deadline = time.monotonic() + timeout_s
            killed = ""
            max_seen = 0
            while child.poll() is None:
                with contextlib.suppress(psutil.Error):
                    max_seen = max(max_seen, watched.memory_info().rss)
                if max_seen > rss_limit_bytes:
                    killed = f"killed: RSS passed the {rss_limit_bytes / GIB:.0f} GiB guard"
                elif time.monotonic() > deadline:
                    killed = f"killed: still running after {timeout_s:.0f} s"
                if killed:
                    child.kill()
                    break
                time.sleep(0.1)
            _, stderr = child.communicate()
        if killed:
            return Outcome(False, {"max_rss_seen_bytes": max_seen}, killed)
        if child.returncode != 0 or not out_path.exists():
            return Outcome(False, {}, f"exit {child.returncode}: {stderr.strip().splitlines()[-1:]}")
        data: JsonDict = json.loads(out_path.read_text())
        return Outcome(True, data)


def run_request(request: JsonDict) -> JsonDict:
    raw = json.loads(json.dumps(request["spec"]))  # a deep copy with JSON types, as a child process reads it
    model_dir = Path(raw.pop("model_dir"))
    if request["kind"] == "point":
        return run_point(PointSpec(**raw), model_dir)
    raw["cases"] = [tuple(case) for case in raw["cases"]]
    return run_cache(CacheSpec(**raw), model_dir)


def child_main(spec_path: Path, out_path: Path) -> None:
    out_path.write_text(json.dumps(run_request(json.loads(spec_path.read_text()))))


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


def measure_point(
    settings: Settings, spec: PointSpec, rate_flops: float | None, *, min_items: int = 1, fresh: bool = False
) -> JsonDict:
    """Plan (full, cut short, or skipped) and run one point; returns its row."""
    shape = settings.shape
    tokens = spec.prompt + spec.generated
    plan = method_flops(shape, spec.method, spec.params, tokens, spec.generated, spec.generated)
    if rate_flops is None:
        # No earlier point of this method: assume a third of the same-thread matmul peak.
        rate_flops = settings.peak_gflops[settings.threads] * 1e9 / 3
    predicted_full = plan.total / rate_flops
    row: JsonDict = {
        "label": spec.label or spec.method,
        "method": spec.method,
        "params": spec.params,
        "prompt": spec.prompt,
        "generated": spec.generated,
        "tokens": tokens,
        "flops_total": plan.total,
        "predicted_full_s": predicted_full,
        "fresh_process": not (settings.smoke and not fresh),
    }
    if spec.max_items is None and predicted_full > settings.budget_s:
        if plan.items == 0 or spec.method not in CHUNKED_METHODS:
            row.update(status="skipped", reason=f"predicted {predicted_full:.0f} s > budget {settings.budget_s:.0f} s")
            return row
        affordable = int((settings.budget_s * rate_flops - plan.fixed) / max(plan.per_item, 1.0))
        items = max(min_items, min(affordable, plan.items))
        predicted = plan.done(items) / rate_flops
        if predicted > 2 * settings.budget_s:
            row.update(
                status="skipped",
                reason=(
                    f"predicted {predicted_full:.0f} s in full and {predicted:.0f} s for its first {items} "
                    f"of {plan.items} {'chunks' if spec.method in GRADIENT_METHODS else 'batches'}, "
                    f"over the {settings.budget_s:.0f} s budget"
                ),
            )
            return row
        if items < plan.items:
            spec = replace(spec, max_items=items)
    say(
        f"  {row['label']} G={spec.generated} {'' if spec.max_items is None else f'(first {spec.max_items} items) '}"
        f"predicted {predicted_full:.0f} s in full"
    )
    spec_json = {**asdict(spec), "model_dir": str(settings.model_dir)}
    timeout = max(300.0, 4 * min(predicted_full, 2 * settings.budget_s) + 120)
    outcome = run_child(
        "point",
        spec_json,
        timeout_s=timeout,
        rss_limit_bytes=settings.rss_limit_bytes,
        threads=settings.threads,
        in_process=settings.smoke and not fresh,
    )
    if not outcome.ok:
        row.update(status="failed", reason=outcome.error, **outcome.data)
        say(f"    -> failed: {outcome.error}")
        return row
    data = outcome.data
    done = plan.done(None if data["complete"] else data["items_done"])
    rate = done / data["seconds"]
    row.update(
        status="measured" if data["complete"] else "extrapolated",
        items_done=data["items_done"],
        items_total=plan.items,
        measured_s=data["seconds"],
        time_s=data["seconds"] if data["complete"] else plan.total / rate,
        method_s=data["method_seconds"],
        peak_rss_bytes=data["peak_rss_bytes"],
        rss_after_load_bytes=data["rss_after_load_bytes"],
        flops_done=done,
        achieved_gflops=rate / 1e9,
        matmul_gflops_same_threads=data["matmul_gflops_same_threads"],
        efficiency_same_threads=rate / 1e9 / data["matmul_gflops_same_threads"],
        efficiency_vs_2_thread_peak=rate / 1e9 / settings.peak_gflops[2],
    )
    say(
        f"    -> {row['status']} {row['time_s']:.1f} s, peak RSS {row['peak_rss_bytes'] / GIB:.2f} GiB, "
        f"{row['achieved_gflops']:.1f} GFLOP/s"
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
    for method, params in SCALING_METHODS.items():
        rate: float | None = None
        method_rows = []
        for generated in settings.sizes:
            spec = PointSpec(method, params, generated, settings.prompt, settings.threads)
            row = measure_point(settings, spec, rate)
            if row["status"] in ("measured", "extrapolated"):
                rate = row["achieved_gflops"] * 1e9
            method_rows.append(row)
        timed = [(r["generated"], r["time_s"]) for r in method_rows if "time_s" in r]
        model = [(r["generated"], r["flops_total"]) for r in method_rows]
        exponents[method] = {"measured": fit_exponent(timed), "flop_model": fit_exponent(model)}
        rows += method_rows
    return {"rows": rows, "exponents": exponents}


def section_chunking(settings: Settings) -> JsonDict:
    """Peak RSS at G = max size for every gradient method, default and smaller chunks; chunked vs unchunked
    results where unchunked fits."""
    high = settings.shape.layers - 2
    big = max(settings.sizes)
    memory_cases: list[tuple[str, dict[str, Any]]] = [
        ("input_x_gradient", {}),
        ("input_x_gradient", {"target_batch_size": 4}),
        ("saliency", {"target_batch_size": 4}),
        ("gradient_x_activation", {"layer": settings.shape.layers // 2, "target_batch_size": 4}),
        ("integrated_gradients", {"steps": 16, "internal_batch_size": 1, "target_batch_size": 4}),
        ("layer_integrated_gradients", {"layer": high, "steps": 16, "internal_batch_size": 1, "target_batch_size": 4}),
    ]
    if settings.smoke:
        memory_cases = memory_cases[4:5]  # integrated gradients, cut short after 2 chunks
    memory_rows = []
    for method, params in memory_cases:
        label = f"{method} " + ", ".join(f"{k}={v}" for k, v in params.items()) if params else f"{method} (defaults)"
        spec = PointSpec(method, params, big, settings.prompt, settings.threads, label=label)
        # Two chunks: the first backward pass keeps the graph for the next (retain_graph), as in a full run.
        memory_rows.append(measure_point(settings, replace(spec, max_items=2), None))
    for row in memory_rows:
        peak = row.get("peak_rss_bytes")
        row["within_target"] = None if peak is None else peak <= MEMORY_TARGET_GIB * GIB

    small = min(s for s in settings.sizes if s >= 16) if not settings.smoke else max(settings.sizes)
    pairs: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        ("input_x_gradient", {"target_batch_size": small}, {"target_batch_size": 4}),
        ("saliency", {"target_batch_size": small}, {"target_batch_size": 4}),
        ("gradient_x_activation", {"layer": settings.shape.layers // 2, "target_batch_size": small},
         {"layer": settings.shape.layers // 2, "target_batch_size": 4}),
        ("integrated_gradients", {"steps": 4, "internal_batch_size": 4, "target_batch_size": small},
         {"steps": 4, "internal_batch_size": 1, "target_batch_size": 4}),
        ("layer_integrated_gradients",
         {"layer": high, "steps": 4, "internal_batch_size": 4, "target_batch_size": small},
         {"layer": high, "steps": 4, "internal_batch_size": 1, "target_batch_size": 4}),
    ]  # fmt: skip
    if settings.smoke:
        pairs = [("input_x_gradient", {"target_batch_size": small}, {"target_batch_size": 2})]
    identity_rows = []
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="sightline-chunks-") as scratch:
        for method, unchunked, chunked in pairs:
            dumps = {}
            runs = {}
            for name, params in (("unchunked", unchunked), ("chunked", chunked)):
                dumps[name] = str(Path(scratch) / f"{method}-{name}.npy")
                spec = PointSpec(method, params, small, settings.prompt, settings.threads, dump=dumps[name])
                # Smoke runs keep one fresh process here, so the subprocess plumbing stays covered.
                runs[name] = measure_point(settings, spec, None, fresh=name == "chunked")
            pair: JsonDict = {
                "method": method,
                "generated": small,
                "unchunked_params": unchunked,
                "chunked_params": chunked,
                "unchunked_peak_rss_bytes": runs["unchunked"].get("peak_rss_bytes"),
                "chunked_peak_rss_bytes": runs["chunked"].get("peak_rss_bytes"),
                "unchunked_s": runs["unchunked"].get("time_s"),
                "chunked_s": runs["chunked"].get("time_s"),
            }
            if all(Path(path).exists() for path in dumps.values()):
                a, b = np.load(dumps["unchunked"]), np.load(dumps["chunked"])
                pair["identical"] = bool(a.shape == b.shape and np.array_equal(a, b))
                pair["max_abs_diff"] = float(np.abs(a - b).max())
                pair["max_abs_value"] = float(np.abs(a).max())
            else:
                pair["identical"] = None
                pair["reason"] = "; ".join(str(r.get("reason", "")) for r in runs.values())
            identity_rows.append(pair)
    return {"memory": memory_rows, "identity": identity_rows, "generated": big}


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
    state = Path(tempfile.mkdtemp(prefix="sightline-cache-bench-"))
    from deploy.local_stack import Child, free_port

    port = free_port()
    server = Child(
        "redis",
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--dir", str(state)],
        dict(os.environ),
        state / "redis.log",
    )  # fmt: skip
    try:
        import redis

        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(redis.RedisError):
                if redis.Redis(port=port).ping():
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {server.log_tail()}")
            time.sleep(0.1)
        spec = CacheSpec(
            redis_url=f"redis://127.0.0.1:{port}/0",
            threads=settings.threads,
            repeats=settings.repeats,
            cases=cases,
            prompt=settings.prompt,
        )
        say(f"  cache: {len(cases)} cases x {settings.repeats} repeats")
        outcome = run_child(
            "cache",
            {**asdict(spec), "model_dir": str(settings.model_dir)},
            timeout_s=3600,
            rss_limit_bytes=settings.rss_limit_bytes,
            threads=settings.threads,
            in_process=settings.smoke,
        )
    finally:
        server.stop()
        shutil.rmtree(state, ignore_errors=True)
    if not outcome.ok:
        return {"error": outcome.error, "rows": []}
    rows = outcome.data["rows"]
    for row in rows:
        cold, warm = _median(row["cold_s"]), _median(row["warm_s"])
        row.update(cold_median_s=cold, warm_median_s=warm, ratio=cold / warm, met=cold / warm >= CACHE_TARGET_RATIO)
        row["cache_get_median_s"] = _median(row["cache_get_s"])
    return {"rows": rows, "peak_rss_bytes": outcome.data["peak_rss_bytes"]}


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


# ------------------------------------------------------------------------------------------------------ rendering


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "defaults"


def _gib(value: float | None) -> str:
    return "—" if value is None else f"{value / GIB:.2f}"


def render_markdown(result: JsonDict) -> str:
    out: list[str] = []
    env = result["environment"]
    peak = result.get("peak_gflops", {})
    out.append(
        f"{env['cpus']} CPUs ({env['cpu']}), torch threads {result['threads']}, prompt {result['prompt_tokens']} "
        f"forced random token ids + G generated (forced random ids). Matmul peak (2048² float32): "
        f"{fmt(peak.get('1'), 1)} GFLOP/s at 1 thread, {fmt(peak.get('2'), 1)} GFLOP/s at 2 threads"
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
                _params_text(r["params"]),
                f"{r['prompt']}+{r['generated']}",
                f"{r['cold_median_s']:.3f}",
                f"{r['warm_median_s']:.3f}",
                f"**{r['ratio']:.2f}x**",
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
                    "cache get ms",
                    f"≥ {CACHE_TARGET_RATIO:g}x",
                ],
                rows,
            )
        )
    scaling = result.get("scaling")
    if scaling:
        out += ["", "**Scaling with generated tokens** (one fresh process per point; time = whole explain() call)", ""]
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
                    _gib(r["peak_rss_bytes"]),
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
        out += ["", f"**Memory at G = {chunking['generated']} (first 2 chunks of the full run)**", ""]
        rows = [
            [
                r["label"],
                r["status"],
                _gib(r.get("peak_rss_bytes") or r.get("max_rss_seen_bytes")),
                ("≈" if r["status"] == "extrapolated" else "") + fmt(r.get("time_s"), 0),
                verdict(r.get("within_target")),
                r.get("reason", ""),
            ]
            for r in chunking["memory"]
        ]
        out.append(
            markdown_table(
                ["method, chunking", "status", "peak RSS GiB", "full time s", f"≤ {MEMORY_TARGET_GIB:g} GiB", "note"],
                rows,
            )
        )
        out += ["", "**Chunked vs unchunked results**", ""]
        rows = [
            [
                r["method"],
                r["generated"],
                _params_text(r["unchunked_params"]),
                _params_text(r["chunked_params"]),
                "—" if r["identical"] is None else ("yes" if r["identical"] else "**no**"),
                fmt(r.get("max_abs_diff"), 3) if r.get("max_abs_diff") is None else f"{r['max_abs_diff']:.2e}",
                f"{_gib(r['unchunked_peak_rss_bytes'])} / {_gib(r['chunked_peak_rss_bytes'])}",
            ]
            for r in chunking["identity"]
        ]
        out.append(
            markdown_table(
                ["method", "G", "unchunked", "chunked", "bitwise identical", "max abs diff", "peak RSS GiB (u / c)"],
                rows,
            )
        )
        target = result["targets"]["memory"]
        out += ["", f"- 1,024-token generation, every gradient method ≤ {MEMORY_TARGET_GIB:g} GiB by chunking, results "
                f"identical to unchunked: {verdict(target['met'])} ({target['summary']})."]  # fmt: skip
    cache_target = result.get("targets", {}).get("cache")
    if cache_target:
        out.append(f"- Cache speed-up ≥ {CACHE_TARGET_RATIO:g}x for every method: {verdict(cache_target['met'])}.")
    return "\n".join(out)


def memory_verdict(chunking: JsonDict, size: int) -> JsonDict:
    by_method: dict[str, bool] = {}
    for row in chunking["memory"]:
        fits = bool(row.get("within_target"))
        by_method[row["method"]] = by_method.get(row["method"], False) or fits
    identical = [row["identical"] for row in chunking["identity"]]
    fits_all = bool(by_method) and all(by_method.values()) and set(by_method) >= set(GRADIENT_METHODS)
    met = size >= 1024 and fits_all and all(v is True for v in identical)
    summary = (
        f"G = {size}; fits with some chunking: "
        + ", ".join(f"{m} {'yes' if ok else 'no'}" for m, ok in by_method.items())
        + f"; identical: {sum(v is True for v in identical)}/{len(identical)}"
    )
    return {"met": met, "summary": summary}


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
    parser.add_argument("--point-budget-s", type=float, default=240.0, help="cut short / skip points predicted longer")
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
        sizes, args.prompt_tokens, args.repeats, args.sections = [4], 8, 1, ["cache", "chunking"]
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


if __name__ == "__main__":
    main()
