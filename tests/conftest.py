"""Fixtures shared by the suite. The real local stack starts at most once per session."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
import torch
from sightline.v1 import explanations_pb2_grpc, inference_pb2_grpc

from deploy.local_stack import LocalStack, StackConfig, free_port
from explainers.embedded_model import default_model_dir
from tests.otlp_collector import OTLPCollector

# Two cores: keep this process's torch from fighting the stack's processes.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def otlp_collector() -> Iterator[OTLPCollector]:
    collector = OTLPCollector()
    collector.start()
    yield collector
    collector.stop()


@pytest.fixture(scope="session")
def stack(otlp_collector: OTLPCollector, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    config = StackConfig(
        model_dir=Path(os.environ.get("SIGHTLINE_MODEL_DIR", default_model_dir())),
        state_dir=tmp_path_factory.mktemp("stack"),
        gateway_port=free_port(),
        vllm_port=free_port(),
        redis_port=free_port(),
        otlp_endpoint=otlp_collector.endpoint,
        gateway_metrics_port=free_port(),
        explainer_metrics_port=free_port(),
        viewer_port=free_port(),
        # Export spans quickly so trace assertions do not wait for the default 5 s batch delay.
        extra_env={"OTEL_BSP_SCHEDULE_DELAY": "200"},
    )
    with LocalStack(config) as running:
        yield running


@pytest.fixture(scope="session")
def channel(stack: LocalStack) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(stack.config.gateway_address) as opened:
        yield opened


@pytest.fixture(scope="session")
def inference(channel: grpc.Channel) -> inference_pb2_grpc.InferenceServiceStub:
    return inference_pb2_grpc.InferenceServiceStub(channel)


@pytest.fixture(scope="session")
def explanations(channel: grpc.Channel) -> explanations_pb2_grpc.ExplanationsServiceStub:
    return explanations_pb2_grpc.ExplanationsServiceStub(channel)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[int]:
    """A throwaway redis-server with persistence off; yields its port."""
    executable = shutil.which("redis-server")
    if executable is None:
        # The real server is part of what these tests check; `make test` installs it.
        pytest.fail("redis-server is not installed; run the tests with `make test`, which installs it")
    port = free_port()
    server = subprocess.Popen(
        [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.05)
        client.close()
        yield port
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def redis_client(redis_server: int) -> Iterator[redis.Redis]:
    client = redis.Redis(port=redis_server)
    client.flushdb()
    yield client
    client.close()
