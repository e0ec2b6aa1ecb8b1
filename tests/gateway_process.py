"""A gateway started on its own (``python -m server``) with its own settings, in front of the session stack's
vLLM, Redis and explainer: for tests of settings the shared gateway must not have (keys, limits, TLS)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.local_stack import Child, LocalStack, free_port

ChannelFactory = Callable[[str], grpc.Channel]


class GatewayProcess:
    def __init__(
        self,
        stack: LocalStack,
        name: str,
        env: Mapping[str, str],
        *,
        channel: ChannelFactory = grpc.insecure_channel,
        health_service: str = "",
    ) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        self._stack = stack
        # The health service waited for: "" (overall) needs an explainer too; InferenceService only vLLM.
        self._health_service = health_service
        self._name = name
        self._env = {
            **stack.child_env(f"sightline-{name}", 1),
            "SIGHTLINE_GATEWAY_LISTEN": self.address,
            "SIGHTLINE_VLLM_URL": stack.config.vllm_url,
            "SIGHTLINE_REDIS_URL": stack.config.redis_url,
            # No well-known ports in tests: a test that needs /metrics or the viewer gives a free port in env.
            "SIGHTLINE_METRICS_LISTEN": "off",
            "SIGHTLINE_VIEWER_LISTEN": "off",
            **env,
        }
        self._channel = channel
        self.log_path = stack.config.state_dir / "logs" / f"{name}.log"
        self._child: Child | None = None

    def __enter__(self) -> GatewayProcess:
        self._child = self._spawn()
        try:
            self._wait_serving(timeout=90)
        except BaseException:
            self._child.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._child is not None:
            self._child.stop()

    def exit_code(self, timeout: float = 60) -> int:
        """Run a gateway expected to refuse its settings and stop at once; its exit status."""
        child = self._spawn()
        try:
            return child.process.wait(timeout)
        finally:
            child.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _spawn(self) -> Child:
        return Child(self._name, [sys.executable, "-m", "server"], self._env, self.log_path)

    def _wait_serving(self, timeout: float) -> None:
        assert self._child is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._child.alive():
                raise RuntimeError(f"gateway {self._name} exited; log {self.log_path}:\n{self._child.log_tail()}")
            with self._channel(self.address) as channel:
                try:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service=self._health_service), timeout=2
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
            time.sleep(0.3)
        raise RuntimeError(f"gateway {self._name} not SERVING within {timeout} s; log:\n{self._child.log_tail()}")
