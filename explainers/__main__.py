"""Run one explainer worker: ``python -m explainers [--model-dir DIR] [--redis-url URL]``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
from pathlib import Path
from types import FrameType

import redis
import torch

from common.telemetry import configure_tracing
from explainers.embedded_model import default_model_dir
from explainers.model import load_model
from explainers.worker import ExplainerWorker, WorkerSettings


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
    parser.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("SIGHTLINE_EXPLAINER_THREADS", "1")),
        help="torch intra-op threads (SIGHTLINE_EXPLAINER_THREADS)",
    )
    parser.add_argument(
        "--cache-ttl", type=int, default=int(os.environ.get("SIGHTLINE_HIDDEN_CACHE_TTL", "3600")), help="seconds"
    )
    parser.add_argument("--max-attempts", type=int, default=int(os.environ.get("SIGHTLINE_MAX_ATTEMPTS", "3")))
    parser.add_argument("--claim-idle-ms", type=int, default=int(os.environ.get("SIGHTLINE_CLAIM_IDLE_MS", "60000")))
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s explainer %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    provider = configure_tracing("sightline-explainer")

    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        # The job in hand is finished before the loop sees this.
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    loaded = load_model(args.model_dir)
    client = redis.Redis.from_url(args.redis_url, socket_connect_timeout=2, socket_timeout=30)
    worker = ExplainerWorker(
        client,
        loaded,
        WorkerSettings(
            consumer=args.consumer,
            max_attempts=args.max_attempts,
            claim_idle_ms=args.claim_idle_ms,
            cache_ttl_seconds=args.cache_ttl,
        ),
    )
    worker.register()
    logging.getLogger(__name__).info(
        "explainer %s ready: model %s (%s) on %s",
        args.consumer,
        loaded.model_name,
        loaded.weights_digest[:12],
        args.redis_url,
    )
    try:
        worker.run(stop)
    finally:
        provider.shutdown()


if __name__ == "__main__":
    main()
