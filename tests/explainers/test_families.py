"""Every supported decoder family, as a tiny random model loaded from a directory like a served one: each method
against an independent computation (plain autograd over transformers' module, Captum, the model's own outputs),
and the general path against the fast path where both apply.

Models are float64 (their norms and eager softmax still round through float32 inside transformers, hence the
tolerances), with two layers, grouped-query attention where the family has it, and sliding-window layers shorter
than the explained sequence for Gemma, so that a window actually cuts attention off.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import redis
import torch
from captum.attr import InputXGradient as CaptumInputXGradient
from sightline.v1 import explanations_pb2, types_pb2
from transformers import BloomConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

from common.jobs import CATALOG_KEY
from explainers.architectures import ExplainPath, UnsupportedArchitectureError
from explainers.engine import explain
from explainers.methods.attention_weights import attention_probabilities
from explainers.methods.base import AttributionContext
from explainers.methods.registry import catalog, get_method
from explainers.model import (
    LoadedModel,
    attention_implementation,
    forward_from_layer,
    forward_with_hidden_states,
    load_model,
)
from explainers.targets import Targets, token_scores
from explainers.worker import ExplainerWorker, WorkerSettings
from tests.explainers.conftest import NUM_LAYERS, OUTPUT_IDS, PROMPT_IDS, VOCAB_SIZE
from tests.model_families import FAMILIES, save_family_model

# The families whose tiny models the hand-written fast path explains; the rest take the general path.
FAST_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
TOKEN_IDS = torch.tensor(PROMPT_IDS + OUTPUT_IDS)
POSITIONS = torch.arange(len(PROMPT_IDS), len(TOKEN_IDS))
TARGETS = Targets(positions=POSITIONS, token_ids=TOKEN_IDS[POSITIONS], foil_ids=None)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to the float32 rounding transformers' norms and eager softmax take inside a float64 model."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """A tiny random model of one family, saved as a model directory and loaded by the explainer in float64."""
    model_dir = save_family_model(request.param, tmp_path_factory.mktemp(request.param))
    return load_model(model_dir, dtype=torch.float64)


def context(loaded: LoadedModel) -> AttributionContext:
    return AttributionContext(
        loaded=loaded,
        token_ids=TOKEN_IDS,
        prompt_length=len(PROMPT_IDS),
        targets=TARGETS,
        hidden_states=forward_with_hidden_states(loaded, TOKEN_IDS).hidden_states,
    )


@dataclasses.dataclass(frozen=True)
class OwnOutputs:
    hidden_states: tuple[torch.Tensor, ...]  # transformers' output_hidden_states: the last after the final norm
    attentions: tuple[torch.Tensor, ...]  # [1, heads, num_tokens, num_tokens] a layer, when asked for
    logits: torch.Tensor  # [1, num_tokens, vocab]


def own_outputs(loaded: LoadedModel, attentions: bool = False) -> OwnOutputs:
    """The module's own forward pass over the explained sequence (switched to eager for its attentions)."""
    with torch.no_grad():
        outputs: CausalLMOutputWithPast = loaded.model(
            input_ids=TOKEN_IDS[None], output_hidden_states=True, output_attentions=attentions
        )
    assert outputs.hidden_states is not None and outputs.logits is not None
    return OwnOutputs(outputs.hidden_states, outputs.attentions or (), outputs.logits)


def attributions(loaded: LoadedModel, method: str, **params: object) -> torch.Tensor:
    explained = get_method(method)
    result = explained.attribute(context(loaded), explained.parse_params(params))
    return torch.from_numpy(
        np.frombuffer(result.attributions.data, dtype="<f4").reshape(tuple(result.attributions.shape)).copy()
    ).double()


