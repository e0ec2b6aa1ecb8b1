"""Opening the audit trail at gateway start and closing it at shutdown."""

from __future__ import annotations

from dataclasses import dataclass

from sightline.v1 import types_pb2

from server.audit.hook import AuditRecorder
from server.audit.log import AuditLog
from server.audit.settings import AuditSettings
from server.audit.signing import load_or_create_signer
from server.audit.store import open_store
from server.auth import Authenticator
from server.errors import GatewayError
from server.explanations import ExplanationBroker


@dataclass(frozen=True)
class AuditTrail:
    log: AuditLog
    recorder: AuditRecorder
    settings: AuditSettings

    def start(self, broker: ExplanationBroker, record_ttl_seconds: int) -> None:
        async def fetch(explanation_id: str, tenant: str) -> types_pb2.Explanation | None:
            try:
                return await broker.get(explanation_id, tenant)
            except GatewayError:
                return None  # expired, or Redis is down: the next sweep tries again

        self.log.start(
            fetch,
            record_ttl_s=record_ttl_seconds,
            archive_interval_s=self.settings.archive_interval_seconds,
            purge_interval_s=self.settings.purge_interval_seconds,
        )

    async def stop(self) -> None:
        await self.log.stop()


def open_trail(settings: AuditSettings, broker: ExplanationBroker, authenticator: Authenticator) -> AuditTrail | None:
    """The trail the settings ask for (None when SIGHTLINE_AUDIT=off); raises ConfigError when it cannot open."""
    if not settings.enabled:
        return None
    signer = load_or_create_signer(settings.signing_key_path)
    store = open_store(settings.database_url, settings.state_dir)
    audit_log = AuditLog(store, signer, retention_days=settings.retention_days)
    recorder = AuditRecorder(audit_log, broker, authenticator, record_inputs=settings.record_inputs)
    return AuditTrail(audit_log, recorder, settings)
