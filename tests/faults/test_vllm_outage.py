"""vLLM absent, hung and killed under one running gateway: prompt errors, health that follows, no restart.

The only vLLM this suite starts itself: the gateway comes up before it, watches it start, hang
(SIGSTOP), resume and die.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import grpc
import pytest
from sightline.v1 import inference_pb2, types_pb2

from deploy.local_stack import Child, free_port
from tests.faults.cluster import (
    EXPLANATIONS_SERVICE,
    INFERENCE_SERVICE,
    NOT_SERVING,
    SERVING,
    FaultCluster,
    wait_until,
)

pytestmark = pytest.mark.e2e

# A refusal this much slower than a round trip would mean the gateway waited instead of failing fast.
FAIL_FAST_SECONDS = 1.0
SHORT_DEADLINE = 2.0
HELLO = inference_pb2.GenerateRequest(
    input=inference_pb2.GenerationInput(prompt="Hello"), sampling=types_pb2.SamplingParams(max_tokens=4)
)


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultCluster]:
    # A free port: nothing listens on it until the test starts vLLM there.
    cluster = FaultCluster(
        tmp_path_factory.mktemp("vllm-outage"),
        vllm_port=free_port(),
        env={"SIGHTLINE_HEALTH_INTERVAL_SECONDS": "0.5"},
    )
    try:
        cluster.start_redis()
        cluster.start_worker()
        cluster.start_gateway()
        yield cluster
    finally:
        cluster.close()


def _generate_error(cluster: FaultCluster, timeout: float) -> tuple[grpc.RpcError, float]:
    with cluster.stubs() as (inference, _):
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            inference.Generate(HELLO, timeout=timeout)
    return caught.value, time.monotonic() - started


def _generates(cluster: FaultCluster) -> None:
    with cluster.stubs() as (inference, _):
        assert len(inference.Generate(HELLO, timeout=60).output_tokens) == 4


def _signal_group(child: Child, sig: signal.Signals) -> None:
    # vLLM's API server and its engine core share the child's process group.
    os.killpg(child.process.pid, sig)


def test_gateway_follows_vllm_through_absence_hang_and_death(cluster: FaultCluster) -> None:
    gateway = cluster.gateway
    assert gateway is not None

    # Nothing listens on the vLLM port: refused at once, NOT_SERVING for inference and overall.
    error, elapsed = _generate_error(cluster, timeout=30)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert f"vLLM backend at {cluster.config.vllm_url} is not ready yet" in (error.details() or "")
    assert "retry" in (error.details() or "")
    assert elapsed < FAIL_FAST_SECONDS
    assert cluster.health(INFERENCE_SERVICE) == NOT_SERVING
    assert cluster.health("") == NOT_SERVING

    # vLLM starts on that port: the same gateway process turns SERVING and generates.
    vllm = cluster.start_vllm()
    cluster.ensure_workers(1)

    def inference_serving() -> bool:
        assert vllm.alive(), f"vLLM exited with {vllm.process.returncode}:\n{vllm.log_tail()}"
        return cluster.health(INFERENCE_SERVICE) == SERVING

    wait_until(inference_serving, 600, "the gateway to report vLLM SERVING", interval=0.5)
    cluster.wait_for_health("", SERVING, 10)
    _generates(cluster)

    try:
        # vLLM hangs: a call with a short deadline ends on time; the gateway's own health still answers.
        _signal_group(vllm, signal.SIGSTOP)
        error, elapsed = _generate_error(cluster, timeout=SHORT_DEADLINE)
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert elapsed < SHORT_DEADLINE + FAIL_FAST_SECONDS
        answered = time.monotonic()
        assert cluster.health(EXPLANATIONS_SERVICE) == SERVING
        assert time.monotonic() - answered < FAIL_FAST_SECONDS
        # The gateway's probe of vLLM times out (2 s), and inference turns NOT_SERVING.
        cluster.wait_for_health(INFERENCE_SERVICE, NOT_SERVING, 10)
    finally:
        _signal_group(vllm, signal.SIGCONT)

    # vLLM resumes: SERVING again, generation works.
    cluster.wait_for_health(INFERENCE_SERVICE, SERVING, 30)
    _generates(cluster)

    # vLLM dies: refused at once with a retry hint, NOT_SERVING; the gateway stays up and keeps serving the rest.
    _signal_group(vllm, signal.SIGKILL)
    vllm.process.wait(30)
    error, elapsed = _generate_error(cluster, timeout=30)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert f"vLLM backend at {cluster.config.vllm_url} is unreachable" in (error.details() or "")
    assert "retry in a few seconds" in (error.details() or "")
    assert elapsed < FAIL_FAST_SECONDS
    cluster.wait_for_health(INFERENCE_SERVICE, NOT_SERVING, 10)
    assert cluster.health("") == NOT_SERVING
    assert cluster.health(EXPLANATIONS_SERVICE) == SERVING
    assert gateway.alive()
