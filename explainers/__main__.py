"""Run one explainer worker: ``python -m explainers [--model-dir DIR] [--redis-url URL]``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from types import FrameType

import redis
import torch
from opentelemetry.sdk.trace import TracerProvider

from common.telemetry import configure_tracing
from explainers import metrics
from explainers.architectures import UnsupportedArchitectureError
from explainers.embedded_model import default_model_dir
from explainers.model import load_explained_model
from explainers.vlm import LoadedVlm
from explainers.worker import ExplainerWorker, WorkerSettings

log = logging.getLogger(__name__)


class GracefulShutdown:
    """SIGTERM or SIGINT: take no new job and let the one in hand finish, for at most ``grace_seconds``;
    then hand it back to the other workers and exit 0 without finishing it."""

    def __init__(self, grace_seconds: float, provider: TracerProvider) -> None:
        self.grace_seconds = grace_seconds
        self.requested = threading.Event()
        self.worker: ExplainerWorker | None = None
        self._provider = provider

    def request(self, signum: int, frame: FrameType | None) -> None:
        if self.requested.is_set():
            return
        log.info("stopping: finishing the job in hand, for at most %.1f s", self.grace_seconds)
        self.requested.set()
        threading.Thread(target=self._exit_after_grace, name="shutdown-grace", daemon=True).start()

    def _exit_after_grace(self) -> None:
        # Runs out the grace only when the main thread has not returned by then.
        time.sleep(self.grace_seconds)
        try:
            self._hand_back_held_job()
        finally:
            # Whatever became of the hand-back, this thread is the process's way out once the grace has run.
            self._provider.force_flush(timeout_millis=2000)
            os._exit(0)

    def _hand_back_held_job(self) -> None:
        try:
            held = self.worker.abandon_held_job() if self.worker is not None else None
        except redis.RedisError as exc:
            # Exiting is what was asked, and Redis being down must not keep the worker up: the job stays pending in
            # this worker's name, and another worker claims it once it has been idle for the claim timeout.
            log.warning(
                "could not hand the job in hand back (Redis: %s); exiting anyway: another worker claims it once it "
                "has been idle for the claim timeout",
                exc,
            )
            return
        if held is not None:
            log.warning(
                "explanation %s not finished within the %.1f s shutdown grace; handed back to the other workers",
                held.record.explanation_id,
                self.grace_seconds,
            )


def env_option(
    parser: argparse.ArgumentParser, flag: str, env: str, kind: type[int | float], default: int | float, help: str
) -> None:
    """A numeric option whose default comes from the environment variable env, if set."""
    parser.add_argument(flag, type=kind, default=kind(os.environ.get(env, default)), help=f"{help} ({env})")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m explainers", description=__doc__)
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=Path(os.environ.get("SIGHTLINE_MODEL_DIR", default_model_dir())),
        help="local model directory (SIGHTLINE_MODEL_DIR); the same weights vLLM serves",
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("SIGHTLINE_REDIS_URL", "redis://127.0.0.1:6379/0"), help="Redis URL"
    )
    parser.add_argument(
        "--consumer", default=f"{socket.gethostname()}-{os.getpid()}", help="consumer name in the Redis group"
    )
    env_option(parser, "--threads", "SIGHTLINE_EXPLAINER_THREADS", int, 1, "torch intra-op threads")
    env_option(parser, "--cache-ttl", "SIGHTLINE_HIDDEN_CACHE_TTL", int, 3600, "seconds hidden states stay cached")
    env_option(
        parser,
        "--job-retention-seconds",
        "SIGHTLINE_JOB_RETENTION_SECONDS",
        int,
        3600,
        "how long an acknowledged job stays in the job stream before workers delete it",
    )
    env_option(parser, "--max-attempts", "SIGHTLINE_MAX_ATTEMPTS", int, 3, "tries of a job before it fails")
    env_option(
        parser,
        "--claim-idle-ms",
        "SIGHTLINE_CLAIM_IDLE_MS",
        int,
        60000,
        "how long a job may sit unrenewed in a worker's hands before another worker claims it",
    )
    env_option(
        parser,
        "--shutdown-grace-seconds",
        "SIGHTLINE_WORKER_SHUTDOWN_GRACE_SECONDS",
        float,
        25.0,
        "on SIGTERM, how long the job in hand may take to finish before it is handed back to other workers",
    )
    parser.add_argument(
        "--metrics-listen",
        default=os.environ.get("SIGHTLINE_METRICS_LISTEN", metrics.DEFAULT_LISTEN),
        help="HOST:PORT of the Prometheus /metrics endpoint, or 'off' (SIGHTLINE_METRICS_LISTEN)",
    )
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s explainer %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    provider = configure_tracing("sightline-explainer")

    shutdown = GracefulShutdown(args.shutdown_grace_seconds, provider)
    signal.signal(signal.SIGTERM, shutdown.request)
    signal.signal(signal.SIGINT, shutdown.request)

    try:
        loaded = load_explained_model(args.model_dir)
    except UnsupportedArchitectureError as error:
        # A configuration error, not a crash: the reason alone, and no restart will change it.
        provider.shutdown()
        sys.exit(f"explainer: cannot explain the model in {args.model_dir}: {error}")
    # Named after the consumer, so CLIENT LIST tells which worker each connection belongs to.
    client = redis.Redis.from_url(
        args.redis_url, socket_connect_timeout=2, socket_timeout=30, client_name=args.consumer
    )
    metrics.serve(args.metrics_listen, client)
    worker = ExplainerWorker(
        client,
        loaded,
        WorkerSettings(
            consumer=args.consumer,
            max_attempts=args.max_attempts,
            claim_idle_ms=args.claim_idle_ms,
            cache_ttl_seconds=args.cache_ttl,
            job_retention_seconds=args.job_retention_seconds,
        ),
    )
    shutdown.worker = worker
    worker.register()
    log.info(
        "explainer %s ready: model %s (%s, %s, %s) on %s",
        args.consumer,
        loaded.model_name,
        loaded.weights_digest[:12],
        loaded.architecture if isinstance(loaded, LoadedVlm) else loaded.architecture.model_type,
        "image methods" if isinstance(loaded, LoadedVlm) else f"{loaded.path.value} path",
        args.redis_url,
    )
    try:
        worker.run(shutdown.requested)
    finally:
        provider.shutdown()
    log.info("explainer %s stopped", args.consumer)


if __name__ == "__main__":
    main()
