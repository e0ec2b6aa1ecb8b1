"""Run the gateway: ``python -m server [--listen HOST:PORT] [--vllm-url URL] [--redis-url URL] [TLS flags]``.

API keys, per-tenant limits and TLS are described in docs/security.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys

from common.telemetry import configure_tracing
from server.app import serve
from server.config import GatewaySettings
from server.errors import ConfigError

log = logging.getLogger("server")


def main() -> None:
    try:
        defaults = GatewaySettings.from_env()
    except ConfigError as exc:
        print(f"python -m server: {exc}", file=sys.stderr)
        sys.exit(2)
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__)
    parser.add_argument("--listen", default=defaults.listen, help="gRPC listen address (SIGHTLINE_GATEWAY_LISTEN)")
    parser.add_argument("--vllm-url", default=defaults.vllm_url, help="vLLM OpenAI server URL (SIGHTLINE_VLLM_URL)")
    parser.add_argument("--redis-url", default=defaults.redis_url, help="Redis URL (SIGHTLINE_REDIS_URL)")
    parser.add_argument(
        "--tls-cert", default=defaults.tls_cert_file, help="PEM certificate chain; turns TLS on (SIGHTLINE_TLS_CERT)"
    )
    parser.add_argument("--tls-key", default=defaults.tls_key_file, help="PEM private key (SIGHTLINE_TLS_KEY)")
    parser.add_argument(
        "--tls-client-ca",
        default=defaults.tls_client_ca_file,
        help="PEM CA bundle; clients must present a certificate it signed (SIGHTLINE_TLS_CLIENT_CA)",
    )
    parser.add_argument(
        "--health-listen",
        default=defaults.health_listen,
        help="extra plaintext address serving only grpc.health.v1, for probes (SIGHTLINE_HEALTH_LISTEN)",
    )
    parser.add_argument(
        "--metrics-listen",
        default=defaults.metrics_listen,
        help="HOST:PORT of the Prometheus /metrics endpoint, or 'off' (SIGHTLINE_METRICS_LISTEN)",
    )
    parser.add_argument(
        "--viewer-listen",
        default=defaults.viewer_listen,
        help="HOST:PORT of the explanation viewer page, or 'off' (SIGHTLINE_VIEWER_LISTEN)",
    )
    args = parser.parse_args()
    settings = dataclasses.replace(
        defaults,
        listen=args.listen,
        vllm_url=args.vllm_url,
        redis_url=args.redis_url,
        tls_cert_file=args.tls_cert,
        tls_key_file=args.tls_key,
        tls_client_ca_file=args.tls_client_ca,
        health_listen=args.health_listen,
        metrics_listen=args.metrics_listen,
        viewer_listen=args.viewer_listen,
    )

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
    except ConfigError as exc:
        log.error("cannot start: %s", exc)
        sys.exit(2)
    finally:
        provider.shutdown()


if __name__ == "__main__":
    main()
