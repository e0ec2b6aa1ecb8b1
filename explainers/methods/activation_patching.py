"""Activation patching, as causal tracing (Meng et al. 2022): corrupt some source tokens, then put back one clean
residual-stream state (one layer at one position) at a time and see how much of each generated token's score comes
back.

The clean run is the cached residual stream. The corrupted run adds Gaussian noise to the first-layer states of
the corrupted positions (the paper's corruption: noise_scale times the standard deviation of the sequence's
first-layer states, `samples` draws averaged), or replaces their tokens with replacement_token_id (a counterfactual
prompt of the same length). Restoring position j at layer l runs the layers above l from the corrupted run's
states at l with row j taken from the clean run, a batch of positions per pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sightline.v1 import types_pb2

from explainers import general_path, progress
from explainers.architectures import ExplainPath
from explainers.backprop import KeysValues, layer_keys_values, run_layers
from explainers.methods.base import (
    AttributionContext,
    AttributionMethod,
    CostModel,
    InvalidParamsError,
    ParamSpec,
    prefix_only,
    tensor_proto,
)
from explainers.methods.perturbation import PASS_OVERHEAD_POSITIONS, read_out_scores
from explainers.model import LoadedModel, forward_from_layer, forward_with_hidden_states
from explainers.targets import Targets

# Rows x positions computed in one pass through the layers above the restored one.
MAX_PASS_ROWS = 4096
# The catalogue's bound on a position: beyond any context window, so that the gateway refuses absurd numbers;
# attribute() then holds a range to the sequence's own length, which it names.
MAX_POSITION = 1 << 20


@dataclass(frozen=True)
class ActivationPatchingParams:
    corruption: str
    corrupt_start: int
    corrupt_stop: int
    noise_scale: float
    replacement_token_id: int
    samples: int
    seed: int


ACTIVATION_PATCHING_PARAMS = (
    ParamSpec(
        "corruption",
        str,
        "noise",
        "How the corrupted run differs from the clean one: Gaussian noise on the first-layer states of the "
        "corrupted positions (the paper's), or their tokens replaced by replacement_token_id (a counterfactual "
        "prompt of the same length).",
        choices=("noise", "token"),
    ),
    ParamSpec("corrupt_start", int, 0, "The first corrupted position.", minimum=0, maximum=MAX_POSITION),
    ParamSpec(
        "corrupt_stop",
        int,
        0,
        "The position after the last corrupted one; 0 means the end of the prompt.",
        minimum=0,
        maximum=MAX_POSITION,
    ),
    ParamSpec(
        "noise_scale",
        float,
        3.0,
        "The noise's standard deviation, in standard deviations of the sequence's first-layer states (3, as the "
        "paper takes).",
        minimum=0.0,
        maximum=100.0,
    ),
    ParamSpec(
        "replacement_token_id",
        int,
        0,
        "With corruption 'token': the token put at every corrupted position.",
        minimum=0,
        maximum_from="last_token_id",
    ),
    ParamSpec("samples", int, 4, "Noise draws averaged (with corruption 'noise').", minimum=1, maximum=64),
    ParamSpec("seed", int, 0, "Seeds the noise: the same seed gives the same result.", minimum=0, maximum=2**31 - 1),
)


def corrupted_range(params: ActivationPatchingParams, prompt_length: int, num_tokens: int) -> range:
    """The corrupted positions, or InvalidParamsError saying why the request's range is none."""
    stop = params.corrupt_stop or prompt_length
    if not params.corrupt_start < stop <= num_tokens:
        raise InvalidParamsError(
            f"method 'activation_patching' needs corrupt_start < corrupt_stop <= {num_tokens} (the sequence's "
            f"length; corrupt_stop 0 is the prompt's end, {prompt_length}), got {params.corrupt_start}..{stop}"
        )
    return range(params.corrupt_start, stop)


def residual_stream(loaded: LoadedModel, first_layer_states: torch.Tensor) -> torch.Tensor:
    """[num_layers + 1, batch, num_tokens, hidden] of a no-grad pass from first-layer states [batch, num_tokens,
    hidden], on either path."""
    if loaded.path is ExplainPath.GENERAL:
        return general_path.residual_stream_from(
            loaded.model, loaded.decoder_layers, loaded.final_norm, first_layer_states
        )
    stream, _ = run_layers(loaded, first_layer_states, 0, record=False)
    return torch.stack(stream)


