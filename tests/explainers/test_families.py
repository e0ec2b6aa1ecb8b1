"""Every supported decoder family, as a tiny random model loaded from a directory like a served one: each method
against an independent computation (plain autograd over transformers' module, Captum, the model's own outputs),
and the general path against the fast path where both apply.

Models are float64 (their norms and eager softmax still round through float32 inside transformers, hence the
tolerances of 1e-5, relative and absolute), with two layers, grouped-query attention where the family has it,
random norm weights (Gemma initialises its (1 + w) norms to w = 0, which would hide a missing 1), and
sliding-window layers shorter than the explained sequence for Gemma and a sliding-window Mistral, so that a window
actually cuts attention off. Gemma 2's soft-caps are set low enough to bend its scores and logits.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Callable
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

from common.explain_spec import ATTN_LRP_FAMILIES as ATTN_LRP_COVERED
from common.jobs import CATALOG_KEY
from explainers.architectures import ExplainPath, UnsupportedArchitectureError
from explainers.backprop import layer_keys_values, run_layers
from explainers.engine import explain
from explainers.methods.attention_weights import attention_probabilities
from explainers.methods.base import AttributionContext, InvalidParamsError, tensor_array
from explainers.methods.gradient_shap import Samples
from explainers.methods.integrated_gradients import quadrature_rule
from explainers.methods.registry import catalog, get_method
from explainers.methods.value_zeroing import VALUE_PROJECTIONS
from explainers.model import (
    LoadedModel,
    attention_implementation,
    forward_from_layer,
    forward_with_hidden_states,
    load_model,
)
from explainers.targets import Targets, TargetScore, token_scores
from explainers.worker import ExplainerWorker, WorkerSettings
from tests.explainers.conftest import (
    NUM_LAYERS,
    OUTPUT_IDS,
    PROMPT_IDS,
    REGISTERED_METHODS,
    VOCAB_SIZE,
    word_tokenizer,
)
from tests.model_families import EXPLAINER_VARIANTS, FAMILIES, build_family_model

# The architectures only the general path explains; the hand-written fast path explains the rest.
GENERAL_FAMILIES = ("gpt_neox", "gpt2")
TOKEN_IDS = torch.tensor(PROMPT_IDS + OUTPUT_IDS)
POSITIONS = torch.arange(len(PROMPT_IDS), len(TOKEN_IDS))
TARGETS = Targets(positions=POSITIONS, token_ids=TOKEN_IDS[POSITIONS], foil_ids=None)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to the float32 rounding transformers' norms and eager softmax take inside a float64 model."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", params=sorted([*FAMILIES, *EXPLAINER_VARIANTS]))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """A tiny random model of one family, saved as a model directory and loaded by the explainer in float64."""
    model = build_family_model(request.param)
    with torch.no_grad():
        # Norm weights away from their initial 1 (or 0 for Gemma's 1 + w), so that the paths must apply them.
        for name, parameter in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                parameter.add_(0.3 * torch.randn_like(parameter))
    model_dir = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
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
        np.array(result.attributions.float_values, dtype=np.float32).reshape(tuple(result.attributions.shape)).copy()
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
    expected = ExplainPath.GENERAL if family.architecture.model_type in GENERAL_FAMILIES else ExplainPath.FAST
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


def test_gradient_shap_equals_plain_autograd_at_its_own_samples(family: LoadedModel) -> None:
    """Gradient SHAP's average, recomputed with autograd through the whole module at the points it drew."""
    h0, _ = layer_zero_gradients(family)
    baseline = family.embed(torch.full_like(TOKEN_IDS, 5))
    method = get_method("gradient_shap")
    params = method.parse_params({"samples": 3, "stdev": 0.05, "seed": 4, "baseline_token_id": 5})
    samples = Samples.draw(h0[None], params)
    expected = torch.zeros(len(TARGETS), len(TOKEN_IDS), dtype=h0.dtype)
    for noisy, alpha in zip(samples.noisy_inputs, samples.alphas, strict=True):
        point = (alpha * noisy + (1 - alpha) * baseline[0]).requires_grad_(True)
        for index in range(len(TARGETS)):
            (gradient,) = torch.autograd.grad(scores_of_first_layer_input(family, point[None])[0, index], point)
            expected[index] += (gradient * (noisy - baseline[0])).sum(dim=-1) / len(samples.alphas)
    # The module rounds its norms through float32; summed over samples and the hidden dimension, that rounding
    # scales with the attributions.
    scale = float(expected.abs().max())
    ours = attributions(family, "gradient_shap", samples=3, stdev=0.05, seed=4, baseline_token_id=5)
    torch.testing.assert_close(ours, prefix(expected), rtol=1e-5, atol=1e-5 * scale)


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
        rows = np.array(result.attributions.float_values, dtype=np.float32).reshape(tuple(result.attributions.shape))
        delta = torch.from_numpy(
            np.array(result.extras["convergence_delta"].float_values, dtype=np.float32).copy()
        ).double()
        torch.testing.assert_close(delta, torch.from_numpy(rows.sum(axis=1)).double() - change, rtol=1e-4, atol=1e-4)
        deltas.append(float(delta.abs().max()))
    assert deltas[1] < deltas[0]

    # From a layer's own states, the module's scores come back (the general path's hooks put them in place).
    own = own_outputs(family).hidden_states
    with torch.no_grad():
        torch.testing.assert_close(
            forward_from_layer(family, own[1], 1, TARGETS)[0], token_scores(family, TOKEN_IDS[None], TARGETS)[0]
        )


