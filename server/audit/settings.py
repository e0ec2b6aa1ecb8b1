"""The audit trail's settings (SIGHTLINE_AUDIT_*, SIGHTLINE_DATABASE_URL, SIGHTLINE_STATE_DIR)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from server.errors import ConfigError

# Where the launcher keeps Redis data and logs too (deploy/local_stack.py's default --state-dir).
DEFAULT_STATE_DIR = Path.home() / ".cache" / "sightline" / "state"
# The EU AI Act's Article 19 asks for logs kept at least six months.
DEFAULT_RETENTION_DAYS = 183.0


@dataclass(frozen=True)
class AuditSettings:
    enabled: bool = True
    state_dir: Path = DEFAULT_STATE_DIR
    # PostgreSQL (postgresql://…); None: SQLite at <state_dir>/audit/audit.sqlite3.
    database_url: str | None = None
    # The Ed25519 key that signs checkpoints; None: <state_dir>/audit/signing-key.pem, made if missing.
    signing_key_file: Path | None = None
    retention_days: float = DEFAULT_RETENTION_DAYS
    # Whether entries hold the request's input itself, not only its SHA-256 (personal data: opt in).
    record_inputs: bool = False
    # How often finished explanations' records are copied from Redis into the trail.
    archive_interval_seconds: float = 2.0
    # How often the retention purge runs.
    purge_interval_seconds: float = 3600.0

    @property
    def signing_key_path(self) -> Path:
        return self.signing_key_file or self.state_dir / "audit" / "signing-key.pem"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> AuditSettings:
        retention = float(env.get("SIGHTLINE_AUDIT_RETENTION_DAYS", cls.retention_days))
        if not retention > 0:
            raise ConfigError(f"SIGHTLINE_AUDIT_RETENTION_DAYS must be a positive number of days; got {retention}")
        key = env.get("SIGHTLINE_AUDIT_SIGNING_KEY")
        return cls(
            enabled=_flag(env, "SIGHTLINE_AUDIT", default=True),
            state_dir=Path(env.get("SIGHTLINE_STATE_DIR") or DEFAULT_STATE_DIR),
            database_url=env.get("SIGHTLINE_DATABASE_URL") or None,
            signing_key_file=Path(key) if key else None,
            retention_days=retention,
            record_inputs=_flag(env, "SIGHTLINE_AUDIT_RECORD_INPUTS", default=False),
            archive_interval_seconds=float(
                env.get("SIGHTLINE_AUDIT_ARCHIVE_INTERVAL_SECONDS", cls.archive_interval_seconds)
            ),
        )


def _flag(env: Mapping[str, str], name: str, *, default: bool) -> bool:
    value = env.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    raise ConfigError(f"{name} must be on or off; got {value[:20]!r}")
