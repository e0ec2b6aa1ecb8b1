"""A gateway process of its own in front of the session stack's vLLM, with a Redis server of its own.

Tests that fill the explanation queue (backpressure) or send thousands of requests (fuzzing) run
against it, so none of their jobs reaches the session's explainer worker and slows the tests after
them. Its Redis gets the catalog and model records the session's worker published (copied byte
for byte), so requests are validated exactly as on the session stack, and the consumer group a
worker creates; no worker reads it, so every job the gateway accepts stays unfinished.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.jobs import CATALOG_KEY, JOB_STREAM, MODELS_KEY, WORKER_GROUP
from deploy.local_stack import Child, LocalStack, free_port
from tests.gateway_process import GatewayProcess

HOST = "127.0.0.1"


@dataclass(frozen=True)
class IsolatedGateway:
    address: str
    redis_url: str
    redis: redis.Redis
    # Its redis-server, for tests that stop it.
    redis_server: Child

    def serving(self) -> bool:
        with grpc.insecure_channel(self.address) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
            except grpc.RpcError:
                return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


@contextlib.contextmanager
def isolated_gateway(
    stack: LocalStack, name: str, state_dir: Path, env: Mapping[str, str]
) -> Iterator[IsolatedGateway]:
    """Start Redis and a gateway (tests/gateway_process.py) on free ports; ``env`` adds gateway settings."""
    redis_url = f"redis://{HOST}:{free_port()}/0"
    server = Child(
        f"{name}-redis",
        ["redis-server", "--bind", HOST, "--port", redis_url.rsplit(":", 1)[1].split("/")[0], "--save", "",
         "--appendonly", "no", "--dir", str(state_dir)],
        dict(os.environ),
        state_dir / "redis.log",
    )  # fmt: skip
    client = redis.Redis.from_url(redis_url)
    try:
        _wait_for_redis(client, server)
        with redis.Redis.from_url(stack.config.redis_url) as session:
            for key in (CATALOG_KEY, MODELS_KEY):
                client.restore(key, 0, cast(bytes, session.dump(key)))
        client.xgroup_create(JOB_STREAM, WORKER_GROUP, id="0", mkstream=True)
        # No trace export: thousands of fuzzed requests would only crowd the session's collector.
        gateway_env = {"SIGHTLINE_REDIS_URL": redis_url, "OTEL_TRACES_EXPORTER": "none", **env}
        with GatewayProcess(stack, name, gateway_env) as gateway:
            yield IsolatedGateway(gateway.address, redis_url, client, server)
    finally:
        client.close()
        server.stop()


def _wait_for_redis(client: redis.Redis, server: Child, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"redis-server exited: {server.log_tail()}")
        with contextlib.suppress(redis.RedisError):
            if client.ping():
                return
        time.sleep(0.1)
    raise RuntimeError(f"redis-server was not ready within {timeout:.0f} s: {server.log_tail()}")
