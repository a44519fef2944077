"""Every teemesh command pays for what the CLI imports at start-up: keep the HTTP stack out.

Only the serving commands need FastAPI, uvicorn and httpx (~0.5 s to import); they import them
when they run. The sidecar is a long-lived process in every CVM whose idle memory counts: the
process ``teemesh sidecar run`` becomes (``python -m teemesh.sidecar``) loads neither the CLI,
pydantic, YAML nor the X.509 library (its admission helper, a child process, does), no HTTP
client library, no quote verifier, no secp256k1 or Keccak, no rich, no msgpack, no SQLite.
A subprocess gives a clean module table.
"""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("fastapi", "uvicorn", "starlette", "httpx")
NOT_IN_THE_SIDECAR = (
    *HEAVY,
    "dcap_qvl",
    "coincurve",
    "Crypto",
    "rich",
    "pygments",
    "msgpack",
    "sqlite3",
    "click",
    "pydantic",
    "pydantic_core",
    "yaml",
    "cryptography",
    "teemesh.attest",
    "teemesh.config",
)


def _loaded(imports: str, modules: tuple[str, ...]) -> list[str]:
    probe = f"import sys, {imports}; print(','.join(m for m in {modules!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()
    return out.split(",") if out else []


def test_importing_the_cli_leaves_the_http_stack_unloaded() -> None:
    assert _loaded("teemesh.cli", HEAVY) == []


def test_the_sidecar_loads_no_heavy_module_it_does_not_use() -> None:
    assert _loaded("teemesh.sidecar.__main__", NOT_IN_THE_SIDECAR) == []


def test_the_cli_keeps_the_http_stack_out_of_sidecar_commands() -> None:
    assert _loaded("teemesh.cli, teemesh.cli.sidecar", HEAVY) == []


def test_the_probe_sees_what_is_loaded() -> None:
    """The check above would pass vacuously if the probe could not see a loaded module."""
    assert _loaded("teemesh.cli._output, rich.console", ("rich", "sqlite3")) == ["rich"]


def test_the_consoles_load_rich_when_first_used() -> None:
    probe = (
        "import sys; from teemesh.cli._output import stdout, table; "
        "print('rich' in sys.modules); stdout.print(table('t', [('key', 'value')])); "
        "print('rich' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["False", "t", "key", "value", "True"]