def corrupted_streams(ctx: AttributionContext, params: ActivationPatchingParams, corrupted: range) -> torch.Tensor:
    """The corrupted runs' residual streams [num_layers + 1, runs, num_tokens, hidden]: one run per noise draw, or
    the one counterfactual run."""
    if params.corruption == "token":
        token_ids = ctx.token_ids.clone()
        token_ids[corrupted.start : corrupted.stop] = params.replacement_token_id
        return forward_with_hidden_states(ctx.loaded, token_ids).hidden_states[:, None]
    clean = ctx.hidden_states[0]
    generator = torch.Generator().manual_seed(params.seed)
    noise = torch.randn((params.samples, len(corrupted), clean.shape[-1]), generator=generator, dtype=torch.float64)
    first_layer = clean[None].repeat(params.samples, 1, 1)
    scale = params.noise_scale * clean.double().std()
    first_layer[:, corrupted.start : corrupted.stop] += (scale * noise).to(clean.dtype)
    return residual_stream(ctx.loaded, first_layer)


def restored_scores(
    loaded: LoadedModel,
    clean: torch.Tensor,
    corrupted: torch.Tensor,
    corrupted_past: list[KeysValues] | None,
    corrupted_scores: torch.Tensor,
    layer: int,
    targets: Targets,
) -> torch.Tensor:
    """Scores [runs, positions, num_targets] with the state at `layer` of each position restored in turn: from
    the corrupted runs' states there [runs, num_tokens, hidden] with row j replaced by the clean run's.

    Restoring position j changes nothing before it, so on the fast path (corrupted_past: the corrupted runs' keys
    and values at every layer) a pass over restored positions j0..j1 - 1 runs positions j0.. only, on the corrupted
    runs' keys and values before j0, every run's rows together; a target predicted before j0 keeps its corrupted
    score (corrupted_scores [runs, num_targets]). The general path runs every pass over the whole sequence."""
    if corrupted_past is None:
        return _restored_scores_whole(loaded, clean, corrupted, layer, targets)
    runs, num_tokens, _ = corrupted.shape
    positions = int(targets.positions[-1])  # nothing from the last target's position on reaches a score
    scores = corrupted_scores[:, None].repeat(1, positions, 1)
    with torch.no_grad():
        for start, stop in restored_chunks(positions, num_tokens, runs):
            count = stop - start
            # Row r * count + i restores position start + i of run r.
            states = corrupted[:, start:].repeat_interleave(count, dim=0)
            offsets = torch.arange(count).repeat(runs)
            states[torch.arange(len(states)), offsets] = clean[start + offsets]
            past = None
            if start:
                past = [
                    (
                        keys[:, :, :start].repeat_interleave(count, dim=0),
                        values[:, :, :start].repeat_interleave(count, dim=0),
                    )
                    for keys, values in corrupted_past[layer:]
                ]
            final = run_layers(loaded, states, layer, record=False, past=past)[0][-1]
            later = int(torch.searchsorted(targets.predicting_positions, start))
            read_out = read_out_scores(loaded, loaded.final_norm(final), targets[later:], start)
            scores[:, start:stop, later:] = read_out.view(runs, count, -1)
    return scores