def test_integrated_gradients_equal_a_plain_autograd_quadrature(family: LoadedModel) -> None:
    """Integrated gradients from a token baseline: the same quadrature, each point's gradient taken by plain
    autograd through the module, one target at a time."""
    method = get_method("integrated_gradients")
    params = method.parse_params({"steps": 4, "baseline": "token", "baseline_token_id": 5})
    ours = attributions(family, "integrated_gradients", steps=4, baseline="token", baseline_token_id=5)
    h0 = own_outputs(family).hidden_states[0][0]
    with torch.no_grad():
        baseline_ids = torch.full_like(TOKEN_IDS, 5)
        baseline = family.model(input_ids=baseline_ids[None], output_hidden_states=True).hidden_states[0][0]
    alphas, weights = quadrature_rule(params.quadrature, params.steps)
    integral = torch.zeros(len(TARGETS), *h0.shape, dtype=h0.dtype)
    for alpha, weight in zip(alphas.tolist(), weights.tolist(), strict=True):
        point = (baseline + alpha * (h0 - baseline)).requires_grad_(True)
        scores = scores_of_first_layer_input(family, point[None])[0]
        for index in range(len(TARGETS)):
            integral[index] += weight * torch.autograd.grad(scores[index], point, retain_graph=True)[0]
    close(ours, prefix((integral * (h0 - baseline)).sum(dim=-1)))


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
    target_logprobs = tensor_array(lens.extras["target_logprobs"]).reshape(NUM_LAYERS + 1, -1)
    # The last layer's readout is the model's own prediction (final norm, unembedding, soft-cap); every other
    # layer's is the model's final norm, unembedding and soft-cap (tanh(logits / cap) * cap) of its own state there.
    cap = getattr(family.model.config, "final_logit_softcapping", None)
    unembedding = family.model.get_output_embeddings()  # type: ignore[no-untyped-call]
    readouts = []
    with torch.no_grad():
        for state in own.hidden_states[:-1]:
            logits = unembedding(family.final_norm(state[0, TARGETS.predicting_positions]))
            readouts.append(torch.tanh(logits / cap) * cap if cap else logits)
    readouts.append(own.logits[0, TARGETS.predicting_positions])
    for layer, logits in enumerate(readouts):
        expected = torch.log_softmax(logits, dim=-1).gather(-1, TARGETS.token_ids[:, None])[:, 0]
        np.testing.assert_allclose(target_logprobs[layer], expected.numpy(), rtol=1e-5, atol=1e-5)


def test_value_zeroing_zeroes_each_familys_values_and_nothing_else(family: LoadedModel) -> None:
    """Where a family computes its values (value_zeroing.VALUE_PROJECTIONS), checked on the module: zeroing those
    features at one position leaves every attention probability as it was and changes the layer's output; zeroing
    the rest of a fused projection's features there (queries, keys) changes the probabilities."""
    projection = VALUE_PROJECTIONS[family.architecture.model_type]
    module = family.decoder_layers[0].get_submodule(projection.module)
    source = 3

    def run_zeroing(features: Callable[[int], torch.Tensor]) -> OwnOutputs:
        def zero(_: torch.nn.Module, _args: object, output: torch.Tensor) -> torch.Tensor:
            output = output.clone()
            output[0, source, features(output.shape[-1])] = 0
            return output

        handle = module.register_forward_hook(zero)
        try:
            return own_outputs(family, attentions=True)
        finally:
            handle.remove()

    def values(width: int) -> torch.Tensor:
        return projection.values(family.model.config, width)

    family.model.set_attn_implementation("eager")
    try:
        clean, zeroed = own_outputs(family, attentions=True), run_zeroing(values)
        others = run_zeroing(lambda width: ~values(width))
    finally:
        family.model.set_attn_implementation(attention_implementation(family.model.config))
    torch.testing.assert_close(zeroed.attentions[0], clean.attentions[0], rtol=0, atol=1e-12)
    assert (zeroed.hidden_states[1] - clean.hidden_states[1]).abs().max() > 1e-3
    width = module(torch.zeros(1, 1, family.hidden_size, dtype=family.dtype)).shape[-1]
    if not values(width).all():  # fused with the queries and keys
        assert (others.attentions[0] - clean.attentions[0]).abs().max() > 1e-6

    # And the method on the family: rows sum to 1 over the positions up to each target's predicting one.
    rows = attributions(family, "value_zeroing", aggregation="layer", layer=1)
    np.testing.assert_allclose(rows.sum(dim=1).numpy(), 1.0, rtol=0, atol=1e-5)