def layer_zero_gradients(loaded: LoadedModel) -> tuple[torch.Tensor, torch.Tensor]:
    """(the first decoder layer's input h0 [num_tokens, hidden], d score_i / d h0 [num_targets, num_tokens, hidden])
    by plain autograd, one target at a time, through the module's `inputs_embeds`: h0 minus what the embedding step
    adds to the embeddings (GPT-2's position embeddings; nothing for the others, whose scaling is in the embedding
    module)."""
    h0 = own_outputs(loaded).hidden_states[0][0]
    rows = []
    for index in range(len(TARGETS)):
        state = h0.clone().requires_grad_(True)
        score = scores_of_first_layer_input(loaded, state[None])[0, index]
        rows.append(torch.autograd.grad(score, state)[0])
    return h0, torch.stack(rows)


def scores_of_first_layer_input(loaded: LoadedModel, states: torch.Tensor) -> torch.Tensor:
    """TARGETS' scores [batch, num_targets] of first-layer inputs [batch, num_tokens, hidden], through the module's
    own `inputs_embeds`, from which GPT-2 takes its position embeddings back out first."""
    if loaded.architecture.model_type == "gpt2":
        positions = loaded.model.get_submodule("transformer.wpe")
        assert isinstance(positions, torch.nn.Embedding)
        states = states - positions.weight[: states.shape[1]]
    logits = loaded.model(inputs_embeds=states).logits[:, TARGETS.predicting_positions]
    scores: torch.Tensor = TARGETS.score_logits(logits)
    return scores


def prefix(matrix: torch.Tensor) -> torch.Tensor:
    """[num_targets, num_tokens] -> the [num_targets, num_tokens - 1] attribution layout, zero at and after each
    target's position."""
    sources = torch.arange(matrix.shape[1] - 1)
    return torch.where(sources[None] < POSITIONS[:, None], matrix[:, :-1], 0.0)


def test_each_family_loads_on_its_path_with_the_models_own_hidden_states(family: LoadedModel) -> None:
    expected = ExplainPath.FAST if family.architecture.model_type in FAST_FAMILIES else ExplainPath.GENERAL
    assert family.path is expected
    published = catalog(family)
    assert (published.architecture, published.explain_path) == (family.architecture.model_type, expected.proto)

    own = own_outputs(family).hidden_states
    ours = context(family).hidden_states
    # transformers' last entry is after the final norm; ours is before it, as every layer's.
    close(ours[:-1], torch.cat(own[:-1]))
    close(family.final_norm(ours[-1]), own[-1][0])


def test_gradient_methods_equal_plain_autograd_and_captum(family: LoadedModel) -> None:
    h0, gradients = layer_zero_gradients(family)
    close(attributions(family, "saliency"), prefix(gradients.norm(dim=-1)))
    input_x_gradient = attributions(family, "input_x_gradient")
    close(input_x_gradient, prefix((gradients * h0).sum(dim=-1)))
    # At layer 0, gradient x activation is input x gradient.
    close(attributions(family, "gradient_x_activation", layer=0), input_x_gradient)

    def scores(states: torch.Tensor) -> torch.Tensor:
        return scores_of_first_layer_input(family, states)

    captum = torch.stack(
        [CaptumInputXGradient(scores).attribute(h0[None], target=index)[0].sum(dim=-1) for index in range(len(TARGETS))]
    )
    close(input_x_gradient, prefix(captum))


def test_integrated_gradients_are_complete_and_start_at_any_layer(family: LoadedModel) -> None:
    """The convergence delta is the completeness error against the model's own scores, and it shrinks as the
    quadrature refines (the wide random weights make the path integrand sharp: 64 steps do not make it tiny)."""
    method = get_method("integrated_gradients")
    with torch.no_grad():
        baseline_ids = torch.full_like(TOKEN_IDS, 5)
        change = (
            token_scores(family, TOKEN_IDS[None], TARGETS)[0] - token_scores(family, baseline_ids[None], TARGETS)[0]
        )
    deltas = []
    for steps in (8, 64):
        params = method.parse_params({"steps": steps, "baseline": "token", "baseline_token_id": 5})
        result = method.attribute(context(family), params)
        rows = np.frombuffer(result.attributions.data, dtype="<f4").reshape(tuple(result.attributions.shape))
        delta = torch.from_numpy(np.frombuffer(result.extras["convergence_delta"].data, dtype="<f4").copy()).double()
        torch.testing.assert_close(delta, torch.from_numpy(rows.sum(axis=1)).double() - change, rtol=1e-4, atol=1e-4)
        deltas.append(float(delta.abs().max()))
    assert deltas[1] < deltas[0]

    # From a layer's own states, the module's scores come back (the general path's hooks put them in place).
    own = own_outputs(family).hidden_states
    with torch.no_grad():
        torch.testing.assert_close(
            forward_from_layer(family, own[1], 1, TARGETS)[0], token_scores(family, TOKEN_IDS[None], TARGETS)[0]
        )


