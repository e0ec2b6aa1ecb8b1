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
