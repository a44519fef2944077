"""Every teemesh command pays for what the CLI imports at start-up: keep the HTTP stack out.

Only the serving commands need FastAPI, uvicorn and httpx (~0.5 s to import); they import them
when they run. A subprocess gives a clean module table.
"""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("fastapi", "uvicorn", "starlette", "httpx")


def test_importing_the_cli_leaves_the_http_stack_unloaded() -> None:
    probe = f"import sys, teemesh.cli; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == ""
