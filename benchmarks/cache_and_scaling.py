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

FLOPs (`method_flops`: matrix products only, causal attention counted over the pairs it needs) for the embedded
model's shape: P = parameters of one decoder layer, q = heads x head_dim, d = hidden size, V = vocabulary.

- layers forward(n, l, c): l decoder layers over n new positions that attend to c cached ones and causally to each
  other: l * (2 * P * n + 4 * q * (n * c + n**2 / 2)) (QK^T and AV: 2 * q each per query-key pair).
- layers backward(n, l): their gradient to the inputs only, l * (2 * P * n + 8 * q * n**2 / 2): the weights are
  frozen, so one matmul per weight matmul (dX = dY W^T, no dW; with the usual "backward = 2 x forward" the gradient
  methods would show more than 100% of the matmul peak), two per attention matmul (both operands depend on the
  input).
- readout(r): final norm and unembedding of r positions, or their input gradient: 2 * V * d * r.
- engine (no cache): forward(n, L, 0) + readout(targets) for the recorded pass, + readout(targets) for step scores.
- gradient methods (`score_gradients`, from the states at `layer`, l = L - layer): one recording forward pass
  p * forward(m_last, l, 0) over the p path points (1 but for integrated gradients) up to the last target's
  position, then groups of chunks (`plan_chunks`); a chunk of k targets whose last one sits at position m costs
  2 * p * readout(k) for its seeds (the readout and its gradient) and k * p * backward(m, l) for the vector-Jacobian
  products, each over the chunk's whole prefix. Integrated gradients loop over passes of
  p = min(internal_batch_size, MAX_GRAPH_ROWS // n) path points (at least 1), chunks inside each, after a token
  baseline's forward(n, L, 0) + readout(targets), and end with a two-sequence forward from the layer.
- occlusion (`replaced_scores`): one unperturbed forward(s, L, 0) + readout(targets) over the s sources (positions
  before the last target) that keeps its keys and values, then the windows in order of their first replaced
  position, batch_size at a time: a batch of b windows whose first starts at a runs b * forward(s - a, L, a) and
  reads out the targets predicted from position a on.
- attention, attention_rollout, logit_lens: the engine plus their own products (see `method_flops`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from unittest import mock

import bench_util
from bench_util import JsonDict, fmt, markdown_table, verdict

GIB = 1024**3
CACHE_TARGET_RATIO = 5.0
MEMORY_TARGET_GIB = 4.0
# A point too long for --point-budget-s runs its first loop items only, at least one; it is skipped when that one
# alone is predicted to take more than this times the budget.
SKIP_OVER_BUDGET = 10.0
# Chunked and unchunked results agree when max |difference| <= this x max |unchunked value|: in float32, or else in
# float64, where rounding stays far below it (the results are sent as float32: one ulp is 1.2e-7 relative).
IDENTITY_TOLERANCE = 1e-5
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
GRADIENT_METHODS = (
    "input_x_gradient",
    "saliency",
    "integrated_gradients",
    "gradient_x_activation",
    "layer_integrated_gradients",
)


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

    def forward(self, tokens: int, layers: int, cached: int = 0) -> float:
        """FLOPs of `layers` decoder layers over `tokens` new positions of one sequence that attend to `cached`
        earlier positions (their keys and values reused) and causally to each other."""
        pairs = tokens * cached + tokens**2 / 2
        return float(layers * (2 * self.layer_params * tokens + 4 * self.heads * self.head_dim * pairs))

    def backward(self, tokens: int, layers: int) -> float:
        """FLOPs of the gradient of `layers` decoder layers over `tokens` positions to their inputs only (the weights
        are frozen): one matmul per weight matmul (dX = dY W^T, no dW), two per attention matmul."""
        pairs = tokens**2 / 2
        return float(layers * (2 * self.layer_params * tokens + 8 * self.heads * self.head_dim * pairs))

    def seeded_backward(self, tokens: int) -> float:
        """FLOPs of the top decoder layer's gradient for one target, whose cotangent is zero but at one position
        (explainers.backprop.Seeds): every weight product at that position only, except the keys' and values' over
        all `tokens` positions, and that position's attention row."""
        d, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        at_position = 2 * (d * q + q * d + 3 * d * self.intermediate)
        return float(at_position + 4 * d * kv * tokens + 8 * self.heads * self.head_dim * tokens)

    def readout(self, rows: int) -> float:
        """FLOPs of the unembedding of `rows` positions, or of its gradient to its input."""
        return float(2 * self.vocab * self.hidden * rows)


@dataclass(frozen=True)
class LoopItem:
    """One item of a method's loop, with its shape as the subprocess observes it: a gradient chunk (targets, path
    points, prefix) or a perturbation batch (sequences, new rows, cached rows)."""

    flops: float
    shape: tuple[int, ...]
    first_target: int = 0  # a gradient chunk's first target; 0 for a perturbation batch


@dataclass(frozen=True)
class FlopPlan:
    """FLOPs of one explain() call: a fixed part before the loop (the engine's forward pass, the method's own
    forward passes), the loop's items in the order they run, and a tail after the loop."""

    fixed: float
    items: tuple[LoopItem, ...] = ()
    tail: float = 0.0

    @property
    def total(self) -> float:
        return self.fixed + sum(item.flops for item in self.items) + self.tail

    def items_from(self, first_target: int) -> tuple[LoopItem, ...]:
        """The items a call runs when every gradient loop starts at first_target (0: all of them)."""
        return tuple(item for item in self.items if item.first_target >= first_target)

    def done(self, ran: Sequence[LoopItem], finished: bool) -> float:
        """FLOPs of a call that ran the fixed part, then the items `ran`, then the tail if it finished."""
        return self.fixed + sum(item.flops for item in ran) + (self.tail if finished else 0.0)

    def affordable_items(self, flops: float) -> int:
        """The most leading items that fit in `flops` with the fixed part; at least 1."""
        spent = self.fixed
        for count, item in enumerate(self.items):
            spent += item.flops
            if spent > flops:
                return max(1, count)
        return len(self.items)

    def largest_item(self) -> LoopItem:
        """The item with the most FLOPs, the first of equals: for a gradient method the first chunk of the group
        whose backward pass carries the most rows over the longest prefixes, where memory peaks."""
        return max(self.items, key=lambda item: item.flops)


def planned_chunks(
    shape: ModelShape,
    layers: int,
    positions: Sequence[int],
    target_batch_size: int,
    points: int,
    recording_pass: bool = True,
) -> list[LoopItem]:
    """score_gradients' chunks over `points` path points for targets at `positions`, with their FLOPs. A group of
    chunks runs backward together and yields its chunks at its end, so its first chunk carries the whole group's
    FLOPs (and the first group the recording forward pass's, unless the engine's forward pass served as it) and the
    others none: whatever prefix of the chunks a measurement stops after, the FLOPs counted are those that ran."""
    import torch

    # The explainer's own chunking rule, so that this plan cannot drift from what it runs.
    from explainers.methods.gradients import plan_chunks

    chunks = []
    flops = points * shape.forward(positions[-1], layers) if recording_pass else 0.0
    for group in plan_chunks(torch.tensor(positions), target_batch_size, points):
        for chunk in group:
            targets, prefix = chunk.stop - chunk.start, positions[chunk.stop - 1]
            # The seeds' readout and its gradient, then a vector-Jacobian product per target over the prefix, the
            # top layer's at the seed's position.
            backward = shape.backward(prefix, layers - 1) + shape.seeded_backward(prefix) if layers else 0.0
            flops += 2 * points * shape.readout(targets) + targets * points * backward
        for index, chunk in enumerate(group):
            shape_of = (chunk.stop - chunk.start, points, positions[chunk.stop - 1])
            chunks.append(LoopItem(flops if index == 0 else 0.0, shape_of, first_target=chunk.start))
        flops = 0.0
    return chunks


def method_flops(
    shape: ModelShape, method: str, params: dict[str, Any], tokens: int, positions: Sequence[int]
) -> FlopPlan:
    """The FlopPlan of explaining the targets at `positions` (ascending) of a `tokens`-long sequence, without a
    cache (so the engine's recording forward pass is included)."""
    from explainers.methods.registry import get_method

    # The method's own parsing fills in its defaults, so that this plan cannot drift from them.
    params = dataclasses.asdict(get_method(method).parse_params(params))
    targets = len(positions)
    engine = shape.forward(tokens, shape.layers) + 2 * shape.readout(targets)  # + the step scores' readout
    layers = shape.layers - int(params.get("layer", 0))
    if method in ("input_x_gradient", "saliency", "gradient_x_activation"):
        # Saliency and input x gradient run backward from the engine's forward pass, recorded (a cold call).
        recording_pass = method == "gradient_x_activation"
        chunks = planned_chunks(shape, layers, positions, params["target_batch_size"], 1, recording_pass)
        return FlopPlan(engine, tuple(chunks))
    if method in ("integrated_gradients", "layer_integrated_gradients"):
        from explainers.methods.gradients import MAX_GRAPH_ROWS

        steps = int(params["steps"])
        per_pass = max(1, min(int(params["internal_batch_size"]), MAX_GRAPH_ROWS // tokens))
        chunks = [
            chunk
            for start in range(0, steps, per_pass)
            for chunk in planned_chunks(
                shape, layers, positions, params["target_batch_size"], min(per_pass, steps - start)
            )
        ]
        baseline = shape.forward(tokens, shape.layers) + shape.readout(targets)
        if params["baseline"] != "token":
            baseline = 0.0
        # The completeness check: inputs and baselines from the layer up, read out at the targets.
        tail = 2 * (shape.forward(tokens, layers) + shape.readout(targets))
        return FlopPlan(engine + baseline, tuple(chunks), tail)
    if method == "occlusion":
        sources = positions[-1]
        window = int(params["window"])
        batch_size = int(params["batch_size"])
        window_starts = list(range(0, sources, window))
        batches = []
        for first in range(0, len(window_starts), batch_size):
            windows, start = len(window_starts[first : first + batch_size]), window_starts[first]
            scored = sum(1 for position in positions if position - 1 >= start)
            flops = windows * shape.forward(sources - start, shape.layers, start) + shape.readout(windows * scored)
            batches.append(LoopItem(flops, (windows, sources - start, start)))
        unperturbed = shape.forward(sources, shape.layers) + shape.readout(targets)
        return FlopPlan(engine + unperturbed, tuple(batches))
    if method == "attention":
        q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
        per_layer = 2 * shape.hidden * kv * tokens + 2 * shape.hidden * q * targets + 2 * targets * tokens * q
        return FlopPlan(engine + shape.layers * per_layer)
    if method == "attention_rollout":
        q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
        per_layer = (2 * shape.hidden * (q + kv) + 2 * tokens * q + 2 * targets * tokens) * tokens
        return FlopPlan(engine + shape.layers * per_layer)
    if method == "logit_lens":
        return FlopPlan(engine + (shape.layers + 1) * shape.readout(targets))
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
    if request["kind"] == "identity":
        return run_identity(IdentitySpec(**raw), model_dir)
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
    outcome = run_child(
        "point",
        {**asdict(spec), "model_dir": str(settings.model_dir)},
        timeout_s=max(300.0, 4 * predicted_run + 120),
        rss_limit_bytes=settings.rss_limit_bytes,
        threads=settings.threads,
        in_process=settings.smoke and not fresh,
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
        label = f"{method} ({_params_text(params)})"
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
    outcome = run_child(
        "identity",
        {**asdict(identity), "model_dir": str(settings.model_dir)},
        timeout_s=3600,
        rss_limit_bytes=settings.rss_limit_bytes,
        threads=settings.threads,
        in_process=settings.smoke,
    )
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
        outcome = run_child(
            "cache",
            {**asdict(spec), "model_dir": str(settings.model_dir)},
            timeout_s=3600,
            rss_limit_bytes=settings.rss_limit_bytes,
            threads=settings.threads,
            in_process=settings.smoke,
        )
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


# ------------------------------------------------------------------------------------------------------ rendering


def _params_text(params: dict[str, Any]) -> str:
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
                _params_text(r["params"]),
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
                f"{_params_text(r['unchunked_params'])} ({r['unchunked_chunks']} chunk)",
                f"{_params_text(r['chunked_params'])} ({r['chunked_chunks']} chunks)",
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


if __name__ == "__main__":
    main()
