"""The audit log: group-committed appends, the Merkle tree over them, signed checkpoints, retention and the
archive of final explanation records.

Appends from concurrent requests are queued to one writer thread, which commits whatever has queued up
while the previous transaction ran as one transaction (group commit), and only then resolves each request's
wait. So a request's entry is durable before its response goes out ("acknowledged means durable"), and a
burst of requests pays for one commit, not one each.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import math
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sightline.audit_export import CHECKPOINT_FORMAT, canonical_json
from sightline.audit_merkle import MerkleTree
from sightline.v1 import types_pb2

from server.audit.signing import Signer
from server.audit.store import AuditStore, NewEntry
from server.metrics import AUDIT_APPENDS

log = logging.getLogger(__name__)

ENTRY_VERSION = 1
# At most this many entries go into one group commit.
MAX_BATCH = 256
DAY_MS = 24 * 3600 * 1000

FetchExplanation = Callable[[str, str], Awaitable[types_pb2.Explanation | None]]


@dataclass(frozen=True)
class SignedCheckpoint:
    tree_size: int
    root_hash: bytes
    text: str
    signature: bytes


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def finite(value: float) -> float | None:
    """JSON has no NaN or infinity: such a number is logged as null."""
    return value if math.isfinite(value) else None


class AuditLog:
    """One gateway's handle on the shared audit log."""

    def __init__(self, store: AuditStore, signer: Signer, *, retention_days: float) -> None:
        self.store = store
        self.signer = signer
        self.retention_days = retention_days
        self._queue: queue.SimpleQueue[tuple[NewEntry, concurrent.futures.Future[int]] | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_batches, name="audit-writer", daemon=True)
        self._writer.start()
        self._tree = MerkleTree([])
        self._tree_lock = threading.Lock()
        self._tasks: list[asyncio.Task[None]] = []

    # --- appends -------------------------------------------------------------------------------------

    def submit(self, entry: NewEntry) -> asyncio.Future[int]:
        """Queue ``entry`` now; the future holds its index once the transaction holding it has committed."""
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._queue.put((entry, future))
        return asyncio.wrap_future(future)

    async def append(self, entry: NewEntry) -> int:
        """Log ``entry``; its index once the transaction holding it has committed."""
        return await self.submit(entry)

    def _write_batches(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < MAX_BATCH:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(more)
            try:
                indices = self.store.append([entry for entry, _ in batch])
            except Exception as exc:
                log.exception("audit append of %d entries failed", len(batch))
                for _, future in batch:
                    future.set_exception(exc)
                continue
            for (entry, future), index in zip(batch, indices, strict=True):
                AUDIT_APPENDS.labels(entry.tenant, entry.fields["kind"]).inc()
                future.set_result(index)

    # --- the tree and checkpoints --------------------------------------------------------------------

    def tree(self) -> MerkleTree:
        """The Merkle tree of the whole log as it is now (the cached prefix extended with newer leaves)."""
        with self._tree_lock:
            size = self.store.size()
            if size > self._tree.size:
                self._tree.extend(self.store.leaf_hashes(self._tree.size, size))
            return self._tree

    def sign(self, tree: MerkleTree, size: int | None = None) -> SignedCheckpoint:
        size = tree.size if size is None else size
        root = tree.root(size)
        body = {"format": CHECKPOINT_FORMAT, "tree_size": size, "root_hash": root.hex(), "timestamp_ms": now_ms()}
        text = canonical_json(body).decode()
        return SignedCheckpoint(size, root, text, self.signer.sign(text))

    # --- retention -----------------------------------------------------------------------------------

    def purge_once(self, at_ms: int | None = None) -> int | None:
        """Empty entries and delete records older than the retention period; the purge's own entry index."""
        cutoff = (now_ms() if at_ms is None else at_ms) - int(self.retention_days * DAY_MS)

        def purge_entry(cutoff_ms: int, emptied: int, deleted: int) -> NewEntry:
            return NewEntry(
                tenant="",
                recorded_at_ms=now_ms(),
                fields={
                    "v": ENTRY_VERSION,
                    "kind": "retention_purge",
                    "tenant": "",
                    "cutoff_ms": cutoff_ms,
                    "retention_days": self.retention_days,
                    "entries_emptied": emptied,
                    "explanation_records_deleted": deleted,
                    "recorded_at_ms": now_ms(),
                },
            )

        return self.store.purge(cutoff, purge_entry)

    async def _purge_periodically(self, interval_s: float) -> None:
        while True:
            try:
                index = await asyncio.to_thread(self.purge_once)
                if index is not None:
                    log.info("audit retention purge logged as entry %d", index)
            except Exception:
                log.exception("audit retention purge failed; retrying in %.0f s", interval_s)
            await asyncio.sleep(interval_s)

    # --- the explanation archive ---------------------------------------------------------------------

    async def archive_finished(self, fetch: FetchExplanation, within_ms: int, limit: int = 500) -> int:
        """Archive the final records of logged explanations that have none yet; how many were archived."""
        pending = await asyncio.to_thread(self.store.unarchived_explanations, now_ms() - within_ms, limit)
        archived = 0
        for explanation_id, tenant in pending:
            record = await fetch(explanation_id, tenant)
            if record is None or record.state not in (
                types_pb2.EXPLANATION_STATE_SUCCEEDED,
                types_pb2.EXPLANATION_STATE_FAILED,
            ):
                continue
            blob = record.SerializeToString(deterministic=True)
            entry = explanation_entry(record, tenant, blob)
            if await asyncio.to_thread(self.store.archive_explanation, explanation_id, tenant, blob, entry) is not None:
                archived += 1
        return archived

    async def _archive_periodically(self, fetch: FetchExplanation, within_ms: int, interval_s: float) -> None:
        while True:
            try:
                await self.archive_finished(fetch, within_ms)
            except Exception:
                log.exception("archiving finished explanations failed; retrying in %.1f s", interval_s)
            await asyncio.sleep(interval_s)

    def start(
        self, fetch: FetchExplanation, *, record_ttl_s: int, archive_interval_s: float, purge_interval_s: float
    ) -> None:
        self._tasks = [
            asyncio.create_task(self._archive_periodically(fetch, record_ttl_s * 1000, archive_interval_s)),
            asyncio.create_task(self._purge_periodically(purge_interval_s)),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._queue.put(None)
        await asyncio.to_thread(self._writer.join)
        self.store.close()


def explanation_entry(record: types_pb2.Explanation, tenant: str, blob: bytes) -> NewEntry:
    """The log entry of an archived final explanation record: its outcome and the SHA-256 of the record."""
    fidelity = record.fidelity.max_abs_logprob_diff if record.HasField("fidelity") else None
    return NewEntry(
        tenant=tenant,
        recorded_at_ms=now_ms(),
        fields={
            "v": ENTRY_VERSION,
            "kind": "explanation",
            "tenant": tenant,
            "explanation_id": record.explanation_id,
            "state": types_pb2.ExplanationState.Name(record.state),
            "model": record.model,
            "weights_digest": record.weights_digest,
            "methods": [result.method for result in record.results],
            "fidelity_max_abs_logprob_diff": None if fidelity is None else finite(fidelity),
            "error": record.error.message,
            "trace_id": record.trace_id,
            "record_sha256": hashlib.sha256(blob).hexdigest(),
            "recorded_at_ms": now_ms(),
        },
    )