def _restored_scores_whole(
    loaded: LoadedModel, clean: torch.Tensor, corrupted: torch.Tensor, layer: int, targets: Targets
) -> torch.Tensor:
    """restored_scores on the general path: one run at a time, MAX_PASS_ROWS // num_tokens restored positions to a
    pass over the whole sequence."""
    runs, num_tokens, _ = corrupted.shape
    positions = int(targets.positions[-1])
    per_pass = max(1, MAX_PASS_ROWS // num_tokens)
    scores = corrupted.new_zeros(runs, positions, len(targets))
    with torch.no_grad():
        for run in range(runs):
            for start in range(0, positions, per_pass):
                restored = torch.arange(start, min(start + per_pass, positions))
                states = corrupted[run][None].repeat(len(restored), 1, 1)
                states[torch.arange(len(restored)), restored] = clean[restored]
                scores[run, restored] = forward_from_layer(loaded, states, layer, targets)
    return scores


def restored_chunks(positions: int, num_tokens: int, runs: int) -> list[tuple[int, int]]:
    """The restored positions 0..positions - 1 cut into fast-path passes [start, stop), each running every run's
    rows from its start on: where the positions computed plus PASS_OVERHEAD_POSITIONS per pass are fewest, each pass
    at most MAX_PASS_ROWS rows x positions computed (at least one restored position)."""
    # cost[j], cut[j]: the cheapest passes over restored positions [0, j), and where the last of them starts.
    cost, cut = [0] * (positions + 1), [0] * (positions + 1)
    for j in range(1, positions + 1):
        options = []
        for i in range(j - 1, -1, -1):
            computed = runs * (j - i) * (num_tokens - i)
            if computed > MAX_PASS_ROWS and i < j - 1:
                break
            options.append((cost[i] + PASS_OVERHEAD_POSITIONS + computed, i))
        cost[j], cut[j] = min(options)
    chunks = []
    j = positions
    while j > 0:
        chunks.append((cut[j], j))
        j = cut[j]
    return chunks[::-1]


class ActivationPatching(AttributionMethod[ActivationPatchingParams]):
    """attribution[i, j] = the most of target i's score that restoring position j's clean state at any one layer
    brings back: max over l of score_i(corrupted, state (l, j) restored) - score_i(corrupted), averaged over noise
    draws. Extras: recovered [num_layers + 1, num_targets, num_tokens - 1] (every layer's map, indexed like
    logit_lens: 0 is the first layer's input), clean_scores and corrupted_scores [num_targets]."""

    name = "activation_patching"
    description = (
        "Activation patching as causal tracing (Meng et al. 2022): corrupt source tokens (noise on their embeddings, "
        "or a replacement token), restore one clean residual-stream state (layer x position) at a time, and report "
        "how much of each generated token's score comes back; the attribution is the most any one layer's state at "
        "a position recovers. Extras: recovered [num_layers + 1, num_targets, num_tokens - 1], clean_scores, "
        "corrupted_scores [num_targets]."
    )
    params = ACTIVATION_PATCHING_PARAMS
    params_type = ActivationPatchingParams
    needs_gradients = False
    uses_cache = True
    attributes_tokens = True
    # Every position restored at every layer, the layers above it run from that position on: about num_layers / 4
    # passes per token on the fast path (SmolLM2's 30 layers: 9 with the passes' overhead; the general path runs
    # whole sequences, about twice that).
    cost = CostModel(passes=1, per_token=9, scaled_by="samples")

    def attribute(self, ctx: AttributionContext, params: ActivationPatchingParams) -> types_pb2.MethodResult:
        corrupted = corrupted_range(params, ctx.prompt_length, len(ctx.token_ids))
        streams = corrupted_streams(ctx, params, corrupted)
        clean_states = ctx.hidden_states
        layers = range(ctx.loaded.num_layers + 1)
        with torch.no_grad():
            clean_scores = forward_from_layer(ctx.loaded, clean_states[0][None], 0, ctx.targets)[0]
            corrupted_scores = forward_from_layer(ctx.loaded, streams[0], 0, ctx.targets)  # [runs, num_targets]
        # The fast path resumes each pass from the corrupted runs' keys and values (restored_scores).
        corrupted_past = layer_keys_values(ctx.loaded, streams) if ctx.loaded.path is ExplainPath.FAST else None
        recovered = clean_states.new_zeros(len(layers), len(ctx.targets), len(ctx.token_ids))
        with progress.steps(len(layers)):
            for layer in layers:
                scores = restored_scores(
                    ctx.loaded,
                    clean_states[layer],
                    streams[layer],
                    corrupted_past,
                    corrupted_scores,
                    layer,
                    ctx.targets,
                )
                gain = (scores - corrupted_scores[:, None]).mean(dim=0)  # [positions, num_targets]
                recovered[layer, :, : gain.shape[0]] = gain.T
                progress.step()
        per_layer = torch.stack([prefix_only(layer_map, ctx.targets) for layer_map in recovered])
        return types_pb2.MethodResult(
            method=self.name,
            attributions=tensor_proto(per_layer.max(dim=0).values),
            extras={
                "recovered": tensor_proto(per_layer),
                "clean_scores": tensor_proto(clean_scores),
                "corrupted_scores": tensor_proto(corrupted_scores.mean(dim=0)),
            },
        )
