"""The measurements of benchmarks/cache_and_scaling.py that run in a child process: one scaling or memory point
(`run_point`), chunked vs unchunked results (`run_identity`) and the hidden-state cache (`run_cache`), each from a
JSON spec, and `run_child`, which runs one in a fresh process (this file with --child SPEC OUT) under a time and
RSS guard.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import bench_util
from bench_util import GIB, JsonDict

# Chunked and unchunked results agree when max |difference| <= this x max |unchunked value|: in float32, or else in
# float64, where rounding stays far below it (the results are sent as float32: one ulp is 1.2e-7 relative).
IDENTITY_TOLERANCE = 1e-5


# ------------------------------------------------------------------------------------------------ one point (child)


@dataclass(frozen=True)
class PointSpec:
    method: str
    params: dict[str, Any]
    generated: int
    prompt: int
    threads: int
    seed: int = 0
    # Stop the method after this many loop items (gradient chunks, perturbation batches); None: run to the end.
    max_items: int | None = None
    # Start every gradient loop at this target, a group boundary of the full call (memory runs of the largest group).
    first_target: int = 0
    label: str = ""

    @property
    def positions(self) -> list[int]:
        """The explained targets' positions: every generated token."""
        return list(range(self.prompt, self.prompt + self.generated))


class StopMeasurement(Exception):
    """Raised inside a method's loop once the point has measured what it needs."""


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def matmul_gflops(threads: int, size: int = 2048, seconds: float = 1.5, dtype: str = "float32") -> float:
    """Best-of GFLOP/s of size x size matmuls of `dtype` with `threads` torch threads."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = (torch.randn(size, size, dtype=getattr(torch, dtype)) for _ in range(2))
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


@dataclass
class LoopRecord:
    """The loop items a call ran: each one's shape (see LoopItem) and completion time."""

    shapes: list[tuple[int, ...]] = field(default_factory=list)
    stamps: list[float] = field(default_factory=list)


