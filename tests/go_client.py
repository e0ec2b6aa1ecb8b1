"""Running the Go client's toolchain (clients/go) offline, on Debian's packaged Go sources, as CI does."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest

GO_MODULE = Path(__file__).resolve().parent.parent / "clients" / "go"


def go_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every go command: vendor mode over Debian's sources, never the module proxy."""
    return {**os.environ, "GOFLAGS": "-mod=vendor", "GOPROXY": "off", **(extra or {})}


def prepare_go_module() -> None:
    """Link clients/go/vendor to Debian's Go sources; fails the test with the reason when they are missing."""
    if shutil.which("go") is None:
        pytest.fail("go is not installed; run the tests with `make test`, whose system-deps installs golang-go")
    vendored = subprocess.run(
        [str(GO_MODULE / "debian-vendor.sh")], capture_output=True, text=True, check=False
    )  # fmt: skip
    if vendored.returncode != 0:
        pytest.fail(vendored.stderr)


def run_go(*args: str, env: Mapping[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``go ARGS`` in clients/go, its output captured (the caller checks the exit status)."""
    return subprocess.run(
        ["go", *args], cwd=GO_MODULE, env=go_env(env), capture_output=True, text=True, timeout=timeout, check=False
    )  # fmt: skip