def test_perturbation_methods_equal_recomputed_scores(family: LoadedModel) -> None:
    """Occlusion is the recomputed score change (full forward passes, no KV cache reuse), and Shapley sampling is
    efficient: each target's attributions sum to score(sequence) - score(all replaced)."""
    replacement = {"replacement": "token", "replacement_token_id": 7}
    occlusion = attributions(family, "occlusion", **replacement)
    num_sources = int(POSITIONS[-1])
    occluded = TOKEN_IDS.repeat(num_sources, 1)
    occluded[torch.arange(num_sources), torch.arange(num_sources)] = 7
    with torch.no_grad():
        unperturbed = token_scores(family, TOKEN_IDS[None], TARGETS)
        drops = (unperturbed - token_scores(family, occluded, TARGETS)).T  # [num_targets, num_sources]
        all_replaced = TOKEN_IDS.clone()
        all_replaced[:num_sources] = 7
        change = unperturbed[0] - token_scores(family, all_replaced[None], TARGETS)[0]
    expected = torch.nn.functional.pad(drops, (0, len(TOKEN_IDS) - 1 - num_sources))
    torch.testing.assert_close(occlusion, prefix(torch.nn.functional.pad(expected, (0, 1))), rtol=1e-5, atol=1e-5)

    shapley = attributions(family, "shapley_sampling", samples=2, **replacement)
    torch.testing.assert_close(shapley.sum(dim=1), change, rtol=1e-5, atol=1e-5)


def test_attention_and_logit_lens_equal_the_models_own_outputs(family: LoadedModel) -> None:
    family.model.set_attn_implementation("eager")
    try:
        own = own_outputs(family, attentions=True)
    finally:
        family.model.set_attn_implementation(attention_implementation(family.model.config))
    every_position = torch.arange(len(TOKEN_IDS))
    recomputed = attention_probabilities(
        family, context(family).hidden_states, range(1, NUM_LAYERS + 1), every_position
    )
    for layer, probabilities in enumerate(recomputed):
        close(probabilities, own.attentions[layer][0])
    close(
        attributions(family, "attention", layer=2, head=1),
        prefix(own.attentions[1][0, 1][TARGETS.predicting_positions]),
    )

    method = get_method("logit_lens")
    lens = method.attribute(context(family), method.parse_params({"k": 3}))
    target_logprobs = np.frombuffer(lens.extras["target_logprobs"].data, dtype="<f4").reshape(NUM_LAYERS + 1, -1)
    # The last layer's readout is the model's own prediction (final norm, unembedding, soft-cap).
    own_logprobs = torch.log_softmax(own.logits[0, TARGETS.predicting_positions], dim=-1)
    expected = own_logprobs.gather(-1, TARGETS.token_ids[:, None])[:, 0]
    np.testing.assert_allclose(target_logprobs[-1], expected.numpy(), rtol=1e-5, atol=1e-5)


def test_the_general_path_equals_the_fast_path_on_llama(tiny_model: LoadedModel) -> None:
    """On the float64 tiny Llama whose norms stay in float64, the two paths agree to float32 output rounding."""
    assert_paths_agree(tiny_model, atol=1e-6)


@pytest.mark.parametrize("family", FAST_FAMILIES, indirect=True)
def test_the_general_path_equals_the_fast_path_on_every_fast_family(family: LoadedModel) -> None:
    """With transformers' norms rounding through float32 inside the module, to that rounding."""
    assert_paths_agree(family, atol=1e-5)


