"""The gateway's Ed25519 signing key: loaded from a file, made on first start when none exists.

Checkpoints and export manifests are signed with it; its public key (PEM, beside the private key as
``<name>.pub``, and in every GetCheckpoint response) is what ``sightline audit verify --public-key`` takes.
Gateways that share a database must share the key file, so that every checkpoint verifies with one public key.
"""

from __future__ import annotations

import base64
import logging
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from server.errors import ConfigError

log = logging.getLogger(__name__)


class Signer:
    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public_key_pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()

    def sign(self, text: str) -> bytes:
        return self._key.sign(text.encode())

    def sign_b64(self, text: str) -> str:
        return base64.b64encode(self.sign(text)).decode()


def load_or_create_signer(path: Path) -> Signer:
    """The key in ``path`` (PEM, PKCS#8); a new one written there (mode 0600, public key beside it) if absent."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        # O_EXCL: two gateways starting together on a shared volume keep the first one's key.
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return load_or_create_signer(path)
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(pem)
            stream.flush()
            os.fsync(stream.fileno())
        log.warning("made a new audit signing key %s; publish %s.pub to auditors", path, path)
    try:
        loaded = load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot use the audit signing key {path} (SIGHTLINE_AUDIT_SIGNING_KEY): {exc}") from exc
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ConfigError(f"the audit signing key {path} is not an Ed25519 key")
    signer = Signer(loaded)
    public_path = path.with_name(path.name + ".pub")
    if not public_path.exists() or public_path.read_text() != signer.public_key_pem:
        public_path.write_text(signer.public_key_pem)
    return signer
