"""The protos are the API's source of truth: lint-clean, and the committed code matches them."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

from sightline.v1 import audit_pb2, explanations_pb2, inference_pb2, types_pb2

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "clients" / "python" / "src" / "sightline" / "v1"


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    protos = sorted(str(p) for p in (ROOT / "protos" / "sightline" / "v1").glob("*.proto"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(ROOT / "protos"), f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", *protos],
        check=True,
    )  # fmt: skip
    fresh = tmp_path / "sightline" / "v1"
    names = sorted(p.name for p in fresh.iterdir())
    assert names == sorted(p.name for p in GENERATED.iterdir() if p.name != "__init__.py" and p.is_file())
    _, mismatch, errors = filecmp.cmpfiles(fresh, GENERATED, names, shallow=False)
    assert not mismatch and not errors, f"stale generated code, run `make proto`: {mismatch or errors}"


def test_buf_lint_is_clean() -> None:
    buf = shutil.which("buf", path=str(Path(sys.executable).parent))
    assert buf, "buf is a dev dependency (buf-bin)"
    result = subprocess.run([buf, "lint"], cwd=ROOT / "protos", capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_api_stays_compatible_with_the_committed_baseline() -> None:
    buf = shutil.which("buf", path=str(Path(sys.executable).parent))
    assert buf, "buf is a dev dependency (buf-bin)"
    baseline = ROOT / "protos" / "baseline" / "sightline-v1.binpb"
    result = subprocess.run(
        [buf, "breaking", "--against", str(baseline)], cwd=ROOT / "protos", capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_file_names_its_package_for_each_language() -> None:
    for module in (audit_pb2, explanations_pb2, inference_pb2, types_pb2):
        options = module.DESCRIPTOR.GetOptions()
        assert options.go_package == "github.com/sightline/sightline-go/sightline/v1;sightlinev1"
        assert (options.java_package, options.java_multiple_files) == ("com.sightline.v1", True)
        assert (options.csharp_namespace, options.php_namespace, options.ruby_package) == (
            "Sightline.V1",
            "Sightline\\V1",
            "Sightline::V1",
        )
