"""Prometheus pieces shared by the gateway and the explainer: the listen-address format and its HTTP server."""

from __future__ import annotations

import logging
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)

# Seconds: from a millisecond to the longest explanation a SYNC call may wait for.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# Disabled: a listen address given as this (or empty) starts no metrics server.
OFF = "off"


def parse_listen(listen: str) -> tuple[str, int] | None:
    """``HOST:PORT`` as a pair; None for "" or "off". Raises ValueError naming the setting's format."""
    listen = listen.strip()
    if not listen or listen.lower() == OFF:
        return None
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"a listen address is HOST:PORT (or 'off'); got {listen[:80]!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class MetricsServer:
    """The /metrics HTTP endpoint of one process, on its own thread (prometheus_client's server)."""

    def __init__(self, server: WSGIServer, address: tuple[str, int]) -> None:
        self._server = server
        self.address = address

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}/metrics"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def start_metrics_server(listen: str, registry: CollectorRegistry, component: str) -> MetricsServer | None:
    """Serve ``registry`` on ``listen``; None when metrics are off or the address cannot be bound (logged: a busy
    metrics port must not keep the component itself from serving)."""
    address = parse_listen(listen)
    if address is None:
        return None
    host, port = address
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        log.warning("%s metrics are off: cannot listen on %s (%s)", component, listen, exc)
        return None
    bound = (host, server.server_port)
    log.info("%s metrics on http://%s:%d/metrics", component, *bound)
    return MetricsServer(server, bound)
