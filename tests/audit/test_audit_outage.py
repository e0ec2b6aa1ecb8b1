"""The audit database going away: calls fail UNAVAILABLE rather than answer without a trail, and the gateway
recovers by itself once the database is back."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import psycopg
import pytest
from sightline import Client, SightlineError

from tests.audit.conftest import new_database
from tests.audit.harness import Gateway, backend


def test_calls_fail_unavailable_while_the_database_is_gone_and_recover_after(postgres_url: str, tmp_path: Path) -> None:
    database = new_database(postgres_url)
    name = database.rsplit("/", 1)[1]
    with backend(tmp_path) as running:
        gateway = Gateway(running, "gateway", {"SIGHTLINE_DATABASE_URL": database})
        try:
            with Client(gateway.address, timeout=30) as client, psycopg.connect(postgres_url, autocommit=True) as admin:
                client.generate("before", max_tokens=1, request_id="before")
                # The database refuses new connections and drops the gateway's: as if it went down.
                admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
                admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
                with pytest.raises(SightlineError) as refused:
                    client.generate("during", max_tokens=1, request_id="during")
                assert refused.value.code == grpc.StatusCode.UNAVAILABLE
                assert "audit trail could not record this call" in refused.value.details

                admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
                deadline = time.monotonic() + 30
                while True:  # the writer's broken connection is replaced at its next transaction
                    try:
                        client.generate("after", max_tokens=1, request_id="after")
                        break
                    except SightlineError as error:
                        assert error.code == grpc.StatusCode.UNAVAILABLE
                        assert time.monotonic() < deadline, "the gateway did not recover"
                        time.sleep(0.5)
                client.export_audit(tmp_path / "trail.jsonl")
        finally:
            gateway.stop()
    records = [json.loads(line) for line in (tmp_path / "trail.jsonl").read_text().splitlines()]
    logged = [json.loads(r["entry"])["request_id"] for r in records if r["type"] == "entry"]
    assert logged[0] == "before" and logged[-1] == "after"
    assert "during" not in logged  # refused because it could not be logged: its result was never given out
