"""One gateway process over two vLLM replica processes, one of them killed (SIGKILL) in the middle of a load of
unary and streaming calls: no call that could be retried fails, the rest fail UNAVAILABLE, and calls started
after the kill all succeed on the survivor. The gateway also serves health alone on its plaintext probe port.

The replicas are benchmarks/fake_vllm.py processes (vLLM's HTTP shapes, a fixed decode time per token): two real
vLLM servers do not fit beside the session's on two cores, and what is tested here is the gateway's routing over
real sockets and a real process death. tests/server/test_vllm_pool.py covers the routing rules one by one.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sightline.v1 import inference_pb2, inference_pb2_grpc, types_pb2

from deploy.local_stack import Child, free_port
from server.app import LIVENESS_SERVICE
from tests.faults.cluster import INFERENCE_SERVICE, SERVING, FaultCluster, wait_until

FAKE_VLLM = Path(__file__).resolve().parents[2] / "benchmarks" / "fake_vllm.py"
MODEL = "smollm2-135m-instruct"
TOKEN_MS = 40
MAX_TOKENS = 12  # about half a second per call
CLIENTS = 10
LOAD_SECONDS = 4.0
KILL_AFTER_SECONDS = 1.5


@dataclass
class CallResult:
    streaming: bool
    started: float
    ended: float
    code: grpc.StatusCode
    tokens: int
    message: str = ""


def request() -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        input=inference_pb2.GenerationInput(prompt="replicas share the load"),
        sampling=types_pb2.SamplingParams(max_tokens=MAX_TOKENS),
    )


def one_call(stub: inference_pb2_grpc.InferenceServiceStub, streaming: bool) -> CallResult:
    started = time.monotonic()
    tokens = 0
    try:
        if streaming:
            for reply in stub.GenerateStream(request(), timeout=30):
                tokens += len(reply.delta.output_tokens)
        else:
            tokens = len(stub.Generate(request(), timeout=30).output_tokens)
    except grpc.RpcError as exc:
        return CallResult(streaming, started, time.monotonic(), exc.code(), tokens, exc.details() or "")
    return CallResult(streaming, started, time.monotonic(), grpc.StatusCode.OK, tokens)


def test_killing_one_of_two_replicas_fails_only_streams_that_had_sent_tokens(tmp_path: Path) -> None:
    cluster = FaultCluster(tmp_path, vllm_port=free_port())
    replicas: list[Child] = []
    try:
        cluster.start_redis()
        urls = []
        for index in range(2):
            port = free_port()
            argv = [sys.executable, str(FAKE_VLLM), "--port", str(port), "--token-ms", str(TOKEN_MS), "--model", MODEL]
            replicas.append(cluster._spawn(f"fake-vllm-{index}", argv, cluster.launcher.child_env("fake-vllm")))
            urls.append(f"http://127.0.0.1:{port}")
        wait_until(lambda: all(_http_ok(f"{url}/health") for url in urls), 60, "both replicas to answer /health", 0.2)
        command = cluster.launcher.gateway_command()
        argv = list(command.argv)
        argv[argv.index("--vllm-url") + 1] = ",".join(urls)
        probe_address = f"127.0.0.1:{free_port()}"
        env = {**command.env, "SIGHTLINE_HEALTH_INTERVAL_SECONDS": "0.5", "SIGHTLINE_HEALTH_LISTEN": probe_address}
        gateway = cluster._spawn("gateway", argv, env)
        cluster.wait_for_health(INFERENCE_SERVICE, SERVING, 60)
        check_probe_port(probe_address)

        results: list[CallResult] = []
        lock = threading.Lock()
        load_ends = time.monotonic() + LOAD_SECONDS

        def client(index: int) -> None:
            with cluster.channel() as channel:
                stub = inference_pb2_grpc.InferenceServiceStub(channel)
                calls = 0
                while time.monotonic() < load_ends:
                    result = one_call(stub, streaming=(index + calls) % 2 == 0)
                    calls += 1
                    with lock:
                        results.append(result)

        with ThreadPoolExecutor(CLIENTS) as pool:
            running = [pool.submit(client, index) for index in range(CLIENTS)]
            time.sleep(KILL_AFTER_SECONDS)
            killed_at = time.monotonic()
            replicas[0].process.send_signal(signal.SIGKILL)
            replicas[0].process.wait(10)
            for future in running:
                future.result()

        failed = [r for r in results if r.code != grpc.StatusCode.OK]
        assert not [r for r in failed if not r.streaming], f"unary calls failed: {failed}"
        for r in failed:
            assert r.code == grpc.StatusCode.UNAVAILABLE, r
            assert r.tokens > 0 and "cannot resume on another replica" in r.message, r
            assert r.started < killed_at < r.ended, r
        # Calls were in flight on the killed replica (the gateway saw one fail there), and every one of them
        # that had not sent tokens yet was finished on the survivor.
        assert f"vLLM replica {urls[0]} failed a call" in gateway.log_path.read_text(errors="replace")
        assert len(failed) < len([r for r in results if r.started < killed_at < r.ended])
        after = [r for r in results if r.started > killed_at]
        assert after and all(r.code == grpc.StatusCode.OK and r.tokens == MAX_TOKENS for r in after)
        assert sum(r.code == grpc.StatusCode.OK for r in results if r.started < killed_at) > 0
    finally:
        for replica in replicas:
            replica.stop(timeout=10)
        cluster.close()


def check_probe_port(address: str) -> None:
    """The probe port (what Kubernetes' gRPC probes call, deploy/k8s) answers health and nothing else."""
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in (LIVENESS_SERVICE, INFERENCE_SERVICE):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == SERVING, service
        with pytest.raises(grpc.RpcError) as refused:
            inference_pb2_grpc.InferenceServiceStub(channel).Generate(request(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
