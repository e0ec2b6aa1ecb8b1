"""API keys: the key file format, hashing, and a command to mint keys.

Keys are stored hashed: the gateway keeps only the SHA-256 of each key, so the key file (or
environment) can be read by whoever deploys the gateway without handing them working keys. A key
is 256 random bits, so a plain SHA-256 is as hard to invert as the key is to guess; no salt or
slow hash is needed, unlike for passwords.

The key file is JSON (``.json``) or TOML (``.toml``)::

    {
      "keys": [{"id": "acme-ci", "tenant": "acme", "sha256": "<64 hex digits>"}],
      "tenants": {"acme": {"requests_per_minute": 600, "max_concurrent_explanations": 4}}
    }

``tenants`` is optional and sets per-tenant limits (see server/limits.py) over the deployment's
defaults. A tenant may have several keys (rotate by adding the new one, then removing the old).
The gateway rereads the file when it changes, so none of this needs a restart.
For simple setups ``SIGHTLINE_API_KEYS`` holds ``tenant:sha256`` pairs separated by commas.

Mint a key with ``python -m server.keys new --tenant acme``: it prints the key once, and the
entry to add to the key file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import secrets
import sys
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from common.jobs import TENANT_NAME
from server.errors import ConfigError
from server.limits import TenantLimits

KEY_PREFIX = "sl_"
KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
KEY_FIELDS = frozenset({"id", "tenant", "sha256"})
# A key's optional "role": "operator" lets it read every tenant's audit trail (docs/compliance.md).
KEY_ROLES = ("tenant", "operator")
# How often a call may look at the key file for changes: a stat, at most once a second.
KEY_FILE_RECHECK_SECONDS = 1.0

log = logging.getLogger(__name__)


class KeyFileError(ConfigError):
    """A key file or SIGHTLINE_API_KEYS value the gateway cannot start with; the message says where and why."""


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    tenant: str
    sha256: bytes
    role: str = "tenant"

    @property
    def operator(self) -> bool:
        return self.role == "operator"


@dataclass(frozen=True)
class KeyRing:
    """The accepted keys and the per-tenant limit overrides."""

    keys: tuple[ApiKey, ...]
    tenant_limits: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    source: str = ""

    @property
    def tenants(self) -> list[str]:
        return sorted({key.tenant for key in self.keys})

    def limits_for(self, tenant: str, defaults: TenantLimits) -> TenantLimits:
        return defaults.with_overrides(self.tenant_limits.get(tenant, {}), source=f"{self.source}: tenant {tenant!r}")

    def current(self) -> KeyRing:
        """A KeyRing is its own, fixed, KeySource."""
        return self


class KeySource(Protocol):
    def current(self) -> KeyRing:
        """The keys in force now."""
        ...


class KeyFile:
    """SIGHTLINE_API_KEYS_FILE, reread when it changes, so that adding or revoking a key or changing a tenant's
    limits needs no restart. Each call to current() may look at the file's status (at most every recheck_seconds:
    one stat); a change that does not load keeps the keys in force and logs why. The gateway refuses to start on
    such a file, but a running one must not lock every caller out over a typo in an edit."""

    def __init__(
        self,
        path: Path,
        defaults: TenantLimits,
        *,
        recheck_seconds: float = KEY_FILE_RECHECK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._path = path
        self._defaults = defaults
        self._recheck_seconds = recheck_seconds
        self._clock = clock
        self._version = _file_version(path)
        self._key_ring = load_key_file(path, defaults)
        self._checked_at = clock()

    def current(self) -> KeyRing:
        now = self._clock()
        if now - self._checked_at >= self._recheck_seconds:
            self._checked_at = now
            version = _file_version(self._path)
            if version != self._version:
                self._version = version
                self._reload()
        return self._key_ring

    def _reload(self) -> None:
        try:
            key_ring = load_key_file(self._path, self._defaults)
        except ConfigError as error:
            log.error("the API key file changed but cannot be used; the keys loaded before stay in force: %s", error)
            return
        self._key_ring = key_ring
        log.info("reloaded %d API keys of %d tenants from %s", len(key_ring.keys), len(key_ring.tenants), self._path)


def _file_version(path: Path) -> tuple[int, int, int] | None:
    """What changes when the file is rewritten or replaced (a new inode: an atomic rename, a Kubernetes secret)."""
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_mtime_ns, status.st_size, status.st_ino


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def load_key_file(path: Path, defaults: TenantLimits) -> KeyRing:
    """Parse and check a key file; raise KeyFileError naming the file and the bad entry."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read the API key file {path}: {exc.strerror}") from exc
    try:
        if path.suffix == ".toml":
            document: object = tomllib.loads(raw.decode())
        elif path.suffix == ".json":
            document = json.loads(raw)
        else:
            raise KeyFileError(f"the API key file {path} must be .json or .toml")
    except (UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise KeyFileError(f"the API key file {path} is not valid {path.suffix[1:].upper()}: {exc}") from exc
    return _key_ring(document, str(path), defaults)


def keys_from_env(value: str, defaults: TenantLimits) -> KeyRing:
    """Parse ``SIGHTLINE_API_KEYS``: ``tenant:sha256`` pairs separated by commas."""
    entries = []
    for index, pair in enumerate(item.strip() for item in value.split(",") if item.strip()):
        tenant, separator, digest = pair.partition(":")
        if not separator:
            raise KeyFileError(f"SIGHTLINE_API_KEYS entry {index + 1} must be tenant:sha256, got {pair[:80]!r}")
        entries.append({"id": f"env-{index + 1}", "tenant": tenant, "sha256": digest})
    return _key_ring({"keys": entries}, "SIGHTLINE_API_KEYS", defaults)


def configured_keys(api_keys_file: str | None, api_keys: str | None, defaults: TenantLimits) -> KeySource | None:
    """The keys of SIGHTLINE_API_KEYS_FILE (reread when it changes) or SIGHTLINE_API_KEYS; None (authentication
    off) when neither is set. Raises KeyFileError (or ConfigError, for a bad limit) when they cannot be used."""
    if api_keys_file and api_keys:
        raise KeyFileError("set SIGHTLINE_API_KEYS_FILE or SIGHTLINE_API_KEYS, not both")
    if api_keys_file:
        return KeyFile(Path(api_keys_file), defaults)
    if api_keys:
        return keys_from_env(api_keys, defaults)
    return None


def _key_ring(document: object, source: str, defaults: TenantLimits) -> KeyRing:
    if not isinstance(document, dict) or not set(document) <= {"keys", "tenants"}:
        raise KeyFileError(f"{source}: expected an object with a 'keys' list and an optional 'tenants' table")
    entries = document.get("keys")
    if not isinstance(entries, list) or not entries:
        raise KeyFileError(f"{source}: 'keys' must be a non-empty list; to run without authentication, unset it")
    keys = tuple(_api_key(entry, f"{source}: keys[{index}]") for index, entry in enumerate(entries))
    _check_unique([key.key_id for key in keys], f"{source}: key id")
    _check_unique([key.sha256.hex() for key in keys], f"{source}: the same key (sha256)")

    tenant_limits = document.get("tenants", {})
    if not isinstance(tenant_limits, dict) or not all(isinstance(v, dict) for v in tenant_limits.values()):
        raise KeyFileError(f"{source}: 'tenants' must map tenant names to tables of limits")
    ring = KeyRing(keys=keys, tenant_limits=tenant_limits, source=source)
    unknown = sorted(set(tenant_limits) - set(ring.tenants))
    if unknown:
        raise KeyFileError(f"{source}: 'tenants' sets limits for {unknown}, which have no key (a typo?)")
    for tenant in ring.tenants:
        ring.limits_for(tenant, defaults)  # raises ConfigError naming the bad limit
    return ring


def _api_key(entry: object, where: str) -> ApiKey:
    if not isinstance(entry, dict):
        raise KeyFileError(f"{where} must be an object with id, tenant and sha256")
    if "key" in entry:
        raise KeyFileError(f"{where} holds a key in clear; store its sha256 instead (python -m server.keys hash)")
    if not KEY_FIELDS <= set(entry) <= KEY_FIELDS | {"role"}:
        raise KeyFileError(
            f"{where} must have exactly the fields id, tenant and sha256 (and optionally role); got {sorted(entry)}"
        )
    role = entry.get("role", "tenant")
    if role not in KEY_ROLES:
        raise KeyFileError(f"{where}: role must be one of {', '.join(KEY_ROLES)}; got {str(role)[:40]!r}")
    key_id, tenant, digest = entry["id"], entry["tenant"], entry["sha256"]
    if not isinstance(key_id, str) or not KEY_ID.fullmatch(key_id):
        raise KeyFileError(f"{where}: id must be 1-64 letters, digits, '.', '_' or '-'; got {key_id!r}")
    if not isinstance(tenant, str) or not TENANT_NAME.fullmatch(tenant):
        raise KeyFileError(f"{where}: tenant must be 1-64 letters, digits, '.', '_' or '-'; got {tenant!r}")
    if not isinstance(digest, str) or not SHA256_HEX.fullmatch(digest):
        raise KeyFileError(f"{where}: sha256 must be 64 lowercase hex digits, the SHA-256 of the key")
    return ApiKey(key_id=key_id, tenant=tenant, sha256=bytes.fromhex(digest), role=role)


def _check_unique(values: Sequence[str], what: str) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise KeyFileError(f"{what} {value!r} appears twice")
        seen.add(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.keys", description="Mint and hash Sightline API keys.")
    commands = parser.add_subparsers(dest="command", required=True)
    mint = commands.add_parser("new", help="mint a key: print it once, and the key file entry to add")
    mint.add_argument("--tenant", required=True, help="the tenant the key acts for")
    mint.add_argument("--id", dest="key_id", help="the key's id in logs and the key file (default: tenant-<random>)")
    commands.add_parser("hash", help="print the sha256 of a key read from stdin, for a key file entry")
    args = parser.parse_args(argv)

    if args.command == "hash":
        key = sys.stdin.readline().strip()
        if not key:
            parser.error("pass the key on stdin")
        print(hash_key(key).hex())
        return 0
    tenant: str = args.tenant
    key_id: str = args.key_id or f"{tenant}-{secrets.token_hex(4)}"
    if not TENANT_NAME.fullmatch(tenant):
        parser.error(f"--tenant must be 1-64 letters, digits, '.', '_' or '-'; got {tenant!r}")
    if not KEY_ID.fullmatch(key_id):
        parser.error(f"--id must be 1-64 letters, digits, '.', '_' or '-'; got {key_id!r}")
    key = new_key()
    entry = {"id": key_id, "tenant": tenant, "sha256": hash_key(key).hex()}
    print(f"API key for tenant {tenant!r} (shown only now; give it to the client, e.g. as SIGHTLINE_API_KEY):")
    print(f"  {key}")
    print("Add this entry to the 'keys' list of the key file (SIGHTLINE_API_KEYS_FILE); the gateway rereads it:")
    print(f"  {json.dumps(entry)}")
    print(f"or, without a key file: SIGHTLINE_API_KEYS={tenant}:{entry['sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