def assert_paths_agree(fast: LoadedModel, atol: float) -> None:
    """Every method, through the engine: the same numbers from either path."""
    general = dataclasses.replace(fast, force_general_path=True)
    assert (fast.path, general.path) == (ExplainPath.FAST, ExplainPath.GENERAL)
    replacement = {"replacement": "token", "replacement_token_id": 7}
    methods: list[tuple[str, dict[str, object]]] = [
        ("saliency", {}),
        ("input_x_gradient", {}),
        ("integrated_gradients", {"steps": 8}),
        ("layer_integrated_gradients", {"steps": 8, "layer": 1}),
        ("gradient_x_activation", {"layer": 1}),
        ("occlusion", replacement),
        ("shapley_sampling", {"samples": 2, **replacement}),
        ("attention", {}),
        ("attention_rollout", {}),
        ("logit_lens", {}),
    ]
    by_fast = explain(fast, None, PROMPT_IDS, OUTPUT_IDS, methods, None)
    by_general = explain(general, None, PROMPT_IDS, OUTPUT_IDS, methods, None)
    assert by_fast.explain_path == types_pb2.EXPLAIN_PATH_FAST
    assert by_general.explain_path == types_pb2.EXPLAIN_PATH_GENERAL
    assert by_fast.architecture == by_general.architecture == fast.architecture.model_type
    for ours, theirs in zip(by_fast.results, by_general.results, strict=True):
        for name, tensor in [("attributions", ours.attributions), *ours.extras.items()]:
            other = theirs.attributions if name == "attributions" else theirs.extras[name]
            np.testing.assert_allclose(
                np.frombuffer(tensor.data, dtype="<f4"), np.frombuffer(other.data, dtype="<f4"), rtol=1e-5, atol=atol,
                err_msg=f"{ours.method} {name}",
            )  # fmt: skip


def test_an_unsupported_architecture_is_refused_before_its_weights_are_read(tmp_path: Path) -> None:
    BloomConfig(vocab_size=VOCAB_SIZE, hidden_size=32, n_layer=2, n_head=4).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError) as refused:
        load_model(tmp_path)
    message = str(refused.value)
    assert "'bloom'" in message and "is not supported" in message
    assert all(f"{model_type}: " in message for model_type in ("llama", "qwen3", "gemma3_text", "gpt2"))


def test_the_worker_refuses_an_unsupported_architecture_at_start_up(tmp_path: Path) -> None:
    """`python -m explainers` on a BLOOM directory exits at once with the reason, before it connects to Redis (the
    URL below has nothing listening)."""
    BloomConfig(vocab_size=VOCAB_SIZE, hidden_size=32, n_layer=2, n_head=4).save_pretrained(tmp_path)
    worker = subprocess.run(
        [sys.executable, "-m", "explainers", "--model-dir", str(tmp_path), "--redis-url", "redis://127.0.0.1:1/0"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SIGHTLINE_METRICS_LISTEN": "off"},
    )
    assert worker.returncode == 1
    last_line = worker.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"explainer: cannot explain the model in {tmp_path}: model architecture 'bloom'")
    assert "supported: llama: Llama 2/3, SmolLM2; mistral: Mistral; qwen2: Qwen2 / Qwen2.5;" in last_line


def test_the_published_catalogue_names_the_model_architecture_and_path(
    family: LoadedModel, redis_client: redis.Redis
) -> None:
    """What a worker publishes for the gateway's ListMethods, read back from Redis."""
    ExplainerWorker(redis_client, family, WorkerSettings(consumer="worker-a")).register()
    published = explanations_pb2.ListMethodsResponse.FromString(cast(bytes, redis_client.get(CATALOG_KEY)))
    expected_path = ExplainPath.FAST if family.architecture.model_type in FAST_FAMILIES else ExplainPath.GENERAL
    assert (published.model, published.architecture) == (family.model_name, family.architecture.model_type)
    assert published.explain_path == expected_path.proto
    assert len(published.methods) == 10
