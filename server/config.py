"""Gateway settings, read from the environment (flags in server/__main__.py override them)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class GatewaySettings:
    listen: str = "127.0.0.1:50051"
    vllm_url: str = "http://127.0.0.1:8000"
    redis_url: str = "redis://127.0.0.1:6379/0"
    tenant: str = "default"
    default_max_tokens: int = 64
    # How long explanation records stay fetchable.
    record_ttl_seconds: int = 7 * 24 * 3600
    # Time kept back from a SYNC call's deadline to reply with a PENDING explanation instead of failing.
    deadline_margin_seconds: float = 0.25
    health_interval_seconds: float = 2.0
    # On SIGTERM, how long calls in flight may take to finish; under Kubernetes' default 30 s termination grace.
    shutdown_grace_seconds: float = 25.0
    max_message_bytes: int = 16 * 1024 * 1024
    # Largest explanation accepted, in token-forward passes (MethodCost x sequence length): 50M is
    # integrated gradients with 16 steps over a 1,024-token generation several times over.
    max_explanation_cost: float = 50e6

    @classmethod
    def from_env(cls) -> GatewaySettings:
        return cls(
            listen=os.environ.get("SIGHTLINE_GATEWAY_LISTEN", cls.listen),
            vllm_url=os.environ.get("SIGHTLINE_VLLM_URL", cls.vllm_url),
            redis_url=os.environ.get("SIGHTLINE_REDIS_URL", cls.redis_url),
            default_max_tokens=int(os.environ.get("SIGHTLINE_DEFAULT_MAX_TOKENS", cls.default_max_tokens)),
            record_ttl_seconds=int(os.environ.get("SIGHTLINE_RECORD_TTL_SECONDS", cls.record_ttl_seconds)),
            max_explanation_cost=float(os.environ.get("SIGHTLINE_MAX_EXPLANATION_COST", cls.max_explanation_cost)),
            health_interval_seconds=float(
                os.environ.get("SIGHTLINE_HEALTH_INTERVAL_SECONDS", cls.health_interval_seconds)
            ),
            shutdown_grace_seconds=float(
                os.environ.get("SIGHTLINE_SHUTDOWN_GRACE_SECONDS", cls.shutdown_grace_seconds)
            ),
        )
