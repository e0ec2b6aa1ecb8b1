"""The audit export format and its offline verifier (standard library and ``cryptography`` only).

An export is a JSON Lines file (docs/compliance.md documents every field):

1. ``{"type": "checkpoint", "checkpoint": "<signed JSON text>", "signature": "<base64 Ed25519>"}``: the log's size
   and root when the export began, signed by the gateway.
2. ``{"type": "entry", "index": i, "entry": "<canonical JSON text>", "proof": ["<hex>", ...]}`` per entry, in
   increasing index order, each with its RFC 6962 inclusion proof against the checkpoint's root.
3. ``{"type": "manifest", "manifest": "<signed JSON text>", "signature": "<base64>"}``: which tenant and time range
   were exported, the checkpoint's size and root, and the index of every exported entry, signed, so a deleted,
   reordered or appended entry, or a cut-off file, is named.

The gateway writes entries and signed texts with ``canonical_json`` (this module), so both sides agree byte for
byte on what is hashed and signed.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from sightline.audit_merkle import ProofError, leaf_hash, verify_inclusion

EXPORT_FORMAT = "sightline-audit-export/1"
CHECKPOINT_FORMAT = "sightline-audit-checkpoint/1"


def canonical_json(value: Mapping[str, Any]) -> bytes:
    """The one serialisation that is hashed and signed: sorted keys, no spaces, UTF-8, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


class AuditVerificationError(Exception):
    """An export that does not verify; ``index`` names the first failing entry when one is to blame."""

    def __init__(self, message: str, *, index: int | None = None, line: int | None = None) -> None:
        super().__init__(message)
        self.index = index
        self.line = line


@dataclass(frozen=True)
class Checkpoint:
    tree_size: int
    root_hash: bytes
    timestamp_ms: int


@dataclass(frozen=True)
class VerifiedExport:
    checkpoint: Checkpoint
    tenant: str
    since_ms: int
    until_ms: int
    entries: int


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    key = load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("the public key is not an Ed25519 key")
    return key


def parse_checkpoint(text: str) -> Checkpoint:
    body = json.loads(text)
    if not isinstance(body, dict) or body.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"not a {CHECKPOINT_FORMAT} checkpoint")
    return Checkpoint(
        tree_size=int(body["tree_size"]),
        root_hash=bytes.fromhex(body["root_hash"]),
        timestamp_ms=int(body["timestamp_ms"]),
    )


def check_signature(public_key: Ed25519PublicKey, text: str, signature_b64: str, what: str) -> None:
    try:
        public_key.verify(base64.b64decode(signature_b64, validate=True), text.encode())
    except (InvalidSignature, ValueError) as exc:
        raise AuditVerificationError(f"the {what}'s signature does not verify with the given public key") from exc


def _lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open("rb") as stream:
        for number, raw in enumerate(stream, start=1):
            try:
                record = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise AuditVerificationError(f"line {number} is not valid JSON ({exc})", line=number) from exc
            if not isinstance(record, dict):
                raise AuditVerificationError(f"line {number} is not a JSON object", line=number)
            yield number, record


def verify_export(path: Path, public_key: Ed25519PublicKey) -> VerifiedExport:
    """Check a whole export offline; raise AuditVerificationError naming the first entry (or line) that fails."""
    lines = _lines(path)
    first = next(lines, None)
    if first is None or first[1].get("type") != "checkpoint":
        raise AuditVerificationError("the export does not start with a checkpoint line", line=1)
    checkpoint_text, checkpoint_signature = str(first[1].get("checkpoint", "")), str(first[1].get("signature", ""))
    check_signature(public_key, checkpoint_text, checkpoint_signature, "checkpoint")
    checkpoint = parse_checkpoint(checkpoint_text)

    seen: list[int] = []
    manifest: dict[str, Any] | None = None
    for number, record in lines:
        kind = record.get("type")
        if manifest is not None:
            raise AuditVerificationError(f"line {number} follows the manifest, which must be last", line=number)
        if kind == "manifest":
            manifest_text = str(record.get("manifest", ""))
            check_signature(public_key, manifest_text, str(record.get("signature", "")), "manifest")
            manifest = json.loads(manifest_text)
            continue
        if kind != "entry":
            raise AuditVerificationError(f"line {number} has unknown type {str(kind)[:40]!r}", line=number)
        index = _verify_entry(number, record, checkpoint)
        if seen and index <= seen[-1]:
            raise AuditVerificationError(
                f"entry {index} (line {number}) comes after entry {seen[-1]}: entries are out of order",
                index=index,
                line=number,
            )
        seen.append(index)
    if manifest is None:
        after = f" after entry {seen[-1]}" if seen else ""
        raise AuditVerificationError(f"the export ends{after} without its signed manifest: it was cut off")
    return _check_manifest(manifest, checkpoint, seen)


def _verify_entry(number: int, record: Mapping[str, Any], checkpoint: Checkpoint) -> int:
    index = record.get("index")
    text = record.get("entry")
    if not isinstance(index, int) or not isinstance(text, str):
        raise AuditVerificationError(
            f"line {number} is an entry without an integer index and an entry text", line=number
        )
    try:
        entry = json.loads(text)
        proof = [bytes.fromhex(h) for h in record.get("proof", [])]
    except (ValueError, TypeError) as exc:
        raise AuditVerificationError(
            f"entry {index} (line {number}) cannot be read: {exc}", index=index, line=number
        ) from exc
    if not isinstance(entry, dict) or entry.get("index") != index:
        raise AuditVerificationError(
            f"entry {index} (line {number}) does not carry its own index", index=index, line=number
        )
    try:
        verify_inclusion(index, checkpoint.tree_size, leaf_hash(text.encode()), proof, checkpoint.root_hash)
    except ProofError as exc:
        raise AuditVerificationError(
            f"entry {index} (line {number}) is not in the signed log of {checkpoint.tree_size} entries: "
            f"it was altered, or its proof was ({exc})",
            index=index,
            line=number,
        ) from exc
    return index


def _check_manifest(manifest: Mapping[str, Any], checkpoint: Checkpoint, seen: list[int]) -> VerifiedExport:
    if manifest.get("format") != EXPORT_FORMAT:
        raise AuditVerificationError(f"the manifest is not a {EXPORT_FORMAT} manifest")
    if manifest.get("tree_size") != checkpoint.tree_size or manifest.get("root_hash") != checkpoint.root_hash.hex():
        raise AuditVerificationError("the manifest names another checkpoint than the export's first line")
    listed = [int(i) for i in manifest.get("indices", [])]
    for position, expected in enumerate(listed):
        if position >= len(seen):
            raise AuditVerificationError(
                f"entry {expected} is listed in the manifest but missing from the export (deleted or cut off)",
                index=expected,
            )
        if seen[position] != expected:
            missing = expected not in seen
            what = "is missing from the export" if missing else "is not where the manifest puts it"
            raise AuditVerificationError(
                f"entry {expected} {what} (found entry {seen[position]} in its place)", index=expected
            )
    if len(seen) > len(listed):
        extra = seen[len(listed)]
        raise AuditVerificationError(f"entry {extra} is in the export but not in the signed manifest", index=extra)
    return VerifiedExport(
        checkpoint=checkpoint,
        tenant=str(manifest.get("tenant", "")),
        since_ms=int(manifest.get("since_ms", 0)),
        until_ms=int(manifest.get("until_ms", 0)),
        entries=len(seen),
    )


def export_lines(records: Iterable[Mapping[str, Any]]) -> Iterator[bytes]:
    """Each export record as one JSON line."""
    for record in records:
        yield json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