def test_activation_patching_restores_what_each_score_reads(family: LoadedModel) -> None:
    """Putting the clean last-layer state back at the position that predicts a target gives its clean score back;
    putting back a first-layer state the corruption never touched gives nothing."""
    method = get_method("activation_patching")
    result = method.attribute(context(family), method.parse_params({"corrupt_stop": 3, "samples": 2}))

    extras = {name: tensor_array(tensor) for name, tensor in result.extras.items()}
    recovered, lost = extras["recovered"], extras["clean_scores"] - extras["corrupted_scores"]
    assert np.abs(lost).max() > 1e-3
    np.testing.assert_allclose(recovered[-1][np.arange(len(TARGETS)), TARGETS.predicting_positions], lost, atol=1e-5)
    np.testing.assert_allclose(recovered[0][:, 3:], 0.0, rtol=0, atol=1e-5)


def test_a_fast_pass_resumed_from_earlier_keys_and_values_equals_the_whole_pass(family: LoadedModel) -> None:
    """run_layers over positions S.. with layer_keys_values of positions ..S - 1 gives the states a pass over the
    whole sequence gives there, from any layer: windows that cut attention off, soft-caps and head norms included."""
    if family.path is not ExplainPath.FAST:
        pytest.skip("the general path runs whole sequences only")
    stream = forward_with_hidden_states(family, TOKEN_IDS).hidden_states[:, None]  # [layers + 1, 1, tokens, hidden]
    past = layer_keys_values(family, stream)
    for layer in range(family.num_layers):
        whole = run_layers(family, stream[layer], layer, record=False)[0]
        for start in (1, 5, len(TOKEN_IDS) - 1):
            layers_past = [(keys[:, :, :start], values[:, :, :start]) for keys, values in past[layer:]]
            resumed = run_layers(family, stream[layer][:, start:], layer, record=False, past=layers_past)[0]
            for whole_states, resumed_states in zip(whole, resumed, strict=True):
                torch.testing.assert_close(resumed_states, whole_states[:, start:], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="records nothing"):
        run_layers(family, stream[0][:, 1:], 0, record=True, past=past)


def test_attn_lrp_runs_on_the_families_it_covers_and_refuses_the_others_saying_why(family: LoadedModel) -> None:
    method = get_method("attn_lrp")
    model_type = family.architecture.model_type
    if model_type not in ATTN_LRP_COVERED:
        with pytest.raises(InvalidParamsError, match=f"does not support {model_type!r} models: .+"):
            method.attribute(context(family), method.parse_params({}))
        return
    result = method.attribute(context(family), method.parse_params({}))
    relevance = tensor_array(result.attributions)
    delta = tensor_array(result.extras["conservation_delta"])
    with torch.no_grad():
        logits = forward_from_layer(
            family, family.embed(TOKEN_IDS), 0, dataclasses.replace(TARGETS, score=TargetScore.LOGIT)
        )[0]
    np.testing.assert_allclose(delta, relevance.sum(axis=1) - logits.numpy(), rtol=0, atol=1e-4)
    assert np.abs(relevance).max() > 1e-3


def test_the_general_path_equals_the_fast_path_on_llama(tiny_model: LoadedModel) -> None:
    """On the float64 tiny Llama whose norms stay in float64, the two paths agree to float32 output rounding."""
    assert_paths_agree(tiny_model, atol=1e-6)


@pytest.mark.parametrize("family", [name for name in FAMILIES if name not in GENERAL_FAMILIES], indirect=True)
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
        ("gradient_shap", {"samples": 4, "stdev": 0.1}),
        ("layer_integrated_gradients", {"steps": 8, "layer": 1}),
        ("gradient_x_activation", {"layer": 1}),
        ("occlusion", replacement),
        ("shapley_sampling", {"samples": 2, **replacement}),
        ("attention", {}),
        ("attention_rollout", {}),
        ("logit_lens", {}),
        ("value_zeroing", {}),
        ("activation_patching", {"samples": 2}),
    ]
    if fast.architecture.model_type in ATTN_LRP_COVERED:
        methods.append(("attn_lrp", {}))
    by_fast = explain(fast, None, PROMPT_IDS, OUTPUT_IDS, methods, None)
    by_general = explain(general, None, PROMPT_IDS, OUTPUT_IDS, methods, None)
    assert by_fast.explain_path == types_pb2.EXPLAIN_PATH_FAST
    assert by_general.explain_path == types_pb2.EXPLAIN_PATH_GENERAL
    assert by_fast.architecture == by_general.architecture == fast.architecture.model_type
    for ours, theirs in zip(by_fast.results, by_general.results, strict=True):
        for name, tensor in [("attributions", ours.attributions), *ours.extras.items()]:
            other = theirs.attributions if name == "attributions" else theirs.extras[name]
            np.testing.assert_allclose(
                np.array(tensor.float_values, dtype=np.float32), np.array(other.float_values, dtype=np.float32),
                rtol=1e-5, atol=atol,
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
    expected_path = ExplainPath.GENERAL if family.architecture.model_type in GENERAL_FAMILIES else ExplainPath.FAST
    assert (published.model, published.architecture) == (family.model_name, family.architecture.model_type)
    assert published.explain_path == expected_path.proto
    assert [method.name for method in published.methods] == REGISTERED_METHODS.split(", ")
