"""The audit trail's SQL storage: an embedded SQLite file by default, PostgreSQL when a URL names one.

Both hold the same three tables:

- ``audit_log``: one row per log entry, by index (``seq``), with its tenant, end time, explanation id, the
  canonical entry text and its RFC 6962 leaf hash. A retention purge empties ``entry`` and keeps ``leaf_hash``,
  so the Merkle tree, and every proof of the entries kept, stays the same.
- ``audit_head``: one row holding the log's size. Appends lock it (``FOR UPDATE`` in PostgreSQL; SQLite's
  ``BEGIN IMMEDIATE`` locks the whole file) and update it in the transaction that inserts the entries, so
  gateways sharing a database allocate indices one transaction at a time: one log, no duplicate or skipped index.
- ``explanation_records``: the final explanation records (serialized ``sightline.v1.Explanation``) archived from
  Redis, whose SHA-256 an ``explanation`` log entry carries.

An append is one transaction; the caller is told its entries' indices only after it commits, and a process
killed mid-append leaves the transaction uncommitted, so no half-entry is ever visible. Calls are blocking:
the log runs them on its own threads.
"""

from __future__ import annotations

import contextlib
import secrets
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psycopg
from sightline.audit_export import canonical_json
from sightline.audit_merkle import leaf_hash

from server.errors import ConfigError

# The PostgreSQL advisory lock taken while creating the tables (any constant; "audit" in ASCII, shortened).
SCHEMA_LOCK_KEY = 0x617564
# What a database that is down, restarting or unreachable raises, from either driver.
DATABASE_ERRORS = (sqlite3.Error, psycopg.Error)

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS audit_log (
        seq BIGINT PRIMARY KEY,
        tenant TEXT NOT NULL,
        recorded_at_ms BIGINT NOT NULL,
        explanation_id TEXT,
        entry TEXT,
        leaf_hash {blob} NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS audit_log_tenant_time ON audit_log (tenant, recorded_at_ms)",
    "CREATE INDEX IF NOT EXISTS audit_log_time ON audit_log (recorded_at_ms)",
    "CREATE TABLE IF NOT EXISTS audit_head (id INTEGER PRIMARY KEY, size BIGINT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS explanation_records (
        explanation_id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        archived_at_ms BIGINT NOT NULL,
        record {blob} NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS explanation_records_time ON explanation_records (archived_at_ms)",
)


@dataclass(frozen=True)
class NewEntry:
    """An entry before the log gives it its index. ``fields`` must not hold ``index``."""

    tenant: str
    recorded_at_ms: int
    fields: dict[str, Any]
    explanation_id: str | None = None


@dataclass(frozen=True)
class StoredEntry:
    index: int
    tenant: str
    entry: str


def entry_text(entry: NewEntry, index: int) -> str:
    """The canonical text of ``entry`` at ``index``: what is hashed, stored and exported.

    Each entry gets 128 random bits (``nonce``): a leaf hash another tenant sees in a proof then cannot be matched
    against a guessed entry (same prompt, same second), so the proof tells them nothing of its content.
    """
    text: str = canonical_json({**entry.fields, "index": index, "nonce": secrets.token_hex(16)}).decode()
    return text


class Connection(Protocol):
    def execute(self, sql: str, params: Sequence[Any] = ...) -> Any: ...
    def cursor(self) -> Any: ...
    def commit(self) -> None: ...
    def rollback(self) -> None: ...
    def close(self) -> None: ...


