"""Run a panel test file as a script under Forge's gradio 4 (.venv-gradio4, or MC_GRADIO4_PYTHON)
and return what it found; skipped without that environment (failed when CI requires it)."""

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def problems_under_gradio4(script: str) -> list:
    import pytest
    python = os.environ.get("MC_GRADIO4_PYTHON") or str(ROOT / ".venv-gradio4" / "bin" / "python")
    if not os.path.exists(python):
        if os.environ.get("MC_REQUIRE_BROWSER") == "1":
            pytest.fail(f"no gradio 4 environment at {python}")
        pytest.skip(f"no gradio 4 environment at {python}")
    run = subprocess.run([python, script], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    assert run.returncode == 0, run.stderr[-3000:]
    version, found = json.loads(run.stdout.strip().splitlines()[-1])
    assert version.startswith("4."), version
    return found
