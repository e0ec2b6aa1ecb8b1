"""One gateway over two *real* vLLM servers (the session's and one this test starts), the second SIGKILLed with its
engine core in the middle of a load of unary and streaming calls.

tests/faults/test_vllm_replicas.py runs the same scenario over benchmarks/fake_vllm.py replicas, which decode at a
fixed pace and so can be loaded harder on two cores; this test checks that what the gateway's routing relies on
(vLLM's /health, its HTTP shapes, how a dying vLLM breaks its connections) holds for the real server: no unary
call fails, a stream fails UNAVAILABLE only when it had already sent tokens, and every call started after the
kill is served in full by the survivor.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from sightline.v1 import inference_pb2_grpc

from deploy.local_stack import free_port
from tests.faults.cluster import INFERENCE_SERVICE, SERVING, FaultCluster, wait_until
from tests.faults.test_vllm_replicas import CallResult, _http_ok, one_call

CLIENTS = 4
CALLS_BEFORE_KILL = 8
LOAD_AFTER_KILL_SECONDS = 8.0


def test_killing_one_of_two_real_vllm_replicas_fails_only_streams_that_had_sent_tokens(
    tmp_path: Path, vllm_port: int
) -> None:
    cluster = FaultCluster(tmp_path, vllm_port=free_port())
    try:
        second = cluster.start_vllm()
        cluster.start_redis()
        urls = [f"http://127.0.0.1:{vllm_port}", cluster.config.vllm_url]
        wait_until(lambda: all(_http_ok(f"{url}/health") for url in urls), 600, "both vLLM replicas to answer", 0.5)
        command = cluster.launcher.gateway_command()
        argv = list(command.argv)
        argv[argv.index("--vllm-url") + 1] = ",".join(urls)
        gateway = cluster._spawn("gateway", argv, {**command.env, "SIGHTLINE_HEALTH_INTERVAL_SECONDS": "0.5"})
        cluster.wait_for_health(INFERENCE_SERVICE, SERVING, 120)

        results: list[CallResult] = []
        lock = threading.Lock()
        stop_at: list[float] = []

        def client(index: int) -> None:
            with cluster.channel() as channel:
                stub = inference_pb2_grpc.InferenceServiceStub(channel)
                calls = 0
                while not stop_at or time.monotonic() < stop_at[0]:
                    result = one_call(stub, streaming=(index + calls) % 2 == 0)
                    calls += 1
                    with lock:
                        results.append(result)

        with ThreadPoolExecutor(CLIENTS) as pool:
            running = [pool.submit(client, index) for index in range(CLIENTS)]
            wait_until(lambda: len(results) >= CALLS_BEFORE_KILL, 300, f"{CALLS_BEFORE_KILL} calls before the kill")
            killed_at = time.monotonic()
            second.kill()
            stop_at.append(time.monotonic() + LOAD_AFTER_KILL_SECONDS)
            for future in running:
                future.result()

        before = [r for r in results if r.ended < killed_at]
        # Real vLLM may stop at an end-of-sequence token before max_tokens; a served call has tokens all the same.
        assert before and all(r.code == grpc.StatusCode.OK and r.tokens > 0 for r in before), before
        failed = [r for r in results if r.code != grpc.StatusCode.OK]
        assert not [r for r in failed if not r.streaming], f"unary calls failed: {failed}"
        for r in failed:
            assert r.code == grpc.StatusCode.UNAVAILABLE, r
            assert r.tokens > 0 and "cannot resume on another replica" in r.message, r
        after = [r for r in results if r.started > killed_at]
        assert after and all(r.code == grpc.StatusCode.OK and r.tokens > 0 for r in after), after
        log = gateway.log_path.read_text(errors="replace")
        # The gateway took the dead replica out of routing, whether a call failed on it or its probe did first.
        assert f"vLLM replica {urls[1]} failed" in log, log[-4000:]
    finally:
        cluster.close()
