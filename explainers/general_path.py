"""The general path: every pass the methods need, run through the Hugging Face module itself, differentiated by
autograd. Correct for any causal LM transformers loads, whatever its layers compute (biases, q/k norms, soft-caps,
sliding windows, LayerNorm, learned positions): the module is the model, so nothing here restates it.

The residual stream at layer l is decoder layer l's input (l = 0: what the embedding step hands the first layer)
or, at the last layer, the final norm's input. A pass "from layer l" runs the module with forward hooks that put
the given states in place of that input; the layers below run on placeholder token ids and their output is
dropped, which costs time but never changes the result (only the positions' count reaches the layers above).

Functions take the module and the submodules the architecture registry names, not explainers.model's LoadedModel,
which calls them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from explainers.targets import Targets

# Attention with materialised probabilities (`output_attentions`), switched to for the attention methods: SDPA
# never forms them.
EAGER = "eager"


class _Stopped(Exception):
    """Raised by a hook to end a forward pass once it has what it came for."""


def _with_hidden(args: tuple[Any, ...], kwargs: dict[str, Any], states: torch.Tensor) -> tuple[Any, Any]:
    """A module call's (args, kwargs) with its hidden-states argument (first positional, or by name) replaced."""
    if args:
        return (states, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": states}


def _hidden_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    hidden: torch.Tensor = args[0] if args else kwargs["hidden_states"]
    return hidden


def _output_of(output: Any) -> torch.Tensor:
    """A decoder layer's output states: the tensor itself, or the first element of the tuple older layers return."""
    hidden: torch.Tensor = output[0] if isinstance(output, tuple) else output
    return hidden


@contextmanager
def _states_at(
    decoder_layers: nn.ModuleList, final_norm: nn.Module, layer: int, states: torch.Tensor
) -> Iterator[None]:
    """While active, a forward pass of the module runs from `states` [batch, num_tokens, hidden] at `layer`."""
    module = decoder_layers[layer] if layer < len(decoder_layers) else final_norm

    def substitute(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        return _with_hidden(args, kwargs, states)

    handle = module.register_forward_pre_hook(substitute, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _input_to(module: nn.Module, run: Callable[[], object]) -> torch.Tensor:
    """The hidden states `module` is called with while `run()` runs the model, which stops there."""
    captured: list[torch.Tensor] = []

    def capture(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append(_hidden_of(args, kwargs))
        raise _Stopped

    # A pre-hook registered last runs last: after any that substitutes the module's input.
    handle = module.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        run()
    except _Stopped:
        pass
    finally:
        handle.remove()
    return captured[0]


def _placeholder_ids(states: torch.Tensor) -> torch.Tensor:
    """Token ids [batch, num_tokens] for the module's embedding step, whose output the states replace."""
    return torch.zeros(states.shape[:2], dtype=torch.long, device=states.device)


def layer_scores(
    model: PreTrainedModel,
    decoder_layers: nn.ModuleList,
    final_norm: nn.Module,
    states: torch.Tensor,
    layer: int,
    targets: Targets,
) -> torch.Tensor:
    """targets.score [batch, num_targets] from residual-stream states [batch, num_tokens, hidden] at `layer`, through
    the module's own layers, final norm, unembedding and logit soft-cap; differentiable when grad mode is on."""
    with _states_at(decoder_layers, final_norm, layer, states):
        logits = model(
            input_ids=_placeholder_ids(states), logits_to_keep=targets.predicting_positions, use_cache=False
        ).logits
    scores: torch.Tensor = targets.score_logits(logits)
    return scores


def final_residual(
    model: PreTrainedModel, decoder_layers: nn.ModuleList, final_norm: nn.Module, states: torch.Tensor, layer: int
) -> torch.Tensor:
    """The last decoder layer's output [batch, num_tokens, hidden] from states at `layer`: the final norm's input."""
    with _states_at(decoder_layers, final_norm, layer, states):
        # Captured after the substitution, so that at the last layer it sees the substituted states.
        return _input_to(final_norm, lambda: model.base_model(input_ids=_placeholder_ids(states), use_cache=False))


def decoder_input(model: PreTrainedModel, decoder_layers: nn.ModuleList, token_ids: torch.Tensor) -> torch.Tensor:
    """The first decoder layer's input [1, num_tokens, hidden] for token ids [num_tokens]; nothing above it runs."""

    def run() -> None:
        with torch.no_grad():
            model.base_model(input_ids=token_ids[None], use_cache=False)

    return _input_to(decoder_layers[0], run)


def hidden_states(model: PreTrainedModel, decoder_layers: nn.ModuleList, token_ids: torch.Tensor) -> torch.Tensor:
    """The residual stream [num_layers + 1, num_tokens, hidden] of one no-grad pass over token ids [num_tokens]:
    the first layer's input, then every layer's output (transformers' `output_hidden_states` ends with the state
    after the final norm instead)."""
    stream: list[torch.Tensor] = []

    def capture_input(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        stream.append(_hidden_of(args, kwargs)[0])

    def capture_output(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        stream.append(_output_of(output)[0])

    handles = [decoder_layers[0].register_forward_pre_hook(capture_input, with_kwargs=True)]
    handles += [block.register_forward_hook(capture_output, with_kwargs=True) for block in decoder_layers]
    try:
        with torch.no_grad():
            model.base_model(input_ids=token_ids[None], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(stream)


def score_gradients(
    model: PreTrainedModel,
    decoder_layers: nn.ModuleList,
    final_norm: nn.Module,
    states: torch.Tensor,
    layer: int,
    targets: Targets,
    target_batch_size: int,
    point_weights: torch.Tensor,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """explainers.methods.gradients.score_gradients on the general path: one forward pass with autograd's graph
    over states [points, num_tokens, hidden] (up to the last target's position, as nothing after it is read),
    then a batched vector-Jacobian product (`is_grads_batched`) per target_batch_size targets. Yields (chunk,
    gradients [len(chunk), points, prefix, hidden]) with prefix the chunk's last target position."""
    inputs = states[:, : int(targets.positions[-1])].detach().requires_grad_(True)
    with torch.enable_grad():
        weighted = layer_scores(model, decoder_layers, final_norm, inputs, layer, targets) * point_weights[:, None]
    num_points = inputs.shape[0]
    for start in range(0, len(targets), target_batch_size):
        chunk = slice(start, min(start + target_batch_size, len(targets)))
        size = chunk.stop - chunk.start
        # Row k selects target chunk.start + k of every point: the k-th vector-Jacobian product's cotangent.
        cotangents = weighted.new_zeros(size, num_points, len(targets))
        cotangents[torch.arange(size), :, torch.arange(chunk.start, chunk.stop)] = 1
        last = chunk.stop == len(targets)
        (gradients,) = torch.autograd.grad(weighted, inputs, cotangents, retain_graph=not last, is_grads_batched=True)
        yield chunk, gradients[:, :, : int(targets.positions[chunk.stop - 1])]


@contextmanager
def _eager_attention(model: PreTrainedModel) -> Iterator[None]:
    """The model switched to eager attention for the block, so that it returns its attention probabilities."""
    previous: str = model.config._attn_implementation
    if previous == EAGER:
        yield
        return
    model.set_attn_implementation(EAGER)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def attention_probabilities(
    model: PreTrainedModel, decoder_layers: nn.ModuleList, layer_inputs: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Every decoder layer's attention probabilities [heads, num_tokens, num_tokens], as the module's own
    `output_attentions` gives them, each layer run on its own input from layer_inputs [num_layers, num_tokens,
    hidden] (the cached residual stream but its last layer), as the fast path recomputes them: a layer's
    attention then depends on its cached input only, not on the rounding of the states below it."""

    def substitute(index: int) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], tuple[Any, Any]]:
        def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
            return _with_hidden(args, kwargs, layer_inputs[index][None])

        return hook

    handles = [
        block.register_forward_pre_hook(substitute(index), with_kwargs=True)
        for index, block in enumerate(decoder_layers)
    ]
    try:
        with torch.no_grad(), _eager_attention(model):
            outputs = model.base_model(
                input_ids=_placeholder_ids(layer_inputs[:1]), output_attentions=True, use_cache=False
            )
    finally:
        for handle in handles:
            handle.remove()
    return tuple(attention[0] for attention in outputs.attentions)


def layer_outputs(
    model: PreTrainedModel, decoder_layers: nn.ModuleList, layer_inputs: torch.Tensor, batch: int
) -> torch.Tensor:
    """Every decoder layer's output [num_layers, batch, num_tokens, hidden], each layer run on its own input from
    layer_inputs [num_layers, num_tokens, hidden] repeated `batch` times, in one no-grad pass: what a layer changes
    (through hooks the caller holds on its submodules, per batch row) reaches its own output and nothing above it."""
    outputs: list[torch.Tensor] = []

    def substitute(index: int) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], tuple[Any, Any]]:
        def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
            return _with_hidden(args, kwargs, layer_inputs[index][None].expand(batch, -1, -1))

        return hook

    def capture(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        outputs.append(_output_of(output))

    handles = [
        block.register_forward_pre_hook(substitute(i), with_kwargs=True) for i, block in enumerate(decoder_layers)
    ]
    handles += [block.register_forward_hook(capture, with_kwargs=True) for block in decoder_layers]
    placeholder = torch.zeros(batch, layer_inputs.shape[1], dtype=torch.long, device=layer_inputs.device)
    try:
        with torch.no_grad():
            model.base_model(input_ids=placeholder, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(outputs)


def residual_stream_from(
    model: PreTrainedModel, decoder_layers: nn.ModuleList, final_norm: nn.Module, states: torch.Tensor
) -> torch.Tensor:
    """The residual stream [num_layers + 1, batch, num_tokens, hidden] of one no-grad pass from first-layer inputs
    states [batch, num_tokens, hidden]: the states, then every decoder layer's output."""
    stream = [states]

    def capture(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        stream.append(_output_of(output))

    handles = [block.register_forward_hook(capture, with_kwargs=True) for block in decoder_layers]
    try:
        with torch.no_grad(), _states_at(decoder_layers, final_norm, 0, states):
            model.base_model(input_ids=_placeholder_ids(states), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(stream)