class AuditStore:
    """Blocking SQL access to the audit tables; one connection per thread that uses it."""

    def __init__(self, connect: Callable[[], Connection], *, placeholder: str, lock_head: str) -> None:
        self._connect = connect
        self._placeholder = placeholder
        self._lock_head = lock_head
        self._local = threading.local()
        self._all: list[Connection] = []
        self._all_lock = threading.Lock()

    def _sql(self, sql: str) -> str:
        return sql.replace("?", self._placeholder)

    @property
    def _connection(self) -> Connection:
        connection: Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._connect()
            self._local.connection = connection
            with self._all_lock:
                self._all.append(connection)
        return connection

    def _run(self, work: Callable[[Connection], Any]) -> Any:
        """``work`` in one transaction: committed when it returns, rolled back when it raises."""
        connection = self._connection
        try:
            result = work(connection)
            connection.commit()
        except BaseException:
            self._roll_back(connection)
            raise
        return result

    def _read(self, work: Callable[[Connection], Any]) -> Any:
        """``work`` that only reads: tried once more on a new connection when this thread's was broken while idle
        (the database restarted since), which a write must not be (its commit may have happened)."""
        try:
            return self._run(work)
        except DATABASE_ERRORS:
            if getattr(self._local, "connection", None) is not None:
                raise  # the connection is fine: the error is the query's
            return self._run(work)

    def _roll_back(self, connection: Connection) -> None:
        """Roll back; a connection that cannot (the database restarted, the network dropped) is replaced by a new
        one at this thread's next transaction."""
        try:
            connection.rollback()
        except Exception:
            self._local.connection = None
            with self._all_lock:
                if connection in self._all:
                    self._all.remove(connection)
            with contextlib.suppress(Exception):
                connection.close()

    def _create_schema(self, blob: str, *, first: Sequence[str] = ()) -> None:
        """Create the tables unless they exist; ``first`` runs before, in the same transaction."""

        def create(connection: Connection) -> None:
            for statement in (*first, *SCHEMA):
                connection.execute(statement.format(blob=blob))
            connection.execute("INSERT INTO audit_head (id, size) VALUES (1, 0) ON CONFLICT (id) DO NOTHING")

        self._run(create)

    def append(self, entries: Sequence[NewEntry]) -> list[int]:
        """Give ``entries`` the next indices and store them in one transaction; their indices once committed."""
        return list(self._run(lambda connection: self._append(connection, entries)))

    def _append(self, connection: Connection, entries: Sequence[NewEntry]) -> list[int]:
        # Allocating the indices takes the head row's lock until commit: the next append waits for this one.
        end = int(
            connection.execute(
                self._sql("UPDATE audit_head SET size = size + ? WHERE id = 1 RETURNING size"), (len(entries),)
            ).fetchone()[0]
        )
        start = end - len(entries)
        rows = []
        for index, entry in enumerate(entries, start=start):
            text = entry_text(entry, index)
            rows.append(
                (index, entry.tenant, entry.recorded_at_ms, entry.explanation_id, text, leaf_hash(text.encode()))
            )
        # executemany: psycopg sends every row without waiting for each answer (pipeline mode), one round trip.
        connection.cursor().executemany(
            self._sql(
                "INSERT INTO audit_log (seq, tenant, recorded_at_ms, explanation_id, entry, leaf_hash) "
                "VALUES (?, ?, ?, ?, ?, ?)"
            ),
            rows,
        )
        return list(range(start, end))

    def size(self) -> int:
        return int(self._read(lambda c: c.execute("SELECT size FROM audit_head WHERE id = 1").fetchone()[0]))

    def leaf_hashes(self, start: int, end: int) -> list[bytes]:
        """The leaf hashes of indices ``start`` to ``end - 1``, in order."""
        rows = self._read(
            lambda c: c.execute(
                self._sql("SELECT leaf_hash FROM audit_log WHERE seq >= ? AND seq < ? ORDER BY seq"), (start, end)
            ).fetchall()
        )
        return [bytes(row[0]) for row in rows]

    def entry(self, index: int) -> StoredEntry | None:
        row = self._read(
            lambda c: c.execute(
                self._sql("SELECT seq, tenant, entry FROM audit_log WHERE seq = ?"), (index,)
            ).fetchone()
        )
        if row is None or row[2] is None:
            return None
        return StoredEntry(int(row[0]), str(row[1]), str(row[2]))

    def entries_page(
        self, tenant: str | None, since_ms: int, until_ms: int, below: int, after: int, limit: int
    ) -> list[StoredEntry]:
        """Up to ``limit`` kept entries of ``tenant`` (every tenant: None) that ended in [since_ms, until_ms), with
        ``after`` < index < ``below``, in index order."""
        where = "seq > ? AND seq < ? AND recorded_at_ms >= ? AND recorded_at_ms < ? AND entry IS NOT NULL"
        params: list[Any] = [after, below, since_ms, until_ms]
        if tenant is not None:
            where += " AND tenant = ?"
            params.append(tenant)
        sql = self._sql(f"SELECT seq, tenant, entry FROM audit_log WHERE {where} ORDER BY seq LIMIT {int(limit)}")
        rows = self._read(lambda c: c.execute(sql, params).fetchall())
        return [StoredEntry(int(row[0]), str(row[1]), str(row[2])) for row in rows]

    def unarchived_explanations(self, since_ms: int, limit: int) -> list[tuple[str, str]]:
        """(explanation id, tenant) of logged explanations, recorded since ``since_ms``, with no archived record."""
        rows = self._read(
            lambda c: c.execute(
                self._sql(
                    # One request entry per explanation id, so no DISTINCT; oldest first, as they finish first.
                    "SELECT l.explanation_id, l.tenant FROM audit_log l LEFT JOIN explanation_records r "
                    "ON r.explanation_id = l.explanation_id WHERE l.explanation_id IS NOT NULL "
                    "AND r.explanation_id IS NULL AND l.recorded_at_ms >= ? "
                    f"ORDER BY l.seq LIMIT {int(limit)}"
                ),
                (since_ms,),
            ).fetchall()
        )
        return [(str(row[0]), str(row[1])) for row in rows]

    def archive_explanation(self, explanation_id: str, tenant: str, record: bytes, entry: NewEntry) -> int | None:
        """Store a final record and its log entry in one transaction; None when another gateway archived it first."""

        def archive(connection: Connection) -> int | None:
            connection.execute(self._lock_head).fetchone()  # serialises archivers, like appends
            exists = connection.execute(
                self._sql("SELECT 1 FROM explanation_records WHERE explanation_id = ?"), (explanation_id,)
            ).fetchone()
            if exists is not None:
                return None
            connection.execute(
                self._sql(
                    "INSERT INTO explanation_records (explanation_id, tenant, archived_at_ms, record) "
                    "VALUES (?, ?, ?, ?)"
                ),
                (explanation_id, tenant, entry.recorded_at_ms, record),
            )
            return self._append(connection, [entry])[0]

        result: int | None = self._run(archive)
        return result

    def explanation_record(self, explanation_id: str, tenant: str | None) -> bytes | None:
        row = self._read(
            lambda c: c.execute(
                self._sql("SELECT tenant, record FROM explanation_records WHERE explanation_id = ?"), (explanation_id,)
            ).fetchone()
        )
        if row is None or (tenant is not None and row[0] != tenant):
            return None
        return bytes(row[1])

    def purge(self, cutoff_ms: int, make_entry: Callable[[int, int, int], NewEntry]) -> int | None:
        """Empty the entries and delete the explanation records older than ``cutoff_ms``, and log that, in one
        transaction; the purge entry's index, or None when nothing was old enough."""

        def purge(connection: Connection) -> int | None:
            connection.execute(self._lock_head).fetchone()
            emptied = connection.execute(
                self._sql("UPDATE audit_log SET entry = NULL WHERE recorded_at_ms < ? AND entry IS NOT NULL"),
                (cutoff_ms,),
            ).rowcount
            deleted = connection.execute(
                self._sql("DELETE FROM explanation_records WHERE archived_at_ms < ?"), (cutoff_ms,)
            ).rowcount
            if emptied <= 0 and deleted <= 0:
                return None
            return self._append(connection, [make_entry(cutoff_ms, max(emptied, 0), max(deleted, 0))])[0]

        result: int | None = self._run(purge)
        return result

    def database_bytes(self) -> int:
        """What the audit tables take on disk (the SQLite file; PostgreSQL's table sizes)."""
        raise NotImplementedError

    def close(self) -> None:
        with self._all_lock:
            for connection in self._all:
                connection.close()
            self._all.clear()


