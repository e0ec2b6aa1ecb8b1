"""Gateway settings, read from the environment (flags in server/__main__.py override them)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from server.audit.settings import AuditSettings
from server.images import ImageLimits
from server.limits import TenantLimits
from server.vllm_client import SILENCE_TIMEOUT_SECONDS

# Where `python -m server` serves Prometheus metrics and the explanation viewer unless told otherwise ("off": not).
DEFAULT_METRICS_LISTEN = "127.0.0.1:9401"
DEFAULT_VIEWER_LISTEN = "127.0.0.1:8080"


@dataclass(frozen=True)
class GatewaySettings:
    listen: str = "127.0.0.1:50051"
    vllm_url: str = "http://127.0.0.1:8000"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # The tenant of every call while authentication is off (no API keys configured).
    open_tenant: str = "default"
    default_max_tokens: int = 64
    # How long explanation records stay fetchable (and listed).
    record_ttl_seconds: int = 7 * 24 * 3600
    # Time kept back from a SYNC call's deadline to reply with a PENDING explanation instead of failing.
    deadline_margin_seconds: float = 0.25
    health_interval_seconds: float = 2.0
    # Largest request the gRPC server accepts: far above the longest prompt a context window holds.
    max_request_bytes: int = 4 * 1024 * 1024
    # Largest response it sends: explanations carry [targets, tokens] float32 matrices per method.
    max_response_bytes: int = 16 * 1024 * 1024
    # API keys: a JSON or TOML key file, or tenant:sha256 pairs (see server/keys.py); neither turns auth off.
    api_keys_file: str | None = None
    api_keys: str | None = None
    # TLS: the server's certificate chain and key (PEM); a client CA makes clients present a certificate it signed.
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None
    # Limits of every tenant the key file does not override (SIGHTLINE_<LIMIT>, see server/limits.py).
    default_limits: TenantLimits = field(default_factory=TenantLimits)
    # Pictures in chat messages (SIGHTLINE_MAX_IMAGES, ..., see server/images.py).
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    # How long an unfinished explanation holds one of its tenant's concurrency slots at most, should
    # its job be lost: longer than any job waits and runs.
    explanation_lease_seconds: float = 3600.0
    # Explanation jobs that may wait unfinished in the stream (queued or in a worker's hands); more get
    # RESOURCE_EXHAUSTED. 1,000 is minutes of work for one CPU worker; raise it with the number of workers.
    max_queued_explanations: int = 1000
    # On SIGTERM, how long calls in flight may take to finish; under Kubernetes' default 30 s termination grace.
    shutdown_grace_seconds: float = 25.0
    # How long vLLM may send nothing on a call before it fails UNAVAILABLE (server/vllm_client.py).
    vllm_silence_timeout_seconds: float = SILENCE_TIMEOUT_SECONDS
    # A second, plaintext port serving only grpc.health.v1, for probes that cannot speak TLS (Kubernetes' gRPC probes).
    health_listen: str | None = None
    # HOST:PORT of the Prometheus /metrics endpoint and of the explanation viewer; "" or "off" serves none
    # (from_env turns both on by default; settings built in code opt in).
    metrics_listen: str = ""
    viewer_listen: str = ""
    # The viewer's link from an explanation to its trace, with {trace_id} in it; "" shows the id without a link.
    trace_url_template: str = ""
    # The audit trail: database, signing key, retention (server/audit/settings.py, docs/compliance.md).
    audit: AuditSettings = field(default_factory=AuditSettings)

    @classmethod
    def from_env(cls) -> GatewaySettings:
        env = os.environ
        return cls(
            listen=env.get("SIGHTLINE_GATEWAY_LISTEN", cls.listen),
            vllm_url=env.get("SIGHTLINE_VLLM_URL", cls.vllm_url),
            redis_url=env.get("SIGHTLINE_REDIS_URL", cls.redis_url),
            default_max_tokens=int(env.get("SIGHTLINE_DEFAULT_MAX_TOKENS", cls.default_max_tokens)),
            record_ttl_seconds=int(env.get("SIGHTLINE_RECORD_TTL_SECONDS", cls.record_ttl_seconds)),
            max_request_bytes=int(env.get("SIGHTLINE_MAX_REQUEST_BYTES", cls.max_request_bytes)),
            max_response_bytes=int(env.get("SIGHTLINE_MAX_RESPONSE_BYTES", cls.max_response_bytes)),
            api_keys_file=env.get("SIGHTLINE_API_KEYS_FILE") or None,
            api_keys=env.get("SIGHTLINE_API_KEYS") or None,
            tls_cert_file=env.get("SIGHTLINE_TLS_CERT") or None,
            tls_key_file=env.get("SIGHTLINE_TLS_KEY") or None,
            tls_client_ca_file=env.get("SIGHTLINE_TLS_CLIENT_CA") or None,
            default_limits=TenantLimits.from_env(env),
            image_limits=ImageLimits.from_env(env),
            explanation_lease_seconds=float(
                env.get("SIGHTLINE_EXPLANATION_LEASE_SECONDS", cls.explanation_lease_seconds)
            ),
            max_queued_explanations=int(env.get("SIGHTLINE_MAX_QUEUED_EXPLANATIONS", cls.max_queued_explanations)),
            health_interval_seconds=float(env.get("SIGHTLINE_HEALTH_INTERVAL_SECONDS", cls.health_interval_seconds)),
            shutdown_grace_seconds=float(env.get("SIGHTLINE_SHUTDOWN_GRACE_SECONDS", cls.shutdown_grace_seconds)),
            vllm_silence_timeout_seconds=float(
                env.get("SIGHTLINE_VLLM_SILENCE_TIMEOUT_SECONDS", cls.vllm_silence_timeout_seconds)
            ),
            health_listen=env.get("SIGHTLINE_HEALTH_LISTEN") or None,
            metrics_listen=env.get("SIGHTLINE_METRICS_LISTEN", DEFAULT_METRICS_LISTEN),
            viewer_listen=env.get("SIGHTLINE_VIEWER_LISTEN", DEFAULT_VIEWER_LISTEN),
            trace_url_template=env.get("SIGHTLINE_TRACE_URL_TEMPLATE", cls.trace_url_template),
            audit=AuditSettings.from_env(env),
        )
