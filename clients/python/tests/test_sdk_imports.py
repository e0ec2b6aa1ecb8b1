from __future__ import annotations

import json
import subprocess
import sys

HEAVY_PACKAGES = {"torch", "numpy", "vllm", "redis", "transformers"}


def test_importing_the_sdk_and_cli_loads_no_heavy_package() -> None:
    # A fresh interpreter, because this test process may already have loaded any of them.
    script = (
        "import json, sys\n"
        "import sightline, sightline.cli\n"
        f"heavy = {sorted(HEAVY_PACKAGES)!r}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)

    assert json.loads(completed.stdout) == []


def test_the_sdk_and_cli_import_without_pillow_which_only_the_overlay_needs() -> None:
    # PIL blocked as if not installed: any import of it would raise (test_sdk_images checks the overlay's message).
    script = "import sys\nsys.modules['PIL'] = None\nimport sightline, sightline.cli, sightline.overlay\nprint('ok')\n"
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)

    assert (completed.returncode, completed.stdout) == (0, "ok\n"), completed.stderr
