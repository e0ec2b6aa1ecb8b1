"""A real Arize Phoenix for tests: started from its own virtualenv (``make phoenix``: its pins conflict with the
main one's) on free ports, with SQLite in a temporary directory, and read back through its REST API."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from deploy.local_stack import Child, free_port

PHOENIX_EXECUTABLE = Path(__file__).resolve().parent.parent / ".venv-phoenix" / "bin" / "phoenix"


class Phoenix:
    def __init__(self, working_dir: Path) -> None:
        self.working_dir = working_dir
        self.http_port = free_port()
        self.grpc_port = free_port()
        self._child: Child | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def otlp_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.grpc_port}"

    def __enter__(self) -> Phoenix:
        if not PHOENIX_EXECUTABLE.exists():
            raise RuntimeError(f"{PHOENIX_EXECUTABLE} is missing; `make phoenix` (part of `make test`) installs it")
        env = {
            **os.environ,
            "PHOENIX_WORKING_DIR": str(self.working_dir),
            "PHOENIX_HOST": "127.0.0.1",
            "PHOENIX_PORT": str(self.http_port),
            "PHOENIX_GRPC_PORT": str(self.grpc_port),
            "PHOENIX_TELEMETRY_ENABLED": "false",
        }
        self._child = Child("phoenix", [str(PHOENIX_EXECUTABLE), "serve"], env, self.working_dir / "phoenix.log")
        try:
            self._wait_ready(timeout=300)
        except BaseException:
            self._child.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._child is not None:
            self._child.stop()

    def _wait_ready(self, timeout: float) -> None:
        assert self._child is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._child.alive():
                raise RuntimeError(f"Phoenix exited:\n{self._child.log_tail()}")
            try:
                if httpx.get(f"{self.url}/v1/projects", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"Phoenix not ready after {timeout:.0f} s:\n{self._child.log_tail()}")

    def spans(self, project: str, trace_id: str) -> list[dict[str, Any]]:
        """Every span of ``trace_id`` that Phoenix stored in ``project`` (REST: GET /v1/projects/{p}/spans)."""
        found: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            params: dict[str, str | int] = {"limit": 1000}
            if cursor:
                params["cursor"] = cursor
            response = httpx.get(f"{self.url}/v1/projects/{project}/spans", params=params, timeout=10)
            if response.status_code == 404:
                return []  # the project appears with its first span
            response.raise_for_status()
            body = response.json()
            found += [span for span in body["data"] if span["context"]["trace_id"] == trace_id]
            cursor = body.get("next_cursor")
            if not cursor:
                return found

    def wait_for_spans(self, project: str, trace_id: str, names: set[str], timeout: float = 60) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            spans = self.spans(project, trace_id)
            if names <= {span["name"] for span in spans} or time.monotonic() > deadline:
                return spans
            time.sleep(0.5)
