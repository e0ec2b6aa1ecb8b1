"""What the perturbation methods share: the replacement token, their parameters, and batched scoring of perturbed
token-id sequences.

A perturbation method never re-tokenises text: it "removes" a token by putting a replacement token id at its
position, so every sequence it scores has exactly the served token ids except at the positions it chose.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import TypeVar

import torch
from sightline.v1 import types_pb2
from transformers import DynamicCache

from explainers import progress
from explainers.architectures import attends_fully
from explainers.methods.base import (
    AttributionContext,
    AttributionMethod,
    InvalidParamsError,
    ParamSpec,
    prefix_only,
    tensor_proto,
)
from explainers.model import READOUT_ROWS, LoadedModel, logits_from_normed
from explainers.targets import Targets

# A forward pass's cost beyond its positions, in positions: reading the weights once (SmolLM2-135M on a CPU core:
# about 250 ms per pass and 8 ms per position). Only decides how passes are batched, never what they score.
PASS_OVERHEAD_POSITIONS = 32


@dataclass(frozen=True)
class PerturbationParams:
    replacement: str
    replacement_token_id: int
    batch_size: int


PerturbationParamsT = TypeVar("PerturbationParamsT", bound=PerturbationParams)

PERTURBATION_PARAMS = (
    ParamSpec(
        "replacement",
        str,
        "pad",
        "The token id a removed token is replaced by: the tokenizer's pad, unk or bos token, or "
        "replacement_token_id ('token').",
        choices=("pad", "unk", "bos", "token"),
    ),
    ParamSpec(
        "replacement_token_id",
        int,
        0,
        "The replacement token id when replacement is 'token'; ignored otherwise.",
        minimum=0,
        maximum_from="last_token_id",
    ),
    ParamSpec(
        "batch_size",
        int,
        16,
        "Perturbed sequences scored together in one forward pass; trades memory for speed and never changes the "
        "result.",
        minimum=1,
        maximum=1024,
    ),
)


def replacement_token_id(loaded: LoadedModel, params: PerturbationParams) -> int:
    """The token id that stands in for a removed token, as params choose it."""
    if params.replacement == "token":
        if params.replacement_token_id >= loaded.vocab_size:
            raise InvalidParamsError(
                f"replacement_token_id must be in [0, {loaded.vocab_size}) for model {loaded.model_name!r}, "
                f"got {params.replacement_token_id}"
            )
        return params.replacement_token_id
    tokenizer = loaded.tokenizer
    special_ids = {"pad": tokenizer.pad_token_id, "unk": tokenizer.unk_token_id, "bos": tokenizer.bos_token_id}
    token_id = special_ids[params.replacement]
    if token_id is None:
        present = ", ".join(
            f"{name} (id {special_id})" for name, special_id in special_ids.items() if special_id is not None
        )
        raise InvalidParamsError(
            f"replacement {params.replacement!r} needs the tokenizer's {params.replacement} token, but model "
            f"{loaded.model_name!r} has none (it has: {present or 'no pad, unk or bos token'}); choose another "
            "replacement, or 'token' with replacement_token_id"
        )
    return int(token_id)


def num_sources(targets: Targets) -> int:
    """How many leading tokens precede some target: positions 0 .. last target's position - 1. Only these are
    worth perturbing, and only these need to go through the model."""
    return int(targets.positions[-1])  # positions ascend


def replaced_scores(
    ctx: AttributionContext, replaced: torch.Tensor, replacement_id: int, batch_size: int
) -> torch.Tensor:
    """targets.score for every target [num_perturbations, num_targets] of each perturbed sequence.

    replaced [num_perturbations, num_sources] marks, per perturbation, the leading positions that get
    replacement_id. One teacher-forced pass scores every target of a perturbed sequence at once: target i only sees
    its own prefix, so the tokens at and after its position cannot change its score. The same causality means
    nothing before a perturbation's first replaced position changes: its keys and values are the unperturbed
    sequence's, computed once, and a perturbed pass runs only from there on. Perturbations are batched in the order
    of their first replaced position, so each batch starts where its earliest member does.
    """
    loaded, targets = ctx.loaded, ctx.targets
    num_sources = replaced.shape[1]
    sequence = ctx.token_ids[:num_sources]
    with torch.no_grad():
        unperturbed = loaded.model.base_model(input_ids=sequence[None], use_cache=True)
        scores = _read_out_scores(loaded, unperturbed.last_hidden_state, targets, 0).expand(len(replaced), -1).clone()
        layer_states = [(layer.keys, layer.values) for layer in unperturbed.past_key_values.layers]
        first_replaced = torch.where(replaced.any(dim=1), replaced.to(torch.int8).argmax(dim=1), num_sources)
        order = torch.argsort(first_replaced, stable=True)
        perturbed_order = order[first_replaced[order] < num_sources]
        reuse_keys = _keeps_every_key(loaded, num_sources)
        batches = torch.split(perturbed_order, batch_size)
        with progress.steps(len(batches)):
            for batch in batches:
                # Without every position's keys (a sliding-window layer keeps only its window), the pass runs whole.
                start = int(first_replaced[batch[0]]) if reuse_keys else 0
                # Targets predicted before `start` keep their unperturbed scores; positions ascend.
                first_target = int(torch.searchsorted(targets.predicting_positions, start))
                rescored = targets[first_target:]
                past = DynamicCache(
                    [
                        (
                            keys[:, :, :start].expand(len(batch), -1, -1, -1),
                            values[:, :, :start].expand(len(batch), -1, -1, -1),
                        )
                        for keys, values in layer_states
                    ]
                )
                perturbed = torch.where(replaced[batch, start:], replacement_id, sequence[start:])
                normed = loaded.model.base_model(input_ids=perturbed, past_key_values=past).last_hidden_state
                scores[batch, first_target:] = _read_out_scores(loaded, normed, rescored, start)
                progress.step()
    return scores


def _keeps_every_key(loaded: LoadedModel, num_tokens: int) -> bool:
    """Whether the model's own KV cache of num_tokens positions holds every position's keys and values: not when a
    sliding-window layer's window is shorter (its cache then keeps the last window only)."""
    config = loaded.model.config
    window = getattr(config, "sliding_window", None)
    return attends_fully(config) or not isinstance(window, int) or window >= num_tokens


