"""The Go client (clients/go): its committed generated code is current, and it builds, vets and passes its unit
tests offline with Debian's Go 1.19 and packaged gRPC sources. tests/e2e/test_go_client.py runs it against the stack."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

from tests.go_client import GO_MODULE, prepare_go_module, run_go

GENERATED = GO_MODULE / "sightline" / "v1"


def test_generated_go_code_matches_protos(tmp_path: Path) -> None:
    fresh = tmp_path / "sightlinev1"
    subprocess.run([str(GO_MODULE / "generate.sh"), sys.executable, str(fresh)], check=True)
    names = sorted(p.name for p in fresh.iterdir())
    assert names == sorted(p.name for p in GENERATED.iterdir())
    _, mismatch, errors = filecmp.cmpfiles(fresh, GENERATED, names, shallow=False)
    assert not mismatch and not errors, f"stale generated Go code, run `make proto`: {mismatch or errors}"


def test_go_client_vets_formats_and_passes_its_unit_tests() -> None:
    prepare_go_module()
    vetted = run_go("vet", "./...")
    assert vetted.returncode == 0, vetted.stdout + vetted.stderr
    unformatted = subprocess.run(
        ["gofmt", "-l", "sightline", "examples"], cwd=GO_MODULE, capture_output=True, text=True, check=True
    )  # fmt: skip
    assert unformatted.stdout == "", f"not gofmt-formatted: {unformatted.stdout}"
    # -count=1: run them, never report a cached pass. The live tests skip here (no SIGHTLINE_TEST_TARGET).
    tested = run_go("test", "-count=1", "-v", "./...")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    for unit_test in ("TestTopSourcesRanksTheCausalPrefixByAbsoluteScore", "TestGRPCCodecRoundTripsGeneratedMessages"):
        assert f"--- PASS: {unit_test}" in tested.stdout
