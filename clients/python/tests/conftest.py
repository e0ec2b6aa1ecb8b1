from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from fake_sightline import FakeSightline
from sightline.v1 import explanations_pb2_grpc, inference_pb2_grpc


@pytest.fixture
def fake() -> Iterator[FakeSightline]:
    """A FakeSightline served on a free localhost port; its ``target`` is the address."""
    fake = FakeSightline()
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(fake, server)
    explanations_pb2_grpc.add_ExplanationsServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    fake.target = f"127.0.0.1:{port}"
    yield fake
    server.stop(grace=None)
