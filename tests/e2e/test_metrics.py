"""Prometheus metrics of the gateway and the explainer, scraped over HTTP before and after a known workload."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from sightline.v1 import inference_pb2, inference_pb2_grpc, types_pb2

from common.jobs import JOB_STREAM, worker_group_info
from deploy.local_stack import LocalStack
from tests.e2e.test_generation import FRANCE

pytestmark = pytest.mark.e2e

GENERATE = "sightline.v1.InferenceService/Generate"
STREAM = "sightline.v1.InferenceService/GenerateStream"
TENANT = "default"  # the session gateway runs without keys

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def unfinished_jobs(client: redis.Redis) -> int:
    group = worker_group_info(client.xinfo_groups(JOB_STREAM))
    return 0 if group is None else int(group["pending"]) + int(group["lag"] or 0)


def wait_until(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


def test_counters_move_by_exactly_the_workload(
    stack: LocalStack, inference: inference_pb2_grpc.InferenceServiceStub
) -> None:
    config = stack.config
    client = redis.Redis.from_url(config.redis_url)
    # Jobs earlier tests left (ASYNC ones) must not finish inside the measured window.
    wait_until(lambda: unfinished_jobs(client) == 0, timeout=300)
    gateway_before, explainer_before = scrape(config.gateway_metrics_port), scrape(config.explainer_metrics_port)

    plain = inference_pb2.GenerateRequest(
        input=inference_pb2.GenerationInput(chat=FRANCE), sampling=types_pb2.SamplingParams(max_tokens=4)
    )
    for _ in range(2):
        inference.Generate(plain, timeout=120)
    explained = inference_pb2.GenerateRequest(
        input=inference_pb2.GenerationInput(chat=FRANCE),
        sampling=types_pb2.SamplingParams(max_tokens=4),
        explain=types_pb2.ExplainSpec(methods=[types_pb2.MethodSpec(name="input_x_gradient")]),
    )
    response = inference.Generate(explained, timeout=300)
    assert response.explanation.state == types_pb2.EXPLANATION_STATE_SUCCEEDED
    bad = inference_pb2.GenerateRequest(
        input=inference_pb2.GenerationInput(chat=FRANCE),
        explain=types_pb2.ExplainSpec(methods=[types_pb2.MethodSpec(name="no_such_method")]),
    )
    with pytest.raises(grpc.RpcError) as refused:
        inference.Generate(bad, timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    chunks = list(
        inference.GenerateStream(inference_pb2.GenerateRequest(input=plain.input, sampling=plain.sampling), timeout=120)
    )
    assert any(chunk.delta.output_tokens for chunk in chunks)

    gateway_after, explainer_after = scrape(config.gateway_metrics_port), scrape(config.explainer_metrics_port)

    def gateway_delta(name: str, **labels: str) -> float:
        return value(gateway_after, name, **labels) - value(gateway_before, name, **labels)

    def explainer_delta(name: str, **labels: str) -> float:
        return value(explainer_after, name, **labels) - value(explainer_before, name, **labels)

    requests = "sightline_gateway_requests_total"
    assert gateway_delta(requests, rpc=GENERATE, code="OK", tenant=TENANT) == 3
    assert gateway_delta(requests, rpc=GENERATE, code="INVALID_ARGUMENT", tenant=TENANT) == 1
    assert gateway_delta(requests, rpc=STREAM, code="OK", tenant=TENANT) == 1
    assert gateway_delta("sightline_gateway_request_seconds_count", rpc=GENERATE) == 4
    assert gateway_delta("sightline_gateway_request_seconds_count", rpc=STREAM) == 1
    assert gateway_delta("sightline_gateway_time_to_first_token_seconds_count") == 1
    assert gateway_delta("sightline_gateway_explanation_wait_seconds_count") == 1
    assert gateway_delta("sightline_gateway_explanation_wait_seconds_sum") > 0
    # One audit entry per served call, refused ones included, each committed before its reply went out.
    assert gateway_delta("sightline_audit_appends_total", tenant=TENANT, kind="request") == 5

    assert explainer_delta("sightline_explainer_jobs_finished_total", state="succeeded") == 1
    assert explainer_delta("sightline_explainer_jobs_finished_total", state="failed") == 0
    cache = "sightline_explainer_hidden_state_cache_total"
    hit = "hit" if response.explanation.cache_hit else "miss"
    assert explainer_delta(cache, result=hit) == 1
    assert explainer_delta(cache, result="hit") + explainer_delta(cache, result="miss") == 1
    assert explainer_delta("sightline_explainer_method_seconds_count", method="input_x_gradient") == 1
    assert explainer_delta("sightline_explainer_method_seconds_sum", method="input_x_gradient") == pytest.approx(
        response.explanation.results[0].seconds, rel=1e-6
    )
    assert explainer_delta("sightline_explainer_fidelity_max_abs_logprob_diff_count") == 1
    assert explainer_delta("sightline_explainer_fidelity_max_abs_logprob_diff_sum") == pytest.approx(
        response.explanation.fidelity.max_abs_logprob_diff, rel=1e-5
    )
    assert explainer_delta("sightline_explainer_job_seconds_count") == 1
    # Nothing is left in the queue: the gauges read the consumer group when scraped.
    assert value(explainer_after, "sightline_explanation_queue_length") == 0
    assert value(explainer_after, "sightline_explanation_consumer_group_lag") == 0
    assert value(explainer_after, "sightline_explanation_jobs", state="in_progress") == 0
