"""Several gateways on one PostgreSQL log, and gateways killed mid-append: one consistent log, nothing
acknowledged lost, no half-written entry."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from sightline import Client, SightlineError
from sightline.audit_export import load_public_key, verify_export
from sightline.audit_merkle import leaf_hash

from server.audit.store import AuditStore, open_store
from tests.audit.conftest import new_database
from tests.audit.harness import Gateway, backend


def check_whole_log(store: AuditStore) -> list[dict[str, object]]:
    """Every index from 0 to the head's size is one complete entry whose leaf hash matches; the entries."""
    size = store.size()
    hashes = store.leaf_hashes(0, size + 10)
    assert len(hashes) == size, "rows past the head, or a gap below it"
    entries = []
    for index in range(size):
        stored = store.entry(index)
        assert stored is not None, f"entry {index} is missing"
        fields = json.loads(stored.entry)
        assert fields["index"] == index
        assert leaf_hash(stored.entry.encode()) == hashes[index]
        entries.append(fields)
    return entries


def hammer(addresses: list[str], per_client: int, acknowledged: list[str], stop: threading.Event) -> list[str]:
    """Generate from 4 threads per address until ``per_client`` calls each or ``stop``; request ids of the OKs."""
    errors: list[str] = []

    def client_loop(address: str, worker: int) -> None:
        with Client(address, timeout=20) as client:
            for n in range(per_client):
                if stop.is_set():
                    return
                request_id = f"{address}-{worker}-{n}"
                try:
                    client.generate(f"call {n}", max_tokens=1, request_id=request_id)
                except SightlineError as error:
                    errors.append(str(error))
                    continue
                acknowledged.append(request_id)  # list.append is atomic

    threads = [
        threading.Thread(target=client_loop, args=(address, worker)) for address in addresses for worker in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_two_gateways_appending_to_one_postgresql_make_one_consistent_log(postgres_url: str, tmp_path: Path) -> None:
    database = new_database(postgres_url)
    env = {"SIGHTLINE_DATABASE_URL": database}
    acknowledged: list[str] = []
    with backend(tmp_path) as running:
        first = Gateway(running, "gateway-1", env)
        second = Gateway(running, "gateway-2", env)  # same state dir: the same signing key file
        try:
            errors = hammer([first.address, second.address], 40, acknowledged, threading.Event())
            with Client(second.address, timeout=60) as client:
                client.export_audit(tmp_path / "all.jsonl", tenant="*")
        finally:
            first.stop()
            second.stop()
    assert errors == []
    store = open_store(database, tmp_path)
    try:
        entries = check_whole_log(store)
    finally:
        store.close()
    assert len(entries) == len(acknowledged) == 2 * 4 * 40
    assert sorted(str(e["request_id"]) for e in entries) == sorted(acknowledged)  # each call once, none twice
    public_key = load_public_key((tmp_path / "audit" / "signing-key.pem.pub").read_bytes())
    assert verify_export(tmp_path / "all.jsonl", public_key).entries == len(entries)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_sigkill_mid_append_loses_no_acknowledged_entry(
    database: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = None if database == "sqlite" else new_database(request.getfixturevalue("postgres_url"))
    env = {} if url is None else {"SIGHTLINE_DATABASE_URL": url}
    acknowledged: list[str] = []
    with backend(tmp_path) as running:
        gateway = Gateway(running, "doomed", env)
        stop = threading.Event()
        clients = threading.Thread(target=hammer, args=([gateway.address], 10_000, acknowledged, stop))
        clients.start()
        try:
            deadline = time.monotonic() + 60
            while len(acknowledged) < 100 and time.monotonic() < deadline:
                time.sleep(0.05)
            gateway.kill()  # while 4 clients have calls in flight
        finally:
            stop.set()
            clients.join()
            gateway.stop()
        assert len(acknowledged) >= 100

        store = open_store(url, tmp_path)
        try:
            entries = check_whole_log(store)
            size_after_crash = store.size()
        finally:
            store.close()
        logged = {str(e["request_id"]) for e in entries}
        assert set(acknowledged) <= logged
        assert len(logged) >= len(acknowledged)  # some calls may have committed without their reply getting out

        # A new gateway continues the same log where the dead one stopped, and it all still verifies.
        successor = Gateway(running, "successor", env)
        try:
            with Client(successor.address, timeout=30) as client:
                client.generate("after the crash", max_tokens=1, request_id="after-crash")
                client.export_audit(tmp_path / "all.jsonl", tenant="*")
        finally:
            successor.stop()
    public_key = load_public_key((tmp_path / "audit" / "signing-key.pem.pub").read_bytes())
    verified = verify_export(tmp_path / "all.jsonl", public_key)
    assert verified.entries == size_after_crash + 1
    last = json.loads(str(json.loads((tmp_path / "all.jsonl").read_text().splitlines()[-2])["entry"]))
    assert last["request_id"] == "after-crash" and last["index"] == size_after_crash
