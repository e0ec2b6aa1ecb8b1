"""A throwaway PostgreSQL server from Debian's ``postgresql`` package, for tests and benchmarks of the audit trail.

``initdb`` into a fresh directory, ``postgres`` on a free loopback port, one database; stopped and deleted on exit.
PostgreSQL refuses to run as root, so under root (CI) both run as the ``postgres`` user the package creates.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from deploy.local_stack import free_port

PG_BIN = Path(os.environ.get("SIGHTLINE_PG_BIN", "/usr/lib/postgresql/15/bin"))
HOST = "127.0.0.1"


class PostgresUnavailable(RuntimeError):
    """PostgreSQL's binaries are missing, or the server would not start; the message says which."""


def _as_server_user(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--", *argv]


@contextlib.contextmanager
def postgres_server(database: str = "sightline", *, fsync: bool = True) -> Iterator[str]:
    """Start PostgreSQL; yields the database's URL. ``fsync`` stays on by default: durability is what is tested."""
    initdb = PG_BIN / "initdb"
    if not initdb.exists():
        raise PostgresUnavailable(f"{initdb} is missing: install Debian's postgresql package (make system-deps)")
    root = Path(tempfile.mkdtemp(prefix="sightline-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        root.chmod(0o700)
    port = free_port()
    log_path = root / "postgres.log"
    process: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run(
            _as_server_user([str(initdb), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]),
            check=True,
            capture_output=True,
        )
        with log_path.open("wb") as log:
            argv = [
                str(PG_BIN / "postgres"), "-D", str(data), "-h", HOST, "-p", str(port),
                "-k", str(root), "-c", f"fsync={'on' if fsync else 'off'}", "-c", "max_connections=200",
            ]  # fmt: skip
            process = subprocess.Popen(
                _as_server_user(argv), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        _wait_ready(port, process, log_path)
        subprocess.run(
            [str(PG_BIN / "createdb"), "-h", HOST, "-p", str(port), "-U", "postgres", database],
            check=True,
            capture_output=True,
        )
        yield f"postgresql://postgres@{HOST}:{port}/{database}"
    except subprocess.CalledProcessError as exc:
        raise PostgresUnavailable(f"{exc.cmd[0]} failed: {exc.stderr.decode(errors='replace')[-2000:]}") from exc
    finally:
        if process is not None:
            process.send_signal(signal.SIGINT)  # PostgreSQL's fast shutdown: SIGTERM's would wait for clients
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(root, ignore_errors=True)


def _wait_ready(port: int, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PostgresUnavailable(f"postgres exited at start:\n{log_path.read_text(errors='replace')[-2000:]}")
        ready = subprocess.run(
            [str(PG_BIN / "pg_isready"), "-h", HOST, "-p", str(port), "-U", "postgres"], capture_output=True
        )
        if ready.returncode == 0:
            return
        time.sleep(0.2)
    raise PostgresUnavailable(f"postgres did not accept connections within 60 s:\n{log_path.read_text()[-2000:]}")
