"""sightline.v1.AuditService: checkpoints, proofs and exports of the audit log.

A caller sees only its tenant's entries: an inclusion proof of another tenant's entry is NOT_FOUND, exactly as
for an index that does not exist, and an export names only the caller's tenant. A key with the operator role
(``"role": "operator"`` in the key file), or any caller while authentication is off, may export any tenant, or
all of them with ``tenant: "*"``. Checkpoints and consistency proofs are about the whole log and carry only
its size and hashes, so every caller may have them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
from sightline.audit_export import EXPORT_FORMAT, canonical_json
from sightline.v1 import audit_pb2, audit_pb2_grpc

from server.audit.log import AuditLog, SignedCheckpoint, now_ms
from server.audit.store import DATABASE_ERRORS
from server.errors import invalid_argument, not_found, out_of_range, permission_denied, unavailable
from server.limits import Tenant
from server.servicers import Gateway, stream_rpc, unary_rpc

# Entries read from the database per query while exporting.
EXPORT_PAGE = 500
ALL_TENANTS = "*"

Result = TypeVar("Result")


async def _in_database(work: Callable[..., Result], *args: Any) -> Result:
    """Run blocking store work on a thread; a database that cannot answer is UNAVAILABLE, not INTERNAL."""
    try:
        return await asyncio.to_thread(work, *args)
    except DATABASE_ERRORS as exc:
        raise unavailable(f"the audit database cannot answer ({type(exc).__name__}); retry shortly") from exc


def _signed(checkpoint: SignedCheckpoint) -> audit_pb2.SignedText:
    return audit_pb2.SignedText(text=checkpoint.text, signature=checkpoint.signature)


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    def __init__(self, gateway: Gateway, audit_log: AuditLog) -> None:
        self.gateway = gateway
        self.log = audit_log

    def _is_operator(self, context: grpc.aio.ServicerContext) -> bool:
        key = self.gateway.authenticator.api_key(context.invocation_metadata() or ())
        return key is None or key.operator

    @unary_rpc("sightline.v1.AuditService/GetCheckpoint")
    async def GetCheckpoint(
        self, request: audit_pb2.GetCheckpointRequest, context: grpc.aio.ServicerContext, tenant: Tenant
    ) -> audit_pb2.GetCheckpointResponse:
        tree = await _in_database(self.log.tree)
        return audit_pb2.GetCheckpointResponse(
            checkpoint=_signed(self.log.sign(tree)), public_key_pem=self.log.signer.public_key_pem
        )

    @unary_rpc("sightline.v1.AuditService/GetInclusionProof")
    async def GetInclusionProof(
        self, request: audit_pb2.GetInclusionProofRequest, context: grpc.aio.ServicerContext, tenant: Tenant
    ) -> audit_pb2.GetInclusionProofResponse:
        tree = await _in_database(self.log.tree)
        size = request.tree_size or tree.size
        if size > tree.size:
            raise out_of_range(f"tree_size {size} is larger than the log, which holds {tree.size} entries")
        stored = await _in_database(self.log.store.entry, request.index)
        if stored is None or request.index >= size or (stored.tenant != tenant.name and not self._is_operator(context)):
            raise not_found(
                f"no entry {request.index} of tenant {tenant.name!r} in the log's first {size} entries "
                "(indices come from an export; purged entries have no proof)"
            )
        response = audit_pb2.GetInclusionProofResponse(
            entry=stored.entry, tree_size=size, hashes=tree.inclusion_proof(request.index, size)
        )
        if not request.tree_size:
            response.checkpoint.CopyFrom(_signed(self.log.sign(tree, size)))
        return response

    @unary_rpc("sightline.v1.AuditService/GetConsistencyProof")
    async def GetConsistencyProof(
        self, request: audit_pb2.GetConsistencyProofRequest, context: grpc.aio.ServicerContext, tenant: Tenant
    ) -> audit_pb2.GetConsistencyProofResponse:
        tree = await _in_database(self.log.tree)
        new_size = request.new_size or tree.size
        if new_size > tree.size:
            raise out_of_range(f"new_size {new_size} is larger than the log, which holds {tree.size} entries")
        if request.old_size > new_size:
            raise invalid_argument(f"old_size {request.old_size} is larger than new_size {new_size}")
        return audit_pb2.GetConsistencyProofResponse(
            old_size=request.old_size,
            new_size=new_size,
            hashes=tree.consistency_proof(request.old_size, new_size),
        )

    @stream_rpc("sightline.v1.AuditService/ExportEntries")
    async def ExportEntries(
        self, request: audit_pb2.ExportEntriesRequest, context: grpc.aio.ServicerContext, tenant: Tenant
    ) -> AsyncIterator[audit_pb2.ExportEntriesResponse]:
        exported = self._exported_tenant(request.tenant, tenant, context)
        since_ms = request.since.ToMilliseconds() if request.HasField("since") else 0
        until_ms = request.until.ToMilliseconds() if request.HasField("until") else now_ms() + 1
        if until_ms <= since_ms:
            raise invalid_argument(f"until ({until_ms} ms) must be after since ({since_ms} ms)")
        tree = await _in_database(self.log.tree)
        checkpoint = self.log.sign(tree)
        yield audit_pb2.ExportEntriesResponse(checkpoint=_signed(checkpoint))
        indices: list[int] = []
        after = -1
        while True:
            page = await _in_database(
                self.log.store.entries_page, exported, since_ms, until_ms, checkpoint.tree_size, after, EXPORT_PAGE
            )
            for stored in page:
                indices.append(stored.index)
                proof = tree.inclusion_proof(stored.index, checkpoint.tree_size)
                yield audit_pb2.ExportEntriesResponse(
                    entry=audit_pb2.ExportedEntry(index=stored.index, entry=stored.entry, proof=proof)
                )
            if len(page) < EXPORT_PAGE:
                break
            after = page[-1].index
        manifest = canonical_json(
            {
                "format": EXPORT_FORMAT,
                "tenant": ALL_TENANTS if exported is None else exported,
                "since_ms": since_ms,
                "until_ms": until_ms,
                "tree_size": checkpoint.tree_size,
                "root_hash": checkpoint.root_hash.hex(),
                "indices": indices,
                "exported_at_ms": now_ms(),
            }
        ).decode()
        yield audit_pb2.ExportEntriesResponse(
            manifest=audit_pb2.SignedText(text=manifest, signature=self.log.signer.sign(manifest))
        )

    def _exported_tenant(self, requested: str, caller: Tenant, context: grpc.aio.ServicerContext) -> str | None:
        """The tenant to export (None: all), as far as the caller may see it."""
        if not requested or requested == caller.name:
            return caller.name
        if not self._is_operator(context):
            raise permission_denied(
                "only a key with the operator role may export another tenant's audit trail; leave tenant empty "
                "to export your own"
            )
        return None if requested == ALL_TENANTS else requested
