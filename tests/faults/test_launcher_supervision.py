"""`make serve`'s launcher supervises: a SIGKILLed explainer worker, gateway or Redis, and a vLLM that stops
answering /health, come back by themselves; a child that keeps failing fast makes it stop the stack and exit 1.

One real launcher (``python -m deploy.local_stack``, the whole stack with a vLLM of its own) for the module, with
short backoffs and probes; the tests run in order and the last one makes it give up.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil
import pytest
from sightline.v1 import explanations_pb2, explanations_pb2_grpc, inference_pb2, types_pb2

from common.jobs import JOB_STREAM
from deploy.local_stack import free_port
from tests.faults.cluster import (
    INFERENCE_SERVICE,
    LONG_JOB_OUTPUT,
    LONG_JOB_PROMPT,
    MODEL_DIR,
    SERVING,
    FaultCluster,
    explain_request,
    wait_until,
)

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
GIVE_UP_AFTER = 3
VLLM_HEALTH_INTERVAL_S = 2
VLLM_HEALTH_FAILURES = 3
SYNC_DEADLINE = 240.0
HELLO = inference_pb2.GenerateRequest(
    input=inference_pb2.GenerationInput(prompt="Hello"), sampling=types_pb2.SamplingParams(max_tokens=4)
)


class Launcher:
    """The launcher process, its output (stdout and stderr, line by line, as it comes) and the stack's state."""

    def __init__(self, cluster: FaultCluster, state_dir: Path) -> None:
        config = cluster.config
        self.cluster = cluster
        self.state_dir = state_dir
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "deploy.local_stack",
                "--model-dir", str(MODEL_DIR), "--state-dir", str(state_dir),
                "--gateway-port", str(config.gateway_port), "--vllm-port", str(config.vllm_port),
                "--redis-port", str(config.redis_port),
                "--restart-backoff-base", "0.5", "--restart-backoff-max", "2", "--fast-failure-window", "20",
                "--give-up-after", str(GIVE_UP_AFTER),
                "--vllm-health-interval", str(VLLM_HEALTH_INTERVAL_S),
                "--vllm-health-failures", str(VLLM_HEALTH_FAILURES),
            ],
            cwd=ROOT,
            # A short claim timeout, so that the restarted worker takes its predecessor's job back soon.
            env={**os.environ, "SIGHTLINE_CLAIM_IDLE_MS": "2000", "SIGHTLINE_HEALTH_INTERVAL_SECONDS": "0.5"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def said(self, text: str) -> int:
        """How many lines of its output contain ``text``."""
        return sum(text in line for line in list(self.lines))

    def wait_for_output(self, text: str, timeout: float, count: int = 1) -> None:
        def said_it() -> bool:
            assert self.process.poll() is None or self.said(text) >= count, (
                f"the launcher exited with {self.process.returncode}:\n{self.output()[-6000:]}"
            )
            return self.said(text) >= count

        wait_until(said_it, timeout, f"{text!r} in the launcher's output", interval=0.2)

    def child(self, marker: str) -> psutil.Process:
        """The launcher's child whose command line contains ``marker``."""
        (found,) = [p for p in psutil.Process(self.process.pid).children() if marker in " ".join(p.cmdline())]
        return found

    def log(self, name: str) -> str:
        return (self.state_dir / "logs" / f"{name}.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    state_dir = tmp_path_factory.mktemp("supervised")
    # Only for its free ports and its helpers that read the stack's Redis and call its gateway: it starts nothing.
    cluster = FaultCluster(state_dir, vllm_port=free_port())
    launcher = Launcher(cluster, state_dir)
    try:
        launcher.wait_for_output("is SERVING", 600)
        launcher.wait_for_output("press Ctrl-C to stop", 10)
        yield launcher
    finally:
        # What a person would have seen, for whoever reads a failure.
        (state_dir / "launcher-output.txt").write_text(launcher.output())
        if launcher.process.poll() is None:
            launcher.process.send_signal(signal.SIGTERM)
            try:
                launcher.process.wait(120)
            except subprocess.TimeoutExpired:
                launcher.process.kill()
        cluster.close()


def test_the_summary_says_how_children_are_restarted(launcher: Launcher) -> None:
    output = launcher.output()
    assert "restarts         a child that exits, vLLM also after 3 failed /health probes 2 s apart:" in output
    assert "gives up after 3 fast failures in a row (before ready or within 20 s of it)" in output


def test_a_killed_worker_comes_back_and_finishes_the_job_it_held_exactly_once(launcher: Launcher) -> None:
    cluster = launcher.cluster
    cluster.redis.config_resetstat()
    jobs_before = cluster.redis.xlen(JOB_STREAM)
    with cluster.stubs() as (_, explanations), ThreadPoolExecutor(1) as pool:
        call = pool.submit(explanations.Explain, explain_request(types_pb2.EXPLAIN_MODE_SYNC), timeout=SYNC_DEADLINE)
        explanation_id = cluster.newest_job(jobs_before)
        cluster.running(explanation_id, attempt=1)
        victim = launcher.child("-m explainers")
        victim.send_signal(signal.SIGKILL)
        launcher.wait_for_output("explainer was killed by SIGKILL; restarting it", 30)
        response = call.result()

    explanation = response.explanation
    assert explanation.explanation_id == explanation_id
    assert explanation.state == types_pb2.EXPLANATION_STATE_SUCCEEDED, explanation.error
    # The first attempt died with its worker; the restarted worker made the second.
    assert explanation.attempts == 2
    (result,) = explanation.results
    assert tuple(result.attributions.shape) == (len(LONG_JOB_OUTPUT), len(LONG_JOB_PROMPT) + len(LONG_JOB_OUTPUT) - 1)
    # One job, one record (what the client got), acknowledged once, nothing left pending.
    assert len(cluster.job_entries(explanation_id)) == 1
    assert cluster.record(explanation_id) == explanation
    assert cluster.pending() == []
    assert cluster.xack_calls() == 1
    assert launcher.child("-m explainers").pid != victim.pid
    launcher.wait_for_output("explainer is ready again", 10)
    assert launcher.said("explainer restarted (restart 1, pid") == 1
    log = launcher.log("explainer")
    assert "launcher: restarting explainer (restart 1: it was killed by SIGKILL)" in log
    # The restarted worker appends to the same log: its predecessor's start is still there.
    assert log.count("launcher: starting explainer") == 1
    assert log.index("launcher: starting explainer") < log.index("launcher: restarting explainer")


def test_a_killed_gateway_comes_back_at_once(launcher: Launcher) -> None:
    cluster = launcher.cluster
    victim = launcher.child("-m server")
    victim.send_signal(signal.SIGKILL)
    launcher.wait_for_output("gateway was killed by SIGKILL; restarting it", 30)
    launcher.wait_for_output("gateway is ready again", 60)
    cluster.wait_for_health("", SERVING, 30)
    with cluster.stubs() as (inference, _):
        assert len(inference.Generate(HELLO, timeout=60).output_tokens) == 4
    assert launcher.child("-m server").pid != victim.pid


def test_a_killed_redis_comes_back_on_its_aof_and_the_others_reconnect(launcher: Launcher) -> None:
    cluster = launcher.cluster
    cluster.redis.set("supervision-test:kept", "yes")
    # appendfsync everysec: what was written a second ago is on disk.
    time.sleep(1.5)
    restarts_before = launcher.said(" restarted (restart ")
    victim = launcher.child("redis-server")
    victim.send_signal(signal.SIGKILL)
    launcher.wait_for_output("redis was killed by SIGKILL; restarting it", 30)
    launcher.wait_for_output("redis is ready again", 30)
    assert cluster.redis.get("supervision-test:kept") == b"yes"

    # The same gateway and worker processes reconnect by themselves: an explanation goes through.
    with cluster.stubs() as (_, explanations):
        accepted = wait_until(
            lambda: _explain_once(explanations, explain_request(types_pb2.EXPLAIN_MODE_ASYNC, "saliency")),
            60,
            "the gateway to take an explanation again",
            interval=0.5,
        )
        fetched = explanations.GetExplanation(
            explanations_pb2.GetExplanationRequest(explanation_id=accepted, wait_seconds=120), timeout=130
        ).explanation
    assert fetched.state == types_pb2.EXPLANATION_STATE_SUCCEEDED, fetched.error
    assert launcher.said(" restarted (restart ") == restarts_before + 1, "only Redis was restarted"


def _explain_once(
    explanations: explanations_pb2_grpc.ExplanationsServiceStub, request: explanations_pb2.ExplainRequest
) -> str | None:
    """The id of an accepted explanation, or None while the gateway answers UNAVAILABLE (Redis not reconnected)."""
    try:
        return str(explanations.Explain(request, timeout=10).explanation_id)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        return None


def test_a_hung_vllm_is_killed_and_restarted(launcher: Launcher) -> None:
    cluster = launcher.cluster
    hung = launcher.child("vllm.entrypoints.openai.api_server")
    group = [hung, *hung.children(recursive=True)]
    os.killpg(hung.pid, signal.SIGSTOP)
    launcher.wait_for_output(
        f"vllm did not answer GET /health {VLLM_HEALTH_FAILURES} times in a row ({VLLM_HEALTH_INTERVAL_S} s apart); "
        "restarting it",
        60,
    )
    _, left = psutil.wait_procs(group, timeout=30)
    assert not left, "the hung vLLM and its engine core are gone"
    launcher.wait_for_output("vllm is ready again", 600)
    cluster.wait_for_health(INFERENCE_SERVICE, SERVING, 30)
    with cluster.stubs() as (inference, _):
        assert len(inference.Generate(HELLO, timeout=120).output_tokens) == 4


def test_a_child_that_keeps_failing_fast_stops_the_stack_with_its_reason(launcher: Launcher) -> None:
    config = launcher.cluster.config
    descendants = psutil.Process(launcher.process.pid).children(recursive=True)
    # Redis will not start on a damaged AOF manifest: every restart fails at once.
    manifest = launcher.state_dir / "redis" / "appendonlydir" / "appendonly.aof.manifest"
    manifest.write_text("not a manifest\n")
    restarts_before = launcher.said("redis restarted (restart ")
    killed_after_healthy_run = launcher.said("redis was killed by SIGKILL; restarting it now")
    launcher.child("redis-server").send_signal(signal.SIGKILL)

    assert launcher.process.wait(180) == 1
    output = launcher.output()
    assert (
        f"error: giving up on redis: it failed {GIVE_UP_AFTER} times in a row, each time before it was ready or "
        "within 20 s of it; last it exited with code 1 before it was ready." in output
    )
    assert "Invalid AOF manifest file format" in output
    assert "stopping the stack" in output and "stopped after giving up" in output
    # Redis had run healthy since its restart in an earlier test (longer ago than the window, vLLM's restart came
    # between): the kill is no fast failure and is restarted at once; then every restart fails fast.
    assert launcher.said("redis was killed by SIGKILL; restarting it now") == killed_after_healthy_run + 1
    assert launcher.said("redis restarted (restart ") - restarts_before == GIVE_UP_AFTER
    _, orphans = psutil.wait_procs(descendants, timeout=10)
    assert not orphans, f"left behind: {[p.pid for p in orphans]}"
    # Nothing listens any more. SO_REUSEADDR: the killed Redis's connections linger in TIME_WAIT on its port.
    for port in (config.gateway_port, config.vllm_port, config.redis_port):
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", port))
