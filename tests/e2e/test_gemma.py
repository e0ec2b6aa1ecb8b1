"""Gemma 3 270M, the second embedded model, end to end: vLLM CPU serving the converted directory, the gateway, Redis
and an explainer worker, started once for this module (``python -m deploy.local_stack --model gemma-3-270m``).

It is a base model: the GGUF asks for a leading <bos> and carries no chat template, so completion prompts are served
(with <bos>, which vLLM and the explainer both see) and chat requests are refused with the reason.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from sightline import Client, ExplanationState, SightlineError
from transformers import AutoConfig

from deploy.local_stack import LocalStack, StackConfig, free_port
from explainers.architectures import architecture_of
from explainers.embedded_model import GEMMA_MODEL_NAME, model_cache_dir

pytestmark = pytest.mark.e2e

FRANCE_COMPLETION = "Question: What is the capital of France?\nAnswer:"
GEMMA_BOS_ID = 2
# As tests/e2e/test_explanations.py: the same float32 weights on both sides, kernels and summation order aside.
FIDELITY_BOUND = 0.02


@pytest.fixture(scope="module")
def gemma_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    config = StackConfig(
        model_dir=model_cache_dir(GEMMA_MODEL_NAME),
        served_model_name=GEMMA_MODEL_NAME,
        embedded_model=GEMMA_MODEL_NAME,
        state_dir=tmp_path_factory.mktemp("gemma-stack"),
        gateway_port=free_port(),
        vllm_port=free_port(),
        redis_port=free_port(),
        gateway_metrics_port=free_port(),
        explainer_metrics_port=free_port(),
        viewer_port=free_port(),
    )
    with LocalStack(config) as running:
        yield running


@pytest.fixture(scope="module")
def client(gemma_stack: LocalStack) -> Iterator[Client]:
    with Client(gemma_stack.config.gateway_address, timeout=600) as opened:
        yield opened


def test_france_completion_answers_paris_explained_with_fidelity(gemma_stack: LocalStack, client: Client) -> None:
    generation = client.generate(FRANCE_COMPLETION, max_tokens=3, explain=["input_x_gradient"])

    assert generation.model == GEMMA_MODEL_NAME
    # vLLM tokenised the prompt with the converted tokenizer, which prepends <bos> as the GGUF asks.
    assert generation.prompt_token_ids[0] == GEMMA_BOS_ID
    assert GEMMA_BOS_ID not in generation.prompt_token_ids[1:]
    assert generation.output_tokens[0].text == " Paris"
    assert generation.text.startswith(" Paris")

    explanation = generation.explanation
    assert explanation is not None and explanation.state == ExplanationState.SUCCEEDED, explanation
    assert explanation.model == GEMMA_MODEL_NAME
    # The explainer explains exactly the ids vLLM saw and generated, <bos> included.
    output_ids = [t.id for t in generation.output_tokens]
    assert [t.id for t in explanation.tokens] == [*generation.prompt_token_ids, *output_ids]
    assert explanation.prompt_length == len(generation.prompt_token_ids)
    # Whichever path the architecture registry gives Gemma 3, the explanation names it.
    config = AutoConfig.from_pretrained(gemma_stack.config.model_dir, local_files_only=True)
    assert generation.raw.explanation.explain_path == architecture_of(config).path_for(config).proto

    # The fidelity check: the explainer's replica gives the served tokens vLLM's log-probabilities.
    assert explanation.fidelity is not None
    served = np.array([t.logprob for t in generation.output_tokens])
    recomputed = np.array(explanation.fidelity.recomputed_logprobs)
    assert recomputed.shape == served.shape
    assert explanation.fidelity.max_abs_logprob_diff < FIDELITY_BOUND
    assert np.max(np.abs(recomputed - served)) == pytest.approx(explanation.fidelity.max_abs_logprob_diff, abs=1e-6)

    attributions = explanation.results["input_x_gradient"].attributions
    assert attributions is not None
    matrix = attributions.to_numpy()
    assert matrix.shape == (len(output_ids), len(explanation.tokens) - 1)
    for row, position in enumerate(explanation.target_positions):
        assert np.all(matrix[row, position:] == 0.0), "a token cannot be attributed to itself or later tokens"
        assert np.all(np.isfinite(matrix[row])) and np.any(matrix[row, :position] != 0.0)
    # " Paris" owes something to " France" among the prompt's tokens.
    france = next(i for i, t in enumerate(explanation.tokens) if t.text == " France")
    assert matrix[0, france] != 0.0


def test_chat_request_is_refused_because_the_base_model_has_no_chat_template(client: Client) -> None:
    with pytest.raises(SightlineError) as refused:
        client.generate([{"role": "user", "content": "What is the capital of France?"}], max_tokens=3)
    assert refused.value.code.name == "FAILED_PRECONDITION"
    assert f"model '{GEMMA_MODEL_NAME}' has no chat template" in refused.value.details
    assert "input.prompt" in refused.value.details
