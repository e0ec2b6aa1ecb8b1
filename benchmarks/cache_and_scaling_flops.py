"""The FLOP model of benchmarks/cache_and_scaling.py: what one explain() call costs in matrix-product FLOPs, split
into the loop items (gradient chunks, perturbation batches) its measuring subprocess observes, so that a point cut
short can be extrapolated and checked against the plan.

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

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GRADIENT_METHODS = (
    "input_x_gradient",
    "saliency",
    "integrated_gradients",
    "gradient_x_activation",
    "layer_integrated_gradients",
)


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