class SqliteAuditStore(AuditStore):
    """The embedded default: one SQLite file in WAL mode with ``synchronous=FULL`` (a commit is on disk)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path

        def connect() -> Connection:
            connection = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
            return connection

        super().__init__(
            connect,
            placeholder="?",
            # BEGIN IMMEDIATE already holds the file's write lock; this reads the size under it.
            lock_head="SELECT size FROM audit_head WHERE id = 1",
        )
        self._create_schema("BLOB")

    def _run(self, work: Callable[[Connection], Any]) -> Any:
        connection = self._connection
        connection.execute("BEGIN IMMEDIATE")  # takes the file's write lock now: appends queue here, in order
        try:
            result = work(connection)
            connection.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            raise
        return result

    def database_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + "*") if p.is_file())


class PostgresAuditStore(AuditStore):
    """PostgreSQL (``SIGHTLINE_DATABASE_URL``): appends lock the head row, so gateways share one log."""

    def __init__(self, url: str) -> None:
        def connect() -> Connection:
            connection: Connection = psycopg.connect(url, autocommit=False)
            return connection

        super().__init__(connect, placeholder="%s", lock_head="SELECT size FROM audit_head WHERE id = 1 FOR UPDATE")
        # Two gateways starting together on a new database must not both create the tables.
        self._create_schema("BYTEA", first=[f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK_KEY})"])

    def database_bytes(self) -> int:
        row = self._run(
            lambda c: c.execute(
                "SELECT pg_total_relation_size('audit_log') + pg_total_relation_size('audit_head') "
                "+ pg_total_relation_size('explanation_records')"
            ).fetchone()
        )
        return int(row[0])


def open_store(database_url: str | None, state_dir: Path) -> AuditStore:
    """PostgreSQL when ``database_url`` names one, else ``<state_dir>/audit/audit.sqlite3``."""
    if database_url:
        if not database_url.startswith(("postgres://", "postgresql://")):
            raise ConfigError(
                "SIGHTLINE_DATABASE_URL must be a postgresql:// URL; "
                f"got one starting {database_url.split(':', 1)[0][:20]!r}"
            )
        try:
            return PostgresAuditStore(database_url)
        except Exception as exc:  # psycopg's errors: a bad URL, a refused connection, a missing database
            raise ConfigError(f"cannot open the audit database SIGHTLINE_DATABASE_URL: {exc}") from exc
    return SqliteAuditStore(state_dir / "audit" / "audit.sqlite3")
