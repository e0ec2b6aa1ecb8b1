"""explain(): validation first, one forward or a cache hit, every method, fidelity, and its spans."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import redis
import torch
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sightline.v1 import types_pb2

from common.jobs import ExplainOptions
from explainers import backprop, engine, step_scores
from explainers.backprop import RecordedLayers
from explainers.engine import InvalidInputError, explain
from explainers.hidden_cache import HiddenStateCache, encode_tensor
from explainers.methods import gradients, logit_lens
from explainers.methods.base import AttributionContext, InvalidParamsError
from explainers.methods.registry import UnknownMethodError
from explainers.model import LoadedModel
from explainers.step_scores import Readout
from tests.explainers.conftest import OUTPUT_IDS, PROMPT_IDS, REGISTERED_METHODS

ReadTensor = Callable[[types_pb2.Tensor], np.ndarray]
BOTH_METHODS: list[tuple[str, dict[str, object]]] = [("input_x_gradient", {"target_batch_size": 3}), ("logit_lens", {})]
TENANT = "acme"


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """Spans of explain() in memory, without touching the process-wide tracer provider other tests install."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(engine, "tracer", provider.get_tracer("sightline.explainer"))
    yield exporter
    provider.shutdown()


def model_log_probs(loaded: LoadedModel) -> list[float]:
    """The generated tokens' log-probs as the model computes them in one plain forward pass."""
    token_ids = torch.tensor(PROMPT_IDS + OUTPUT_IDS)
    with torch.no_grad():
        logits = loaded.model(input_ids=token_ids[None]).logits[0]
    positions = torch.arange(len(PROMPT_IDS), len(token_ids))
    logprobs: list[float] = torch.log_softmax(logits, dim=-1)[positions - 1, token_ids[positions]].tolist()
    return logprobs