@dataclass(frozen=True)
class ReferenceStates:
    """The keys and values of every layer for whole reference sequences [num_references, num_tokens]: a sequence
    that agrees with reference r on its first `start` tokens continues from r's first `start` keys and values."""

    token_ids: torch.Tensor  # int64 [num_references, num_tokens]
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values) [num_references, heads, tokens, hd]
    # False where the model's cache drops early keys (a sliding window shorter than the sequence): nothing resumes.
    resumable: bool


def reference_states(loaded: LoadedModel, references: torch.Tensor) -> ReferenceStates:
    """One pass over the reference sequences [num_references, num_tokens], keeping every layer's keys and values."""
    with torch.no_grad():
        cached = loaded.model.base_model(input_ids=references, use_cache=True).past_key_values
    return ReferenceStates(
        references,
        [(layer.keys, layer.values) for layer in cached.layers],
        _keeps_every_key(loaded, references.shape[1]),
    )


def resumed_final_states(
    loaded: LoadedModel, states: ReferenceStates, reference_rows: torch.Tensor, token_ids: torch.Tensor, start: int
) -> torch.Tensor:
    """The final norm's output [batch, num_tokens - start, hidden] at positions start.. of the sequences token_ids
    [batch, num_tokens], each of which agrees with its reference (reference_rows [batch]) on its first `start`
    tokens: the pass starts at `start` from those references' keys and values, which causality makes the
    sequences' own. start must be 0 unless states.resumable."""
    if start and not states.resumable:
        raise ValueError("these reference states cannot be resumed from: the model's cache keeps a window only")
    past = DynamicCache(
        [(keys[reference_rows, :, :start], values[reference_rows, :, :start]) for keys, values in states.layers]
    )
    with torch.no_grad():
        output = loaded.model.base_model(input_ids=token_ids[:, start:], past_key_values=past)
    normed: torch.Tensor = output.last_hidden_state
    return normed


def _read_out_scores(loaded: LoadedModel, normed: torch.Tensor, targets: Targets, offset: int) -> torch.Tensor:
    """targets.score [batch, num_targets] from the final norm's output normed [batch, positions, hidden] of
    positions offset.., READOUT_ROWS rows (batch x targets) of vocabulary logits at a time: a batch of long
    perturbed sequences would otherwise hold [batch, num_targets, vocab] logits at once (3 GiB for 16 sequences
    of 1,024 targets of SmolLM2)."""
    per_slice = max(1, READOUT_ROWS // normed.shape[0])
    predicting = normed[:, targets.predicting_positions - offset]  # [batch, num_targets, hidden]
    slices = range(0, len(targets), per_slice)
    return torch.cat(
        [
            targets[s : s + per_slice].score_logits(logits_from_normed(loaded, predicting[:, s : s + per_slice]))
            for s in slices
        ],
        dim=1,
    )


class PerturbationMethod(AttributionMethod[PerturbationParamsT]):
    """A method that explains by scoring perturbed token ids: no gradients, no cache, contrastive for free (the
    contrast is just another score to perturb)."""

    needs_gradients = False
    uses_cache = False
    attributes_tokens = True
    supports_contrastive_targets = True

    @abstractmethod
    def source_attributions(self, ctx: AttributionContext, params: PerturbationParamsT) -> torch.Tensor:
        """Attributions [num_targets, num_sources(ctx.targets)]; column j is token j. Entries at or after a
        target's own position may hold anything: attributions() zeroes them."""

    def attributions(self, ctx: AttributionContext, params: PerturbationParamsT) -> torch.Tensor:
        """The attribution matrix [num_targets, num_tokens - 1] at the score's precision."""
        sources = self.source_attributions(ctx, params)
        # Tokens from the last target's position on precede no target: their columns are 0.
        scores = torch.nn.functional.pad(sources, (0, len(ctx.token_ids) - sources.shape[1]))
        return prefix_only(scores, ctx.targets)

    def attribute(self, ctx: AttributionContext, params: PerturbationParamsT) -> types_pb2.MethodResult:
        return types_pb2.MethodResult(method=self.name, attributions=tensor_proto(self.attributions(ctx, params)))


def reuses_prefix_keys(loaded: LoadedModel, num_tokens: int) -> bool:
    """Whether a pass over num_tokens positions may start from another pass's cached keys and values (see
    _keeps_every_key); for methods that keep caches of their own perturbed sequences."""
    return _keeps_every_key(loaded, num_tokens)


def read_out_scores(loaded: LoadedModel, normed: torch.Tensor, targets: Targets, offset: int) -> torch.Tensor:
    """targets.score [batch, num_targets] from final-norm outputs of positions offset.. (see _read_out_scores)."""
    return _read_out_scores(loaded, normed, targets, offset)
