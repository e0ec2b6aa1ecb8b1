"""Fixtures of the audit tests: a PostgreSQL server for the session, a fresh database (or SQLite file) per use."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from deploy.postgres import postgres_server


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """Debian's PostgreSQL 15, started from its binaries (tests/README: `make system-deps` installs it)."""
    with postgres_server() as url:
        yield url


def new_database(server_url: str) -> str:
    """A new, empty database on the session's PostgreSQL; its URL."""
    name = f"audit_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return server_url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_env(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """The gateway settings of an empty audit database: SQLite under the state dir, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return {}
    return {"SIGHTLINE_DATABASE_URL": new_database(request.getfixturevalue("postgres_url"))}