def by_name(spans: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {span.name: span for span in spans.get_finished_spans()}


def test_explain_fills_tokens_results_and_fidelity(
    tiny_model: LoadedModel, read_tensor: ReadTensor, spans: InMemorySpanExporter
) -> None:
    served = model_log_probs(tiny_model)

    explanation = explain(tiny_model, None, PROMPT_IDS, OUTPUT_IDS, BOTH_METHODS, served)

    assert (explanation.model, explanation.weights_digest) == ("tiny-llama", tiny_model.weights_digest)
    assert [token.id for token in explanation.tokens] == PROMPT_IDS + OUTPUT_IDS
    assert [token.text for token in explanation.tokens] == [f"w{i}" for i in PROMPT_IDS + OUTPUT_IDS]
    assert not any(token.HasField("logprob") for token in explanation.tokens[: len(PROMPT_IDS)])
    np.testing.assert_allclose([t.logprob for t in explanation.tokens[len(PROMPT_IDS) :]], served, rtol=1e-6)
    assert explanation.prompt_length == len(PROMPT_IDS)
    assert list(explanation.target_positions) == list(range(6, 14))
    assert not explanation.cache_hit

    gradient, lens = explanation.results
    assert (gradient.method, lens.method) == ("input_x_gradient", "logit_lens")
    assert read_tensor(gradient.attributions).shape == (8, 13)
    assert read_tensor(lens.extras["top_token_ids"]).shape == (3, 8, 5)
    assert gradient.seconds > 0 and lens.seconds > 0

    # The served log-probs are the model's own, so the replica reproduces them up to float32 rounding.
    np.testing.assert_allclose(explanation.fidelity.recomputed_logprobs, served, rtol=0, atol=1e-6)
    assert explanation.fidelity.max_abs_logprob_diff < 1e-6

    recorded = by_name(spans)
    assert set(recorded) == {"forward", "method input_x_gradient", "method logit_lens", "fidelity"}
    # An OpenInference evaluator span (docs/observability.md): the explained tokens in, the method's own time.
    lens_span = dict(recorded["method logit_lens"].attributes or {})
    assert lens_span.pop("sightline.method.seconds") == pytest.approx(lens.seconds, rel=1e-6)
    assert lens_span == {
        "sightline.method": "logit_lens",
        "openinference.span.kind": "EVALUATOR",
        "input.mime_type": "application/json",
        "input.value": json.dumps([{"position": p} for p in range(6, 14)], separators=(",", ":")),
    }
    fidelity = recorded["fidelity"].attributes or {}
    assert fidelity["sightline.fidelity.max_abs_logprob_diff"] == explanation.fidelity.max_abs_logprob_diff


@pytest.mark.parametrize("output_indices", [[], [1, 4, 7]])
def test_step_scores_are_the_models_own_distribution(
    tiny_model: LoadedModel, read_tensor: ReadTensor, output_indices: list[int]
) -> None:
    """Log-probability, probability, entropy, rank and top-k of each explained token, against transformers' logits
    (float64 model; the readout runs on the last layer at float32, the cache's precision for it)."""
    options = ExplainOptions(output_indices=output_indices, step_scores_top_k=3)
    explanation = explain(tiny_model, None, PROMPT_IDS, OUTPUT_IDS, [], None, options)

    token_ids = torch.tensor(PROMPT_IDS + OUTPUT_IDS)
    with torch.no_grad():
        logits = tiny_model.model(input_ids=token_ids[None]).logits[0]
    positions = torch.tensor(explanation.target_positions)
    assert positions.tolist() == [len(PROMPT_IDS) + i for i in (output_indices or range(len(OUTPUT_IDS)))]
    expected = torch.log_softmax(logits[positions - 1], dim=-1)  # [targets, vocab]
    chosen = expected.gather(-1, token_ids[positions, None])[:, 0]
    steps = explanation.step_scores

    np.testing.assert_allclose(steps.logprobs, chosen, rtol=0, atol=1e-6)
    np.testing.assert_allclose(steps.probabilities, chosen.exp(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(steps.entropies, -(expected.exp() * expected).sum(-1), rtol=0, atol=1e-6)
    assert list(steps.ranks) == ((expected > chosen[:, None]).sum(-1) + 1).tolist()
    top = expected.topk(3, dim=-1)
    assert read_tensor(steps.top_token_ids).tolist() == top.indices.tolist()
    np.testing.assert_allclose(read_tensor(steps.top_logprobs), top.values, rtol=0, atol=1e-6)
    assert len(explanation.fidelity.recomputed_logprobs) == len(OUTPUT_IDS)  # fidelity covers every output


def test_fidelity_reports_the_largest_served_difference(tiny_model: LoadedModel) -> None:
    served = model_log_probs(tiny_model)
    served[3] += 0.25

    explanation = explain(tiny_model, None, PROMPT_IDS, OUTPUT_IDS, [], served)

    assert explanation.fidelity.max_abs_logprob_diff == pytest.approx(0.25, abs=1e-6)
    assert not explanation.results


def test_a_cache_hit_reproduces_the_miss(
    tiny_model_float32: LoadedModel, redis_client: redis.Redis, spans: InMemorySpanExporter
) -> None:
    cache = HiddenStateCache(redis_client, ttl_seconds=600, tenant=TENANT)
    served = model_log_probs(tiny_model_float32)

    miss = explain(tiny_model_float32, cache, PROMPT_IDS, OUTPUT_IDS, BOTH_METHODS, served)
    miss_spans = by_name(spans)
    spans.clear()
    hit = explain(tiny_model_float32, cache, PROMPT_IDS, OUTPUT_IDS, BOTH_METHODS, served)
    hit_spans = by_name(spans)

    assert not miss.cache_hit and hit.cache_hit
    assert redis_client.exists(HiddenStateCache.key(TENANT, tiny_model_float32.weights_digest, PROMPT_IDS + OUTPUT_IDS))
    for miss_result, hit_result in zip(miss.results, hit.results, strict=True):
        miss_result.ClearField("seconds")
        hit_result.ClearField("seconds")
        assert miss_result == hit_result  # bit-identical tensors
    assert miss.tokens == hit.tokens
    # The forward's full-precision last layer is cached too: a hit reports the miss's step scores and fidelity
    # exactly.
    assert hit.fidelity == miss.fidelity
    assert hit.step_scores == miss.step_scores

    # The same tokens split differently read their outputs' scores out of that last layer too: full precision, to
    # float32 rounding (one more row read out), not the bfloat16 states' ~1e-2.
    resplit = explain(tiny_model_float32, cache, PROMPT_IDS[:-1], PROMPT_IDS[-1:] + OUTPUT_IDS, BOTH_METHODS, None)
    assert resplit.cache_hit
    np.testing.assert_allclose(resplit.fidelity.recomputed_logprobs[1:], miss.fidelity.recomputed_logprobs, atol=1e-6)
    np.testing.assert_allclose(resplit.step_scores.logprobs[1:], miss.step_scores.logprobs, atol=1e-6)

    # Without that entry and this split's kept readout (they can expire first), a hit reads them out of the
    # bfloat16 last layer instead.
    key = HiddenStateCache.key(TENANT, tiny_model_float32.weights_digest, PROMPT_IDS + OUTPUT_IDS)
    assert redis_client.delete(key + ":last", key + f":readout:{len(PROMPT_IDS)}") == 2
    degraded = explain(tiny_model_float32, cache, PROMPT_IDS, OUTPUT_IDS, BOTH_METHODS, None)
    assert degraded.cache_hit
    np.testing.assert_allclose(degraded.fidelity.recomputed_logprobs, miss.fidelity.recomputed_logprobs, atol=0.02)
    assert degraded.fidelity.recomputed_logprobs != miss.fidelity.recomputed_logprobs

    assert miss_spans["cache lookup"].attributes == {"sightline.cache.hit": False}
    assert "forward" in miss_spans
    assert hit_spans["cache lookup"].attributes == {"sightline.cache.hit": True}
    assert "forward" not in hit_spans


def test_a_hit_on_the_same_split_reuses_the_kept_readout(
    tiny_model_float32: LoadedModel, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Re-explaining the same answer reads nothing out: the miss's readout is kept for its split, and serves any
    selection of explained tokens and fewer alternatives. A hit asking for more alternatives reads out again and
    keeps that readout instead."""
    readouts: list[int] = []
    read_out = step_scores.read_out

    def counted(loaded: LoadedModel, rows: torch.Tensor, token_ids: torch.Tensor, top_k: int) -> Readout:
        readouts.append(top_k)
        return read_out(loaded, rows, token_ids, top_k)

    monkeypatch.setattr(engine, "read_out", counted)
    cache = HiddenStateCache(redis_client, ttl_seconds=600, tenant=TENANT)
    served = model_log_probs(tiny_model_float32)

    def run(
        cache: HiddenStateCache | None, top_k: int, output_indices: list[int] | None = None
    ) -> types_pb2.Explanation:
        options = ExplainOptions(output_indices=output_indices or [], step_scores_top_k=top_k)
        return explain(tiny_model_float32, cache, PROMPT_IDS, OUTPUT_IDS, [], served, options)

    miss = run(cache, 3)
    uncached_subset = run(None, 3, [1, 4, 7])
    assert readouts == [3, 3]

    hit, hit_subset, hit_fewer = run(cache, 3), run(cache, 3, [1, 4, 7]), run(cache, 2)
    assert readouts == [3, 3]
    assert (hit.step_scores, hit.fidelity) == (miss.step_scores, miss.fidelity)
    assert hit_subset.step_scores == uncached_subset.step_scores
    assert hit_fewer.step_scores.top_token_ids.shape == [8, 2]
    assert hit_fewer.step_scores.logprobs == miss.step_scores.logprobs

    more, uncached_more = run(cache, 4), run(None, 4)
    assert readouts == [3, 3, 4, 4]
    assert (more.step_scores, more.fidelity) == (uncached_more.step_scores, uncached_more.fidelity)
    assert run(cache, 4).step_scores == more.step_scores
    assert readouts == [3, 3, 4, 4]


def test_a_hit_reuses_the_kept_logit_lens(
    tiny_model_float32: LoadedModel, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch, read_tensor: ReadTensor
) -> None:
    """The lens read out for some tokens is kept beside the states: a request for any of them with at most as many
    alternatives reads nothing out and returns what a fresh readout returns; any other reads out again and its
    lens replaces the kept one."""
    readouts: list[tuple[list[int], int]] = []
    read_out_layers = logit_lens._read_out_layers

    def counted(ctx: AttributionContext, k: int) -> logit_lens.LayerReadout:
        readouts.append((ctx.targets.positions.tolist(), k))
        return read_out_layers(ctx, k)

    monkeypatch.setattr(logit_lens, "_read_out_layers", counted)
    cache = HiddenStateCache(redis_client, ttl_seconds=600, tenant=TENANT)

    def run(cache: HiddenStateCache | None, k: int, output_indices: list[int] | None = None) -> types_pb2.MethodResult:
        options = ExplainOptions(output_indices=output_indices or [])
        methods: list[tuple[str, dict[str, object]]] = [("logit_lens", {"k": k})]
        result = explain(tiny_model_float32, cache, PROMPT_IDS, OUTPUT_IDS, methods, None, options).results[0]
        result.ClearField("seconds")
        return result

    everything = [len(PROMPT_IDS) + index for index in range(len(OUTPUT_IDS))]
    some = [len(PROMPT_IDS) + index for index in (1, 4, 7)]
    uncached = {"some": run(None, 3, [1, 4, 7]), "fewer": run(None, 2, [1, 4, 7])}
    uncached |= {"all": run(None, 3), "more": run(None, 4)}
    readouts.clear()

    assert run(cache, 3, [1, 4, 7]) == uncached["some"]
    assert run(cache, 3) == uncached["all"]  # tokens the kept lens does not hold: read out, kept instead
    assert readouts == [(some, 3), (everything, 3)]

    assert run(cache, 3) == uncached["all"]  # bit-identical
    hit_fewer = run(cache, 2, [1, 4, 7])
    assert readouts == [(some, 3), (everything, 3)]
    # Rows read out among more rows round like rows read out among fewer, to float32 rounding; the same ids.
    for name in ("top_logprobs", "target_logprobs"):
        np.testing.assert_allclose(
            read_tensor(hit_fewer.extras[name]), read_tensor(uncached["fewer"].extras[name]), rtol=0, atol=1e-6
        )
    assert hit_fewer.extras["top_token_ids"] == uncached["fewer"].extras["top_token_ids"]

    assert run(cache, 4) == uncached["more"]  # more alternatives: read out again, kept instead
    assert run(cache, 4) == uncached["more"]
    assert readouts == [(some, 3), (everything, 3), (everything, 4)]

    # A kept lens that does not fit this sequence and model is not used, and is replaced.
    key = HiddenStateCache.key(TENANT, tiny_model_float32.weights_digest, PROMPT_IDS + OUTPUT_IDS)
    redis_client.hset(key + ":logit_lens", "positions", encode_tensor(torch.tensor([1, 2])))
    assert run(cache, 4) == uncached["more"]
    assert run(cache, 4) == uncached["more"]
    assert readouts == [(some, 3), (everything, 3), (everything, 4), (everything, 4)]


def test_the_miss_forward_pass_serves_the_embedding_gradient_methods(
    tiny_model_float32: LoadedModel, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a miss, saliency and input x gradient run backward from the engine's own forward pass, recorded; on a hit
    each records one of its own. The results are the same bits either way."""
    own_recordings = []
    record_forward = backprop.record_forward

    def counted(loaded: LoadedModel, states: torch.Tensor, layer: int) -> RecordedLayers:
        own_recordings.append(layer)
        return record_forward(loaded, states, layer)

    monkeypatch.setattr(gradients, "record_forward", counted)
    cache = HiddenStateCache(redis_client, ttl_seconds=600, tenant=TENANT)
    methods: list[tuple[str, dict[str, object]]] = [("saliency", {}), ("logit_lens", {}), ("input_x_gradient", {})]

    miss = explain(tiny_model_float32, cache, PROMPT_IDS, OUTPUT_IDS, methods, None)
    assert own_recordings == []
    hit = explain(tiny_model_float32, cache, PROMPT_IDS, OUTPUT_IDS, methods, None)
    assert own_recordings == [0, 0]

    assert hit.cache_hit and not miss.cache_hit
    for miss_result, hit_result in zip(miss.results, hit.results, strict=True):
        assert miss_result.attributions == hit_result.attributions


def test_another_tenant_never_hits_the_cache(tiny_model_float32: LoadedModel, redis_client: redis.Redis) -> None:
    owner = HiddenStateCache(redis_client, ttl_seconds=600, tenant=TENANT)
    other = HiddenStateCache(redis_client, ttl_seconds=600, tenant="globex")
    methods: list[tuple[str, dict[str, object]]] = [("logit_lens", {})]

    first = explain(tiny_model_float32, owner, PROMPT_IDS, OUTPUT_IDS, methods, None)
    elsewhere = explain(tiny_model_float32, other, PROMPT_IDS, OUTPUT_IDS, methods, None)
    again = explain(tiny_model_float32, owner, PROMPT_IDS, OUTPUT_IDS, methods, None)

    assert (first.cache_hit, elsewhere.cache_hit, again.cache_hit) == (False, False, True)
    sequence = PROMPT_IDS + OUTPUT_IDS
    assert redis_client.exists(HiddenStateCache.key("globex", tiny_model_float32.weights_digest, sequence))


def test_a_corrupt_cache_entry_is_recomputed(tiny_model_float32: LoadedModel, redis_client: redis.Redis) -> None:
    cache = HiddenStateCache(redis_client, ttl_seconds=600, tenant=TENANT)
    key = HiddenStateCache.key(TENANT, tiny_model_float32.weights_digest, PROMPT_IDS + OUTPUT_IDS)
    redis_client.set(key, b"not a tensor")

    explanation = explain(tiny_model_float32, cache, PROMPT_IDS, OUTPUT_IDS, [("logit_lens", {})], None)

    assert not explanation.cache_hit
    assert cache.get(tiny_model_float32.weights_digest, PROMPT_IDS + OUTPUT_IDS) is not None


@pytest.mark.parametrize(
    ("methods", "prompt", "output", "served", "error", "message"),
    [
        ([("telepathy", {})], PROMPT_IDS, OUTPUT_IDS, None, UnknownMethodError,
         "available methods: " + REGISTERED_METHODS),
        ([("logit_lens", {"k": 0})], PROMPT_IDS, OUTPUT_IDS, None, InvalidParamsError, "must be in 1..50"),
        ([("logit_lens", {"top": 3})], PROMPT_IDS, OUTPUT_IDS, None, InvalidParamsError,
         r"'explain.methods\[0\].params.top' is not a parameter of method 'logit_lens'; its parameters: k "),
        ([("logit_lens", {}), ("logit_lens", {})], PROMPT_IDS, OUTPUT_IDS, None, InvalidInputError,
         r"named more than once: \['logit_lens'\]; request each method once"),
        ([], PROMPT_IDS, [*OUTPUT_IDS, 64], None, InvalidInputError,
         r"output_token_ids holds token ids outside the model's vocabulary \(ids 0 to 63\): \[64\], "
         r"the first at index 8"),
        ([], [-1, *PROMPT_IDS], OUTPUT_IDS, None, InvalidInputError,
         r"prompt_token_ids holds .*: \[-1\], the first at index 0"),
        ([], PROMPT_IDS, [], None, InvalidInputError, "at least one prompt token and one output token"),
        ([], PROMPT_IDS, OUTPUT_IDS * 8, None, InvalidInputError,
         "together have 70 tokens; the model's context window is 64"),
        ([], PROMPT_IDS, OUTPUT_IDS, [0.0], InvalidInputError, "served_logprobs has 1 values for 8 output tokens"),
    ],
)  # fmt: skip
def test_invalid_requests_fail_before_any_model_work(
    tiny_model: LoadedModel,
    spans: InMemorySpanExporter,
    methods: list[tuple[str, dict[str, object]]],
    prompt: list[int],
    output: list[int],
    served: list[float] | None,
    error: type[ValueError],
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        explain(tiny_model, None, prompt, output, methods, served)
    assert not spans.get_finished_spans()
