"""Assemble and run the gateway: gRPC services, health, reflection, dependency monitoring."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from sightline.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    explanations_pb2,
    explanations_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
)

from server.audit.service import AuditServicer
from server.audit.trail import open_trail
from server.auth import Authenticator
from server.config import GatewaySettings
from server.explanations import ExplanationBroker
from server.http_endpoints import start_http_endpoints
from server.job_control import JobControl
from server.keys import configured_keys
from server.limits import TenantLimiter
from server.reflection import enable_reflection
from server.rpc import DecodeErrorsAsInvalidArgument
from server.servicers import ExplanationsServicer, Gateway, InferenceServicer
from server.shutdown import DrainingInterceptor
from server.tls import server_credentials
from server.vllm_client import ServedModel
from server.vllm_pool import VLLMPool

log = logging.getLogger(__name__)

INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
EXPLANATIONS_SERVICE = explanations_pb2.DESCRIPTOR.services_by_name["ExplanationsService"].full_name
# SERVING from start to shutdown whatever the dependencies say: what a liveness probe asks (a gateway whose vLLM
# is down is alive and must not be restarted for it; its readiness, INFERENCE_SERVICE, says it cannot generate).
LIVENESS_SERVICE = "sightline.gateway.liveness"
AUDIT_SERVICE = audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name


class DependencyMonitor:
    """Polls vLLM and Redis and publishes the result through grpc.health.v1.

    ``InferenceService`` needs vLLM; ``ExplanationsService`` needs Redis and a registered
    explainer; the overall status ("") is SERVING only when both are.
    """

    def __init__(self, vllm: VLLMPool, broker: ExplanationBroker, health_servicer: health.HealthServicer) -> None:
        self._vllm = vllm
        self._broker = broker
        self._health = health_servicer
        self.served: ServedModel | None = None

    async def check_once(self) -> None:
        vllm_ok = await self._vllm.healthy()
        if vllm_ok and self.served is None:
            with contextlib.suppress(Exception):
                self.served = await self._vllm.served_model()
        inference_ok = vllm_ok and self.served is not None
        explanations_ok = await self._broker.ping() and await self._catalog_present()
        self._set(INFERENCE_SERVICE, inference_ok)
        self._set(EXPLANATIONS_SERVICE, explanations_ok)
        self._set("", inference_ok and explanations_ok)

    async def run(self, interval: float) -> None:
        while True:
            try:
                await self.check_once()
            except Exception:
                log.exception("health check failed")
            await asyncio.sleep(interval)

    async def _catalog_present(self) -> bool:
        try:
            await self._broker.catalog()
        except Exception:
            return False
        return True

    def _set(self, service: str, ok: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        self._health.set(service, status)


async def serve(settings: GatewaySettings, *, ready: asyncio.Event | None = None, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set, then drain in-flight calls for up to ``settings.shutdown_grace_seconds``.

    Raises ConfigError before serving when the API keys or TLS files are unusable.
    """
    keys = configured_keys(settings.api_keys_file, settings.api_keys, settings.default_limits)
    authenticator = Authenticator(keys, settings.default_limits, open_tenant=settings.open_tenant)
    credentials = server_credentials(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
    _log_security(settings, authenticator, tls=credentials is not None)

    vllm = VLLMPool(settings.vllm_url, silence_timeout=settings.vllm_silence_timeout_seconds)
    redis_client = aioredis.from_url(
        settings.redis_url,
        socket_connect_timeout=1,
        socket_timeout=2,
        # One quick retry gets past a connection Redis closed when it restarted; more would only delay
        # the UNAVAILABLE callers should see while it is down.
        retry=Retry(ExponentialBackoff(cap=0.1, base=0.02), retries=1, supported_errors=(RedisConnectionError,)),
    )
    limiter = TenantLimiter(redis_client, settings.redis_url, lease_seconds=settings.explanation_lease_seconds)
    broker = ExplanationBroker(
        redis_client,
        settings.redis_url,
        record_ttl_seconds=settings.record_ttl_seconds,
        limiter=limiter,
        max_unfinished_jobs=settings.max_queued_explanations,
    )
    health_servicer = health.HealthServicer()
    monitor = DependencyMonitor(vllm, broker, health_servicer)
    jobs = JobControl(redis_client, settings.redis_url, broker)
    audit = open_trail(settings.audit, broker, authenticator)
    gateway = Gateway(
        settings, vllm, broker, monitor, authenticator, limiter, jobs, None if audit is None else audit.recorder
    )

    options = [
        ("grpc.max_receive_message_length", settings.max_request_bytes),
        ("grpc.max_send_message_length", settings.max_response_bytes),
        ("grpc.so_reuseport", 0),
    ]
    drain = DrainingInterceptor()
    # Draining first: a call refused during shutdown needs no decoding.
    server = grpc.aio.server(options=options, interceptors=[drain, DecodeErrorsAsInvalidArgument()])
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(gateway), server)
    explanations_pb2_grpc.add_ExplanationsServiceServicer_to_server(ExplanationsServicer(gateway), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = [INFERENCE_SERVICE, EXPLANATIONS_SERVICE, health.SERVICE_NAME]
    if audit is not None:
        audit_pb2_grpc.add_AuditServiceServicer_to_server(AuditServicer(gateway, audit.log), server)
        services.append(AUDIT_SERVICE)
    enable_reflection(services, server)
    if credentials is None:
        server.add_insecure_port(settings.listen)
    else:
        server.add_secure_port(settings.listen, credentials)

    # Kubelet's gRPC probes speak plaintext only: with TLS on, they need a port of their own that serves health alone.
    health_server = _health_only_server(settings.health_listen, health_servicer)
    health_servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)

    await monitor.check_once()
    broker.start()
    if audit is not None:
        audit.start(broker, settings.record_ttl_seconds)
    monitor_task = asyncio.create_task(monitor.run(settings.health_interval_seconds))
    await server.start()
    if health_server is not None:
        await health_server.start()
        log.info("grpc.health.v1 alone, plaintext, on %s", settings.health_listen)
    http_endpoints = await start_http_endpoints(settings, authenticator, limiter, broker, vllm)
    log.info(
        "gateway listening on %s (%s; vLLM %s, Redis %s)",
        settings.listen,
        _transport(settings, tls=credentials is not None),
        settings.vllm_url,
        settings.redis_url,
    )
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        drain.begin()
        health_servicer.enter_graceful_shutdown()
        log.info(
            "shutting down: NOT_SERVING, new calls refused; draining %d in-flight calls for at most %.1f s",
            drain.in_flight,
            settings.shutdown_grace_seconds,
        )
        if not await drain.wait_idle(settings.shutdown_grace_seconds):
            log.warning("shutdown grace over: cancelling %d calls still in flight", drain.in_flight)
        await server.stop(grace=None)
        if health_server is not None:
            await health_server.stop(grace=None)
        await http_endpoints.stop()
        monitor_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await monitor_task
        await broker.stop()
        if audit is not None:
            await audit.stop()
        await vllm.aclose()
        await redis_client.aclose()


def _health_only_server(listen: str | None, health_servicer: health.HealthServicer) -> grpc.aio.Server | None:
    if not listen:
        return None
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(listen)
    return server


def _log_security(settings: GatewaySettings, authenticator: Authenticator, *, tls: bool) -> None:
    if authenticator.enabled:
        log.info("API keys required (%s)", settings.api_keys_file or "SIGHTLINE_API_KEYS")
    else:
        log.warning(
            "AUTHENTICATION IS OFF: any caller that reaches %s acts as tenant %r and can read every explanation "
            "of it; set SIGHTLINE_API_KEYS_FILE to require API keys (docs/security.md)",
            settings.listen,
            settings.open_tenant,
        )
    if not tls and not _is_loopback(settings.listen):
        log.warning(
            "plaintext gRPC on %s, which is not a loopback address: keys and data cross the network unencrypted; "
            "set SIGHTLINE_TLS_CERT and SIGHTLINE_TLS_KEY (docs/security.md)",
            settings.listen,
        )


def _transport(settings: GatewaySettings, *, tls: bool) -> str:
    if not tls:
        return "plaintext"
    return "mutual TLS, client certificates required" if settings.tls_client_ca_file else "TLS"


def _is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
