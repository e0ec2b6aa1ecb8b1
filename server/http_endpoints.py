"""The gateway's HTTP endpoints beside gRPC: Prometheus /metrics and the explanation viewer (docs/observability.md)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aiohttp import web

from common.metrics import MetricsServer, parse_listen, start_metrics_server
from server.auth import Authenticator
from server.config import GatewaySettings
from server.explanations import ExplanationBroker
from server.limits import TenantLimiter
from server.metrics import REGISTRY
from server.viewer.app import Viewer, start_viewer
from server.viewer.token_texts import Detokenizer, TokenTexts

log = logging.getLogger(__name__)


@dataclass
class HttpEndpoints:
    metrics: MetricsServer | None
    viewer: web.AppRunner | None

    async def stop(self) -> None:
        if self.viewer is not None:
            await self.viewer.cleanup()
        if self.metrics is not None:
            self.metrics.stop()


async def start_http_endpoints(
    settings: GatewaySettings,
    authenticator: Authenticator,
    limiter: TenantLimiter,
    broker: ExplanationBroker,
    vllm: Detokenizer,
) -> HttpEndpoints:
    """Start what the settings turn on. A port that cannot be bound is logged and left off: the gRPC API, which
    does not need it, still serves."""
    metrics = start_metrics_server(settings.metrics_listen, REGISTRY, "gateway")
    runner = None
    address = parse_listen(settings.viewer_listen)
    if address is not None:
        viewer = Viewer(
            authenticator, limiter, broker, TokenTexts(vllm), trace_url_template=settings.trace_url_template
        )
        try:
            runner = await start_viewer(viewer, *address)
        except OSError as exc:
            log.warning("explanation viewer is off: cannot listen on %s (%s)", settings.viewer_listen, exc)
        else:
            log.info("explanation viewer on http://%s:%d/", *address)
    return HttpEndpoints(metrics, runner)
