"""The gateway installs and imports without torch, transformers, numpy or vLLM (its image has none of them):
pyproject's base dependencies leave them to the `explainer` extra, and nothing the gateway imports needs them."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "numpy", "vllm", "safetensors", "accelerate", "gguf")

# Runs in a fresh interpreter in which importing any of HEAVY fails, as it would in the gateway's image.
BLOCKED_IMPORT = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HEAVY!r}:
            raise ImportError(f"{{name}} is not installed in the gateway image")
        return None
sys.meta_path.insert(0, Block())
import server.app, server.__main__, server.vllm_pool
print("imported")
"""


def requirement_name(requirement: str) -> str:
    for separator in ("=", "<", ">", "[", "~", "!", ";", " "):
        requirement = requirement.split(separator, 1)[0]
    return requirement.lower()


def test_the_base_install_pulls_no_model_code_and_the_explainer_extra_does() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {requirement_name(r) for r in project["dependencies"]}
    assert not base & set(HEAVY)
    explainer = {requirement_name(r) for r in project["optional-dependencies"]["explainer"]}
    assert {"torch", "transformers", "numpy"} <= explainer
    assert "sightline-stack[explainer]" in project["optional-dependencies"]["dev"]


def test_the_gateway_imports_without_model_code() -> None:
    result = subprocess.run(
        [sys.executable, "-c", BLOCKED_IMPORT], capture_output=True, text=True, cwd=ROOT, check=False, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "imported"


CONTAINERFILES = ROOT / "deploy" / "containers"


def stages_and_copies(path: Path) -> tuple[list[str], list[tuple[str | None, list[str]]]]:
    """A Containerfile's stage names in order, and each COPY's --from stage (None: the build context) and sources."""
    stages: list[str] = []
    copies: list[tuple[str | None, list[str]]] = []
    for line in path.read_text().splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "FROM":
            stages.append(words[3] if len(words) >= 4 and words[2].upper() == "AS" else "")
        elif words[0] == "COPY":
            source_stage = next((w.split("=", 1)[1] for w in words[1:] if w.startswith("--from=")), None)
            paths = [w for w in words[1:] if not w.startswith("--")]
            copies.append((source_stage, paths[:-1]))
    return stages, copies


def test_containerfiles_copy_what_exists_from_stages_defined_before() -> None:
    """No container builder reaches a registry in this sandbox (buildah installs, but cannot pull a base image):
    the Containerfiles are checked statically instead."""
    for path in sorted(CONTAINERFILES.glob("*.Containerfile")):
        stages, copies = stages_and_copies(path)
        assert stages, path
        for source_stage, sources in copies:
            if source_stage is None:
                for source in sources:
                    assert (ROOT / source).exists(), f"{path.name}: COPY {source} does not exist"
            else:
                assert source_stage in stages, f"{path.name}: COPY --from={source_stage} names no stage"
        for target in ("explainer", "vllm-cpu"):
            if path.name.startswith("explainer"):
                assert target in stages, target


def test_the_gateway_image_installs_no_extra() -> None:
    text = (CONTAINERFILES / "gateway.Containerfile").read_text()
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert installs and not any("[" in line for line in installs)
    assert 'ENTRYPOINT ["python", "-m", "server"]' in text
