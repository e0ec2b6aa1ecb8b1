"""Fixtures shared by the suite. The real local stack starts at most once per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
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
