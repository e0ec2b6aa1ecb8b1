"""Real gateways (``python -m server``) with the audit trail on, in front of a Redis of their own and
benchmarks/fake_vllm.py (instant tokens), for the audit tests that need several gateways, a database
of their choice, or a gateway to kill. tests/e2e/test_audit_e2e.py checks the same trail on the real stack."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.local_stack import Child, free_port

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[2]
INFERENCE_SERVICE = "sightline.v1.InferenceService"


@dataclass(frozen=True)
class Backend:
    vllm_url: str
    redis_url: str
    state_dir: Path


@contextlib.contextmanager
def backend(state_dir: Path) -> Iterator[Backend]:
    """Redis (no persistence) and the instant fake vLLM, on free ports."""
    redis_port, vllm_port = free_port(), free_port()
    logs = state_dir / "logs"
    redis_child = Child(
        "redis",
        ["redis-server", "--bind", HOST, "--port", str(redis_port), "--save", "", "--appendonly", "no"],
        dict(os.environ),
        logs / "redis.log",
    )
    vllm_child = Child(
        "fake-vllm",
        [sys.executable, str(REPO_ROOT / "benchmarks" / "fake_vllm.py"), "--port", str(vllm_port)],
        dict(os.environ),
        logs / "fake_vllm.log",
    )
    try:
        yield Backend(f"http://{HOST}:{vllm_port}", f"redis://{HOST}:{redis_port}/0", state_dir)
    finally:
        vllm_child.stop()
        redis_child.stop()


class Gateway:
    """One gateway process; ``kill()`` sends SIGKILL, as a crash would."""

    def __init__(self, backend: Backend, name: str, env: Mapping[str, str]) -> None:
        self.address = f"{HOST}:{free_port()}"
        self.name = name
        self._env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "clients" / "python" / "src")]),
            "SIGHTLINE_GATEWAY_LISTEN": self.address,
            "SIGHTLINE_VLLM_URL": backend.vllm_url,
            "SIGHTLINE_REDIS_URL": backend.redis_url,
            "SIGHTLINE_STATE_DIR": str(backend.state_dir),
            "OTEL_SDK_DISABLED": "true",
            **env,
        }
        self.log_path = backend.state_dir / "logs" / f"{name}.log"
        self.child = Child(name, [sys.executable, "-m", "server"], self._env, self.log_path)
        try:
            self._wait_serving(timeout=90)
        except BaseException:
            self.child.stop()
            raise

    def _wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.child.alive():
                raise RuntimeError(f"gateway {self.name} exited:\n{self.child.log_tail()}")
            with grpc.insecure_channel(self.address) as channel:
                try:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service=INFERENCE_SERVICE), timeout=2
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
            time.sleep(0.2)
        raise RuntimeError(f"gateway {self.name} not SERVING within {timeout} s:\n{self.child.log_tail()}")

    def kill(self) -> None:
        os.killpg(self.child.process.pid, signal.SIGKILL)  # no drain, no flush: nothing runs after it
        self.child.process.wait()

    def stop(self) -> None:
        self.child.stop()


def write_key_file(path: Path, keys: Mapping[str, tuple[str, str]]) -> dict[str, str]:
    """A key file with one key per id (id -> (tenant, role)); returns id -> the key in clear."""
    clear = {key_id: f"sl_test_{key_id}_{os.urandom(8).hex()}" for key_id in keys}
    entries = [
        {"id": key_id, "tenant": tenant, "sha256": hashlib.sha256(clear[key_id].encode()).hexdigest()}
        | ({"role": role} if role != "tenant" else {})
        for key_id, (tenant, role) in keys.items()
    ]
    path.write_text(json.dumps({"keys": entries}))
    return clear
