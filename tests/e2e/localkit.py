"""What the e2e tests share: the ``teemesh`` command, calls made from inside a CVM, the host's
namespaces and links (to show ``down`` left nothing), and waiting for readiness."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
TEEMESH = str(Path(sys.executable).parent / "teemesh")
CALLS = """
import collections, json, sys, urllib.request
url, n = sys.argv[1], int(sys.argv[2])
counts, errors = collections.Counter(), collections.Counter()
for _ in range(n):
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            counts[json.loads(reply.read()).get("peer_id")] += 1
    except Exception as exc:
        errors[type(exc).__name__] += 1
print(json.dumps({"counts": counts, "errors": errors}))
"""
FETCH = """
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=5) as reply:
    sys.stdout.write(reply.read().decode())
"""


def teemesh(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TEEMESH, *map(str, args)], capture_output=True, text=True, timeout=timeout, check=False
    )


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True, check=True)
    return {n["name"] for n in json.loads(out.stdout or "[]")}


def links() -> set[str]:
    out = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True)
    return {link["ifname"] for link in json.loads(out.stdout or "[]")}


def fetch(state: Path, cvm: str, url: str) -> subprocess.CompletedProcess[str]:
    return teemesh("exec", cvm, "--state", state, "--", sys.executable, "-c", FETCH, url)


def calls(state: Path, cvm: str, url: str, n: int = 20) -> dict[str, Any]:
    """``n`` calls of ``url`` from inside ``cvm``: answers per peer id, errors per kind."""
    result = teemesh("exec", cvm, "--state", state, "--", sys.executable, "-c", CALLS, url, n)
    assert result.returncode == 0, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def wait_ready(state: Path, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        doc = json.loads(teemesh("status", "--state", state, "--json").stdout)
        if all(c.get("ready", True) for c in doc["cvms"]):
            return doc
        if time.monotonic() > deadline:
            pytest.fail(f"cluster not ready again: {doc}")
        time.sleep(0.5)


def store_peer_members(
    state: Path, cvm: str, peer_url: str, store: str, *, certified: bool
) -> subprocess.CompletedProcess[str]:
    """From ``cvm``, ask an etcd peer of the coordinators' ``store`` (``etcd`` or ``dcs``) for
    its members, trusting the store CA and, if ``certified``, presenting coordinator-0's member
    certificate (files only a coordinator CVM has on dstack; the local platform keeps every
    CVM's files on this host, and etcd holds a peer to its certificate's addresses anyway)."""
    tls = state / "cvms" / "coordinator-0" / f"{store}-tls"
    flags: list[str | Path] = ["--cacert", tls / "ca.crt"]
    if certified:
        flags += ["--cert", tls / "member.crt", "--key", tls / "member.key"]
    return teemesh("exec", cvm, "--state", state, "--", "curl", "-sS", "--http1.1",
                   "--max-time", "3", *flags, f"{peer_url}/members")  # fmt: skip
