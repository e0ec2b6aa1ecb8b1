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