@contextlib.contextmanager
def observed_loops(loaded: Any, record: LoopRecord, max_items: int | None, first_target: int) -> Iterator[None]:
    """Record the methods' loop items into `record`, in this process only, and raise StopMeasurement once
    max_items have run:

    - gradient chunks, by rebinding `score_gradients` wherever a method module refers to it; with first_target > 0
      every call of it starts at that target (its chunks from there on are the full call's: chunking is greedy
      from the first target) and reports chunk slices of the full call;
    - perturbation batches, by a forward hook on the base model (the decoder stack) that sees each pass running on
      cached keys and values (the unperturbed pass runs without; the engine's runs its own layer loop).
    """
    import explainers.methods.registry  # noqa: F401 - imports every method module
    from explainers.methods import gradients

    original = gradients.score_gradients

    def item_done(shape: tuple[int, ...]) -> None:
        record.shapes.append(shape)
        record.stamps.append(time.perf_counter())
        if max_items is not None and len(record.shapes) >= max_items:
            raise StopMeasurement

    def score_gradients(
        loaded: Any,
        states: Any,
        layer: int,
        targets: Any,
        target_batch_size: int,
        point_weights: Any = None,
        recorded: Any = None,
    ) -> Iterator[tuple[slice, Any]]:
        chunks = original(loaded, states, layer, targets[first_target:], target_batch_size, point_weights, recorded)
        for chunk, chunk_gradients in chunks:
            yield slice(chunk.start + first_target, chunk.stop + first_target), chunk_gradients
            # After the method has used the chunk: its time counts.
            item_done(tuple(chunk_gradients.shape[:3]))

    def perturbation_batch(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        past = kwargs.get("past_key_values")
        if past is not None:
            sequences, rows = kwargs["input_ids"].shape
            item_done((sequences, rows, past.get_seq_length() - rows))

    hook = loaded.model.base_model.register_forward_hook(perturbation_batch, with_kwargs=True)
    rebound = [
        vars(module)
        for name, module in list(sys.modules.items())
        if name.startswith("explainers.methods") and vars(module).get("score_gradients") is original
    ]
    try:
        for namespace in rebound:
            namespace["score_gradients"] = score_gradients
        yield
    finally:
        for namespace in rebound:
            namespace["score_gradients"] = original
        hook.remove()


def run_point(spec: PointSpec, model_dir: Path) -> JsonDict:
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
    record = LoopRecord()
    finished = True
    method_seconds = None
    started, cpu_started = time.perf_counter(), time.process_time()
    with observed_loops(loaded, record, spec.max_items, spec.first_target):
        try:
            explanation = explain(loaded, None, prompt_ids, output_ids, [(spec.method, spec.params)], None)
            method_seconds = explanation.results[0].seconds
        except StopMeasurement:
            finished = False
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return {
        "finished": finished,
        "seconds": elapsed,
        "cpu_seconds": cpu,
        "method_seconds": method_seconds,
        "item_shapes": record.shapes,
        "item_seconds": [b - a for a, b in itertools.pairwise(record.stamps)],
        "rss_after_load_bytes": rss_loaded,
        "peak_rss_bytes": maxrss_bytes(),
        "matmul_gflops_same_threads": peak,
        "tokens": spec.prompt + spec.generated,
    }


# ----------------------------------------------------------------------------------------------- identity (child)


@dataclass(frozen=True)
class IdentitySpec:
    threads: int
    prompt: int
    generated: int
    cases: list[tuple[str, dict[str, Any], dict[str, Any]]]  # (method, unchunked params, chunked params)
    seed: int = 0


def run_identity(spec: IdentitySpec, model_dir: Path) -> JsonDict:
    """Each case's attribution matrix unchunked and chunked, compared, with the chunks each call ran. A case whose
    float32 results differ by more than IDENTITY_TOLERANCE is run again with the model in float64, which tells
    float32 rounding (gone in float64) from a difference chunking makes (still there)."""
    import numpy as np
    import torch

    from explainers.engine import explain
    from explainers.methods import gradients
    from explainers.model import LoadedModel, load_model

    torch.set_num_threads(spec.threads)
    models = {torch.float32: load_model(model_dir)}
    prompt_ids, output_ids = forced_ids(models[torch.float32].vocab_size, spec.prompt, spec.generated, spec.seed)

    def attributions(loaded: LoadedModel, method: str, params: dict[str, Any], whole: bool) -> tuple[Any, int]:
        """The attribution matrix (as sent: float32) and how many chunks the call ran; whole: every group of
        targets in one chunk (a chunk otherwise closes at CHUNK_ROWS rows, so 16 targets of a 64-token prompt
        would run as 4 chunks even with target_batch_size 16)."""
        record = LoopRecord()
        rows_per_chunk = sys.maxsize if whole else gradients.CHUNK_ROWS
        with observed_loops(loaded, record, None, 0), mock.patch.object(gradients, "CHUNK_ROWS", rows_per_chunk):
            result = explain(loaded, None, prompt_ids, output_ids, [(method, params)], None).results[0]
        packed = result.attributions
        return np.array(packed.float_values, dtype=np.float32).reshape(tuple(packed.shape)), len(record.shapes)

    def pair(loaded: LoadedModel, method: str, unchunked: dict[str, Any], chunked: dict[str, Any]) -> list[Any]:
        return [attributions(loaded, method, unchunked, whole=True), attributions(loaded, method, chunked, whole=False)]

    rows = []
    for method, unchunked, chunked in spec.cases:
        (reference, reference_chunks), (candidate, candidate_chunks) = pair(
            models[torch.float32], method, unchunked, chunked
        )
        scale = float(np.abs(reference).max())
        row: JsonDict = {
            "method": method,
            "generated": spec.generated,
            "unchunked_params": unchunked,
            "chunked_params": chunked,
            "unchunked_chunks": reference_chunks,
            "chunked_chunks": candidate_chunks,
            "identical": bool(np.array_equal(reference, candidate)),
            "max_abs_diff": float(np.abs(reference - candidate).max()),
            "max_abs_value": scale,
            "float64_relative_diff": None,
            "float32_relative_error": None,
        }
        if row["max_abs_diff"] > IDENTITY_TOLERANCE * scale:
            if torch.float64 not in models:
                models[torch.float64] = load_model(model_dir, dtype=torch.float64)
            (reference64, _), (candidate64, _) = pair(models[torch.float64], method, unchunked, chunked)
            scale64 = float(np.abs(reference64).max())
            row["float64_relative_diff"] = float(np.abs(reference64 - candidate64).max()) / scale64
            row["float32_relative_error"] = float(np.abs(reference - reference64).max()) / scale64
        rows.append(row)
    return {"rows": rows, "peak_rss_bytes": maxrss_bytes()}


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
        cold, warm, warm_states_only, lookup = [], [], [], []
        identical: list[bool] = []
        key = HiddenStateCache.key("bench", loaded.weights_digest, [*prompt_ids, *output_ids])
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
            # A hit on the states alone: what a request that nothing was read out for yet (another k, other tokens)
            # costs. Every derived entry (the readouts) goes; the float32 last layer stays, as it is part of the
            # states' entry.
            derived = [name for name in client.scan_iter(match=f"{key}:*") if name != f"{key}:last".encode()]
            if derived:
                client.delete(*derived)
            started = time.perf_counter()
            explain(loaded, cache, prompt_ids, output_ids, methods, None)
            warm_states_only.append(time.perf_counter() - started)
        entry = client.get(key)
        rows.append(
            {
                "method": method,
                "params": params,
                "prompt": spec.prompt,
                "generated": generated,
                "cold_s": cold,
                "warm_s": warm,
                "warm_states_only_s": warm_states_only,
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
    """Run this file with --child in a fresh process; kill it past timeout_s or rss_limit_bytes.

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
    if request["kind"] == "identity":
        return run_identity(IdentitySpec(**raw), model_dir)
    return run_cache(CacheSpec(**raw), model_dir)


def child_main(spec_path: Path, out_path: Path) -> None:
    out_path.write_text(json.dumps(run_request(json.loads(spec_path.read_text()))))


if __name__ == "__main__":
    if sys.argv[1:2] != ["--child"] or len(sys.argv) != 4:
        sys.exit(f"usage: {sys.argv[0]} --child SPEC_JSON OUT_JSON (run by run_child)")
    child_main(Path(sys.argv[2]), Path(sys.argv[3]))
