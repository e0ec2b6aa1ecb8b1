"""Every supported decoder family on the real stack: vLLM CPU serves a tiny random model of the family from a model
directory, the explainer worker loads the same directory, and through the gateway (gRPC, the Python SDK and the CLI)
the explainer's log-probabilities of vLLM's generated tokens match vLLM's (the fidelity check), on the path the
family is explained with.

One stack (Redis, vLLM, explainer, gateway) per family, started once for the family's tests; each model is 2 layers
of 2 query heads of size 32 (the smallest head size vLLM CPU's attention takes) over a 64-word vocabulary.
Run with ``-s`` to see each family's measured fidelity.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sightline import Client, ExplainPath, ExplanationState

from deploy.local_stack import LocalStack, StackConfig, free_port
from tests.explainers.conftest import PROMPT_IDS
from tests.model_families import FAMILIES, SERVABLE_SHAPE, save_family_model

pytestmark = pytest.mark.e2e

FAST_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text")
MAX_TOKENS = 8
# Both sides compute in float32: vLLM's CPU kernels (fused norms, its paged attention) and transformers' modules
# round differently, by float32 round-off of log-probabilities of magnitude ~1 to 10.
FIDELITY_TOLERANCE = 1e-4
# Weights drawn with std 0.1: at the explainer tests' 0.3, Gemma's scaled embeddings saturate the tiny models (each
# greedy token near probability 1, log-probability about -0.001 on both sides), which would make the check trivial;
# at 0.1 every family's greedy tokens have log-probabilities between about -1 and -3.
INITIALIZER_RANGE = 0.1
# Gradients and attention, on either path, with the fidelity check: enough to show the path runs end to end.
METHODS = ["input_x_gradient", "attention"]


def served_name(model_type: str) -> str:
    return f"tiny-{model_type.replace('_', '-')}"


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """The whole stack serving and explaining the family's tiny model (the model directory is named as it is
    served, which is the name the explainer publishes its weights under)."""
    model_type: str = request.param
    root = tmp_path_factory.mktemp(model_type)
    model_dir = save_family_model(model_type, root / served_name(model_type), SERVABLE_SHAPE, INITIALIZER_RANGE)
    config = StackConfig(
        model_dir=model_dir,
        state_dir=root / "state",
        gateway_port=free_port(),
        vllm_port=free_port(),
        redis_port=free_port(),
        served_model_name=served_name(model_type),
        max_model_len=64,
        gateway_metrics_port=free_port(),
        explainer_metrics_port=free_port(),
        viewer_port=free_port(),
        prepare_embedded_model=False,
    )
    with LocalStack(config) as running:
        yield running


def model_type_of(stack: LocalStack) -> str:
    return next(model_type for model_type in FAMILIES if served_name(model_type) == stack.config.served_model_name)


def expected_path(model_type: str) -> ExplainPath:
    return ExplainPath.FAST if model_type in FAST_FAMILIES else ExplainPath.GENERAL


def test_the_explainer_reproduces_vllms_logprobs(family_stack: LocalStack) -> None:
    """Greedy generation from token ids, explained in the same call: the explanation's recomputed log-probabilities
    are vLLM's served ones, token for token, on the family's path."""
    model_type = model_type_of(family_stack)
    with Client(family_stack.config.gateway_address, timeout=300) as client:
        generation = client.generate(PROMPT_IDS, max_tokens=MAX_TOKENS, temperature=0.0, explain=METHODS)
    explanation = generation.explanation
    assert explanation is not None and explanation.state == ExplanationState.SUCCEEDED, explanation
    assert (explanation.model, explanation.architecture) == (served_name(model_type), model_type)
    assert explanation.explain_path == expected_path(model_type)
    assert list(generation.prompt_token_ids) == PROMPT_IDS and generation.output_tokens
    output_ids = [token.id for token in generation.output_tokens]
    assert [token.id for token in explanation.tokens] == PROMPT_IDS + output_ids
    assert set(explanation.results) == set(METHODS)

    served = [token.logprob for token in generation.output_tokens if token.logprob is not None]
    assert len(served) == len(output_ids)
    assert max(served) < -0.1, f"near-certain tokens make the check trivial: {served}"
    assert explanation.fidelity is not None
    recomputed = explanation.fidelity.recomputed_logprobs
    assert recomputed == pytest.approx(served, abs=FIDELITY_TOLERANCE)
    gap = max(abs(ours - theirs) for ours, theirs in zip(recomputed, served, strict=True))
    assert explanation.fidelity.max_abs_logprob_diff == pytest.approx(gap, abs=1e-6)
    print(
        f"\n{model_type}: {len(served)} tokens, max |logprob diff| {explanation.fidelity.max_abs_logprob_diff:.3g}, "
        f"path {explanation.explain_path.value}"
    )


def test_list_methods_names_the_model_architecture_and_path(family_stack: LocalStack) -> None:
    model_type = model_type_of(family_stack)
    with Client(family_stack.config.gateway_address, timeout=60) as client:
        catalog = client.list_methods()
    assert (catalog.model, catalog.architecture) == (served_name(model_type), model_type)
    assert catalog.explain_path == expected_path(model_type)
    assert {"input_x_gradient", "attention", "logit_lens"} <= {info.name for info in catalog}


def test_the_cli_shows_the_model_architecture_and_path(family_stack: LocalStack) -> None:
    model_type = model_type_of(family_stack)
    path = expected_path(model_type).value
    methods = sightline_cli(family_stack, "methods")
    assert methods.returncode == 0, methods.stderr
    assert methods.stdout.splitlines()[0] == f"model {served_name(model_type)}, architecture {model_type}, {path} path"

    # An explanation made from token ids (with the word-level tokenizer, vLLM's Qwen2 tokenizer renders text as no
    # tokens), printed by `sightline explain`.
    with Client(family_stack.config.gateway_address, timeout=300) as client:
        generation = client.generate(PROMPT_IDS, max_tokens=4, explain="input_x_gradient")
    explained = sightline_cli(family_stack, "explain", generation.explanation_id, "--wait", "120")
    assert explained.returncode == 0, explained.stderr
    summary = next(line for line in explained.stdout.splitlines() if line.startswith("explanation "))
    assert f"(model {served_name(model_type)}, architecture {model_type}, {path} path, max |logprob diff| " in summary


def sightline_cli(stack: LocalStack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "sightline"), "--target", stack.config.gateway_address, *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
