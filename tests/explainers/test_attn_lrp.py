"""AttnLRP against lxt, the reference implementation, on the tiny Llama, and conservation wherever its rules
conserve (tests/explainers/test_families.py runs it on every family)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sightline.v1 import types_pb2

from explainers.methods.attn_lrp import AttnLrp
from explainers.methods.base import AttributionContext
from explainers.model import LoadedModel, forward_from_layer
from explainers.targets import Targets, TargetScore

ReadTensor = Callable[[types_pb2.Tensor], np.ndarray]
MakeContext = Callable[[LoadedModel], AttributionContext]
ROOT = Path(__file__).resolve().parents[2]


def logit_targets(ctx: AttributionContext) -> Targets:
    """ctx's targets scored by their logits, which AttnLRP explains."""
    return dataclasses.replace(ctx.targets, score=TargetScore.LOGIT)


def run(ctx: AttributionContext, read_tensor: ReadTensor) -> tuple[np.ndarray, np.ndarray]:
    """(relevances, conservation_delta)."""
    method = AttnLrp()
    result = method.attribute(ctx, method.parse_params({}))
    return read_tensor(result.attributions), read_tensor(result.extras["conservation_delta"])


def test_agrees_with_lxt(
    tiny_model_float32: LoadedModel, make_context: MakeContext, read_tensor: ReadTensor, tmp_path: Path
) -> None:
    out = tmp_path / "lxt.npy"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-m", "tests.explainers.lxt_reference", str(out)], check=True, env=env, cwd=ROOT)
    lxt = np.load(out, allow_pickle=False)  # [num_targets, num_tokens]
    ours, _ = run(make_context(tiny_model_float32), read_tensor)
    positions = np.arange(lxt.shape[1] - 1)
    ctx = make_context(tiny_model_float32)
    expected = np.where(positions[None] < ctx.targets.positions.numpy()[:, None], lxt[:, :-1], 0.0)
    # float32 throughout, lxt through eager attention and ours through SDPA: to float32's rounding of the sums.
    np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-5 * float(np.abs(expected).max()))


def test_relevance_is_conserved_where_the_rules_are_linear(
    tiny_model: LoadedModel, make_context: MakeContext, read_tensor: ReadTensor
) -> None:
    """AttnLRP's softmax rule keeps a share of the relevance that reaches the attention scores (the paper's
    approximate conservation), which conservation_delta reports. Every other rule conserves: with the values zeroed
    (attention adds nothing to the residual stream, so nothing reaches the softmax either), the relevances sum to
    the logit exactly (float64, a model without biases)."""
    ctx = make_context(tiny_model)
    relevance, delta = run(ctx, read_tensor)
    with torch.no_grad():
        embeddings = tiny_model.embed(ctx.token_ids)
        logits = forward_from_layer(tiny_model, embeddings, 0, logit_targets(ctx))[0].numpy()
    np.testing.assert_allclose(delta, relevance.sum(axis=1) - logits, rtol=0, atol=1e-5)
    assert np.abs(delta).max() > 1e-3  # the softmax's share, which the next part removes

    values = [layer.get_parameter("self_attn.v_proj.weight") for layer in tiny_model.decoder_layers]
    saved = [weight.clone() for weight in values]
    try:
        for weight in values:
            weight.zero_()
        no_values = make_context(tiny_model)
        relevance, delta = run(no_values, read_tensor)
        with torch.no_grad():
            scores = forward_from_layer(tiny_model, tiny_model.embed(ctx.token_ids), 0, logit_targets(no_values))
        logits = scores[0].numpy()
    finally:
        for weight, original in zip(values, saved, strict=True):
            weight.copy_(original)
    scale = float(np.abs(logits).max())
    np.testing.assert_allclose(relevance.sum(axis=1), logits, rtol=0, atol=1e-6 * scale)
    np.testing.assert_allclose(delta, 0.0, rtol=0, atol=1e-6 * scale)
