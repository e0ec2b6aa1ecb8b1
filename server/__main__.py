"""Run the gateway: ``python -m server [--listen HOST:PORT] [--vllm-url URL] [--redis-url URL]``."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal

from common.telemetry import configure_tracing
from server.app import serve
from server.config import GatewaySettings


def main() -> None:
    defaults = GatewaySettings.from_env()
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__)
    parser.add_argument("--listen", default=defaults.listen, help="gRPC listen address (SIGHTLINE_GATEWAY_LISTEN)")
    parser.add_argument("--vllm-url", default=defaults.vllm_url, help="vLLM OpenAI server URL (SIGHTLINE_VLLM_URL)")
    parser.add_argument("--redis-url", default=defaults.redis_url, help="Redis URL (SIGHTLINE_REDIS_URL)")
    args = parser.parse_args()
    settings = dataclasses.replace(defaults, listen=args.listen, vllm_url=args.vllm_url, redis_url=args.redis_url)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s gateway %(levelname)s %(name)s: %(message)s")
    provider = configure_tracing("sightline-gateway")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop=stop)

    try:
        asyncio.run(run())
    finally:
        provider.shutdown()


if __name__ == "__main__":
    main()
