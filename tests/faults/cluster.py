"""Sightline components that one fault test starts, breaks and stops itself (never the session's stack).

Each component is launched exactly as ``deploy/local_stack.py`` launches it (same command line and
environment), as a separate real process on free ports: redis-server (AOF on), explainer workers,
gateways. Generation goes to a vLLM the test names; nothing here is a stand-in.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sightline.v1 import explanations_pb2, explanations_pb2_grpc, inference_pb2_grpc, types_pb2

from common.jobs import JOB_ASSIGNED_KEY, JOB_STREAM, RECORD_EXPLANATION, WORKER_GROUP, explanation_key
from deploy.local_stack import Child, LocalStack, StackConfig, free_port
from explainers.embedded_model import default_model_dir
from tests.params import param_values

MODEL_DIR = Path(os.environ.get("SIGHTLINE_MODEL_DIR", default_model_dir()))
SERVING: int = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: int = health_pb2.HealthCheckResponse.NOT_SERVING
INFERENCE_SERVICE = "sightline.v1.InferenceService"
EXPLANATIONS_SERVICE = "sightline.v1.ExplanationsService"

# A job that keeps a worker busy for several seconds on two idle cores (integrated gradients, 32 steps,
# over 16 tokens of the embedded model), so it can be interrupted part-way.
LONG_JOB_PROMPT = list(range(1000, 1012))
LONG_JOB_OUTPUT = list(range(2000, 2004))
LONG_JOB_STEPS = 32

T = TypeVar("T")


def wait_until(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``check`` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def explain_request(
    mode: types_pb2.ExplainMode, method: str = "integrated_gradients", **params: float
) -> explanations_pb2.ExplainRequest:
    """Explain the fixed long-job sequence with one method (by default the long job's integrated gradients)."""
    struct = param_values(params or ({"steps": LONG_JOB_STEPS} if method == "integrated_gradients" else {}))
    return explanations_pb2.ExplainRequest(
        prompt_token_ids=LONG_JOB_PROMPT,
        output_token_ids=LONG_JOB_OUTPUT,
        explain=types_pb2.ExplainSpec(methods=[types_pb2.MethodSpec(name=method, params=struct)], mode=mode),
    )


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class PendingEntry:
    entry_id: str
    consumer: str
    idle_ms: int


class FaultCluster:
    """Redis, explainer workers and gateways of one fault test, on free ports, with their logs in ``state_dir``."""

    def __init__(self, state_dir: Path, *, vllm_port: int, env: dict[str, str] | None = None) -> None:
        self.launcher = LocalStack(
            StackConfig(
                model_dir=MODEL_DIR,
                state_dir=state_dir,
                gateway_port=free_port(),
                vllm_port=vllm_port,
                redis_port=free_port(),
                gateway_metrics_port=free_port(),
                explainer_metrics_port=free_port(),
                viewer_port=free_port(),
                extra_env=env or {},
            )
        )
        self.config = self.launcher.config
        self.logs = state_dir / "logs"
        self.redis = redis.Redis.from_url(self.config.redis_url)
        self.redis_child: Child | None = None
        self.gateway: Child | None = None
        self.workers: dict[str, Child] = {}
        self._children: list[Child] = []
        self._names = itertools.count(1)

    def close(self) -> None:
        # Newest first, Redis last: nothing is left talking to a stopped Redis.
        for child in sorted(reversed(self._children), key=lambda child: child.name.startswith("redis")):
            child.stop(timeout=10)
        self.redis.close()

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Child:
        child = Child(name, argv, env, self.logs / f"{name}.log")
        self._children.append(child)
        return child

    # Redis

    def start_redis(self) -> None:
        command = self.launcher.redis_command()
        self.redis_child = self._spawn(f"redis-{next(self._names)}", command.argv, command.env)
        wait_until(self.launcher.redis_ready, 30, "redis-server to answer PING")

    def stop_redis(self) -> None:
        """Stop redis-server the way an operator or orchestrator does (SIGTERM: AOF flushed, then exit)."""
        assert self.redis_child is not None
        self.redis_child.process.send_signal(signal.SIGTERM)
        assert self.redis_child.process.wait(30) == 0, self.redis_child.log_tail()

    # vLLM

    def start_vllm(self) -> Child:
        """Start a real vLLM server on this cluster's vLLM port, without waiting for it (it takes a minute or two)."""
        command = self.launcher.vllm_command()
        return self._spawn(f"vllm-{next(self._names)}", command.argv, command.env)

    # Explainer workers

    def start_worker(self, env: dict[str, str] | None = None) -> str:
        """Start one explainer worker without waiting for it; returns its consumer name."""
        consumer = f"worker-{next(self._names)}"
        command = self.launcher.explainer_command(consumer)
        self.workers[consumer] = self._spawn(consumer, command.argv, {**command.env, **(env or {})})
        return consumer

    def wait_for_workers(self, *consumers: str, timeout: float = 300) -> None:
        """Until each worker polls the job stream (a connection named after it last ran XREADGROUP)."""

        def polling() -> bool:
            for consumer in consumers:
                child = self.workers[consumer]
                assert child.alive(), f"{consumer} exited with {child.process.returncode}:\n{child.log_tail()}"
            clients = self.redis.client_list()
            return set(consumers) <= {c["name"] for c in clients if c["cmd"] == "xreadgroup"}

        wait_until(polling, timeout, f"workers {consumers} to poll the job stream", interval=0.2)

    def wait_for_log(self, child: Child, text: str, timeout: float) -> None:
        def logged() -> bool:
            return text in child.log_path.read_text(errors="replace")

        wait_until(logged, timeout, f"{text!r} in {child.name}'s log", interval=0.2)

    def live_workers(self) -> list[str]:
        return [name for name, child in self.workers.items() if child.alive()]

    def ensure_workers(self, count: int, env: dict[str, str] | None = None) -> list[str]:
        """Start workers until ``count`` are alive, wait until all of them poll; return their names."""
        for _ in range(count - len(self.live_workers())):
            self.start_worker(env)
        live = self.live_workers()
        self.wait_for_workers(*live)
        return live

    def stop_workers(self) -> None:
        for consumer in self.live_workers():
            self.workers[consumer].stop()

    def kill_worker(self, consumer: str) -> None:
        child = self.workers[consumer]
        child.process.send_signal(signal.SIGKILL)
        child.process.wait(10)

    # Gateways

    def start_gateway(self, env: dict[str, str] | None = None) -> Child:
        """Stop the gateway still running, if any, start another on its address, and wait until it answers.

        The old one goes first: while it lives, it, not the new one, would answer on the address (a test that
        failed before stopping its gateway must not hand the next test a gateway it did not start).
        """
        if self.gateway is not None:
            self.gateway.stop()
        command = self.launcher.gateway_command()
        gateway = self._spawn(f"gateway-{next(self._names)}", command.argv, {**command.env, **(env or {})})
        self.gateway = gateway

        def answering() -> bool:
            assert gateway.alive(), f"{gateway.name} exited with {gateway.process.returncode}:\n{gateway.log_tail()}"
            return self.health("") is not None

        wait_until(answering, 60, "the gateway's health service to answer", interval=0.2)
        return gateway

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.config.gateway_address)

    @contextlib.contextmanager
    def stubs(
        self,
    ) -> Iterator[tuple[inference_pb2_grpc.InferenceServiceStub, explanations_pb2_grpc.ExplanationsServiceStub]]:
        with self.channel() as channel:
            yield (
                inference_pb2_grpc.InferenceServiceStub(channel),
                explanations_pb2_grpc.ExplanationsServiceStub(channel),
            )

    def health(self, service: str) -> int | None:
        """The gateway's health status for ``service``, or None when it does not answer within a second."""
        with self.channel() as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=1
                )
            except grpc.RpcError:
                return None
        return int(reply.status)

    def start_serving(self, workers: int = 1) -> None:
        """Redis, `workers` explainer workers and the gateway, until the gateway reports SERVING."""
        self.start_redis()
        for _ in range(workers):
            self.start_worker()
        self.start_gateway()
        self.ensure_workers(workers)
        self.wait_for_health("", SERVING, 60)

    def wait_for_health(self, service: str, status: int, timeout: float) -> None:
        wait_until(lambda: self.health(service) == status, timeout, f"health of {service!r} to be {status}", 0.1)

    # Redis state, read directly

    def record(self, explanation_id: str) -> types_pb2.Explanation:
        blob = self.redis.hget(explanation_key(explanation_id), RECORD_EXPLANATION)
        assert blob is not None, f"no record for {explanation_id}"
        return types_pb2.Explanation.FromString(cast(bytes, blob))

    def pending(self) -> list[PendingEntry]:
        entries = self.redis.xpending_range(JOB_STREAM, WORKER_GROUP, "-", "+", 100)
        return [
            PendingEntry(
                entry_id=_text(e["message_id"]),
                consumer=_text(e["consumer"]),
                idle_ms=int(e["time_since_delivered"]),
            )
            for e in entries
        ]

    def job_entries(self, explanation_id: str) -> list[str]:
        """Ids of the job stream's turns that enqueueing ``explanation_id`` added (one per enqueue)."""
        entries = cast(list[tuple[bytes, dict[bytes, bytes]]], self.redis.xrange(JOB_STREAM))
        wanted = explanation_id.encode()
        return [entry_id.decode() for entry_id, fields in entries if fields[b"explanation_id"] == wanted]

    def newest_job(self, after: int) -> str:
        """Wait until the job stream holds more than ``after`` entries; the newest one's explanation id."""

        def newest() -> str | None:
            if self.redis.xlen(JOB_STREAM) <= after:
                return None
            ((_, fields),) = cast(list[tuple[bytes, dict[bytes, bytes]]], self.redis.xrevrange(JOB_STREAM, count=1))
            return fields[b"explanation_id"].decode()

        return wait_until(newest, 60, "a new job in the stream")

    def turn(self, explanation_id: str) -> str | None:
        """The job stream entry (turn) that runs ``explanation_id``, once a worker has taken one for it."""
        assigned = cast(dict[bytes, bytes], self.redis.hgetall(JOB_ASSIGNED_KEY))
        return next((turn.decode() for turn, job in assigned.items() if job.decode() == explanation_id), None)

    def running(self, explanation_id: str, attempt: int) -> str:
        """Wait until attempt ``attempt`` of the job is RUNNING; return the consumer holding it."""

        def holder() -> str | None:
            record = self.record(explanation_id)
            if record.state != types_pb2.EXPLANATION_STATE_RUNNING or record.attempts != attempt:
                return None
            turn = self.turn(explanation_id)
            return next((p.consumer for p in self.pending() if p.entry_id == turn), None)

        return wait_until(holder, 120, f"attempt {attempt} of {explanation_id} to run")

    def xack_calls(self) -> int:
        stats = cast(dict[str, dict[str, int]], self.redis.info("commandstats"))
        return int(stats.get("cmdstat_xack", {}).get("calls", 0))
