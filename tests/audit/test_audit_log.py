"""The audit log on both databases, without a gateway: appends, retention, the explanation archive."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sightline.audit_export import canonical_json
from sightline.audit_merkle import leaf_hash, verify_consistency, verify_inclusion
from sightline.v1 import types_pb2

from server.audit.log import DAY_MS, AuditLog, now_ms
from server.audit.signing import load_or_create_signer
from server.audit.store import AuditStore, NewEntry, open_store
from tests.audit.conftest import new_database


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AuditStore]:
    url = None if request.param == "sqlite" else new_database(request.getfixturevalue("postgres_url"))
    opened = open_store(url, tmp_path)
    yield opened
    opened.close()


def entry(tenant: str, at_ms: int, **fields: object) -> NewEntry:
    return NewEntry(tenant=tenant, recorded_at_ms=at_ms, fields={"kind": "request", "tenant": tenant, **fields})


def test_concurrent_appends_get_one_index_each_and_every_row_is_whole(store: AuditStore) -> None:
    def append_batch(worker: int) -> list[int]:
        return [store.append([entry("t", now_ms(), worker=worker, n=n)])[0] for n in range(25)]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        indices = [i for batch in pool.map(append_batch, range(8)) for i in batch]

    assert sorted(indices) == list(range(200))
    assert store.size() == 200
    hashes = store.leaf_hashes(0, 200)
    nonces = set()
    for index in range(200):
        stored = store.entry(index)
        assert stored is not None and json.loads(stored.entry)["index"] == index
        assert leaf_hash(stored.entry.encode()) == hashes[index]
        nonces.add(json.loads(stored.entry)["nonce"])
    assert len(nonces) == 200 and all(len(nonce) == 32 for nonce in nonces)


def test_a_guessed_entry_cannot_be_confirmed_from_its_leaf_hash(store: AuditStore) -> None:
    known = entry("acme", 1_000, prompt_sha256="ab" * 32)
    store.append([known])
    (stored_hash,) = store.leaf_hashes(0, 1)
    # Someone who knows every field and the index still lacks the nonce.
    guess = canonical_json({**known.fields, "index": 0})
    assert leaf_hash(guess) != stored_hash
    stored = store.entry(0)
    assert stored is not None and leaf_hash(stored.entry.encode()) == stored_hash


def test_retention_purge_empties_old_entries_keeps_the_tree_and_logs_itself(store: AuditStore, tmp_path: Path) -> None:
    audit = AuditLog(store, load_or_create_signer(tmp_path / "key.pem"), retention_days=183)
    try:
        old = now_ms() - 200 * DAY_MS
        store.append([entry("acme", old, n=0), entry("beta", old, n=1), entry("acme", now_ms(), n=2)])
        before = audit.tree()
        root_before = before.root(3)

        purge_index = audit.purge_once()

        assert purge_index == 3
        assert store.entry(0) is None and store.entry(1) is None
        kept = store.entry(2)
        assert kept is not None and json.loads(kept.entry)["n"] == 2
        purge = store.entry(3)
        assert purge is not None
        purge_fields = json.loads(purge.entry)
        assert purge_fields["kind"] == "retention_purge"
        assert purge_fields["entries_emptied"] == 2
        assert purge_fields["retention_days"] == 183
        # The tree kept every leaf: the old root still is the first three leaves', and it grew consistently.
        tree = audit.tree()
        assert tree.size == 4 and tree.root(3) == root_before
        verify_consistency(3, 4, root_before, tree.root(), tree.consistency_proof(3, 4))
        verify_inclusion(2, 4, leaf_hash(kept.entry.encode()), tree.inclusion_proof(2, 4), tree.root())
        # Exports see only what is kept; nothing older is left to purge, so a second purge logs nothing.
        assert [e.index for e in store.entries_page(None, 0, now_ms() + 1, 10, -1, 10)] == [2, 3]
        assert audit.purge_once() is None
        assert store.size() == 4
    finally:
        store.close()


async def test_final_explanations_are_archived_once_with_their_digest(store: AuditStore, tmp_path: Path) -> None:
    audit = AuditLog(store, load_or_create_signer(tmp_path / "key.pem"), retention_days=183)
    try:
        store.append([NewEntry("acme", now_ms(), {"kind": "request"}, explanation_id="exp_1")])
        store.append([NewEntry("acme", now_ms(), {"kind": "request"}, explanation_id="exp_2")])
        records = {
            "exp_1": types_pb2.Explanation(
                explanation_id="exp_1",
                state=types_pb2.EXPLANATION_STATE_SUCCEEDED,
                model="m",
                weights_digest="w" * 64,
                fidelity=types_pb2.Fidelity(max_abs_logprob_diff=1e-5),
                results=[types_pb2.MethodResult(method="saliency")],
            ),
            "exp_2": types_pb2.Explanation(explanation_id="exp_2", state=types_pb2.EXPLANATION_STATE_PENDING),
        }
        asked: list[tuple[str, str]] = []

        async def fetch(explanation_id: str, tenant: str) -> types_pb2.Explanation | None:
            asked.append((explanation_id, tenant))
            return records[explanation_id]

        assert await audit.archive_finished(fetch, within_ms=DAY_MS) == 1
        assert sorted(asked) == [("exp_1", "acme"), ("exp_2", "acme")]
        assert await audit.archive_finished(fetch, within_ms=DAY_MS) == 0  # exp_1 is archived; exp_2 still pending
        blob = store.explanation_record("exp_1", "acme")
        assert blob is not None and types_pb2.Explanation.FromString(blob) == records["exp_1"]
        assert store.explanation_record("exp_1", "beta") is None
        archived = store.entry(2)
        assert archived is not None
        fields = json.loads(archived.entry)
        assert fields["kind"] == "explanation" and fields["state"] == "EXPLANATION_STATE_SUCCEEDED"
        assert fields["methods"] == ["saliency"] and fields["fidelity_max_abs_logprob_diff"] == pytest.approx(1e-5)
        assert fields["record_sha256"] == hashlib.sha256(blob).hexdigest()
        assert store.size() == 3
    finally:
        await audit.stop()
