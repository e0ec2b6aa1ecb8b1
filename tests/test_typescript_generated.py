"""The TypeScript SDK's committed generated code (clients/typescript/src/gen) is what `make proto-ts` makes now."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "clients" / "typescript"
GENERATED = PACKAGE / "src" / "gen"


def _relative_files(directory: Path) -> list[str]:
    return sorted(str(path.relative_to(directory)) for path in directory.rglob("*") if path.is_file())


def test_generated_typescript_matches_protos(tmp_path: Path) -> None:
    buf = shutil.which("buf", path=str(Path(sys.executable).parent))
    assert buf, "buf is a dev dependency (buf-bin)"
    if not (PACKAGE / "node_modules" / ".bin" / "protoc-gen-es").exists():
        # The pinned plugin is part of what this checks; `make test` runs npm ci for it.
        pytest.fail("clients/typescript/node_modules is missing; run `make test`, which installs it")
    # --output moves the template's `out` (src/gen) under tmp_path; inputs and the plugin resolve from the package.
    result = subprocess.run(
        [buf, "generate", "--output", str(tmp_path)], cwd=PACKAGE, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    fresh = tmp_path / "src" / "gen"
    names = _relative_files(fresh)
    assert names == _relative_files(GENERATED), "stale generated TypeScript, run `make proto-ts`"
    _, mismatch, errors = filecmp.cmpfiles(fresh, GENERATED, names, shallow=False)
    assert not mismatch and not errors, f"stale generated TypeScript, run `make proto-ts`: {mismatch or errors}"
