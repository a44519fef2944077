"""The render loop on the local platform: ``teemesh render`` writes the files a user uploads to
dstack, ``teemesh up --rendered`` runs those very bytes, and a byte changed in one app's
app-compose.json gets that app's CVMs refused (``COMPOSE_HASH_NOT_ALLOWED``) while the others
are admitted; ``restart`` measures the folder's bytes again.

Needs root. Tests run in file order and share one folder; the cluster is always taken down.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from localkit import fetch, teemesh, wait_ready

pytestmark = pytest.mark.e2e
SPEC = """
cluster: rendered
tee: simulated
os_image: dstack-0.5.7-sim
network: 10.86.0.0/24
coordinators: {count: 1, store: embedded}
kms: {count: 1}
workload_groups:
  api:
    command: python -m teemesh.examples.starter --port 8080
    backends:
      api: {port: 8080, health: {http: /hello}}
    routes:
      api: {backend: api}
  worker:
    replicas: 2
    command: python -m teemesh.examples.starter --port 9090
    backends:
      worker: {port: 9090, health: {http: /hello}}
    routes:
      worker: {backend: worker, callers: [api]}
"""
APPS = ["api", "worker", "coordinator"]
WORKERS = ["worker-0", "worker-1"]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The spec, its render folder ``out`` and the cluster's ``state``; always taken down."""
    if os.geteuid() != 0:
        pytest.fail("the e2e tests make network namespaces: run them as root")
    home = tmp_path_factory.mktemp("rendered")
    (home / "cluster.yaml").write_text(textwrap.dedent(SPEC))
    try:
        yield home
    finally:
        teemesh("down", "--state", home / "state")


def up(home: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return teemesh("up", home / "cluster.yaml", "--state", home / "state", "--rendered",
                   home / "out", "--timeout", str(timeout), timeout=timeout + 90)  # fmt: skip


def status(home: Path) -> dict[str, dict[str, Any]]:
    result = teemesh("status", "--state", home / "state", "--json")
    assert result.returncode == 0, result.stderr
    return {c["name"]: c for c in json.loads(result.stdout)["cvms"]}


def test_render_writes_what_its_hashes_and_policy_say(home: Path) -> None:
    result = teemesh("render", home / "cluster.yaml", "--out", home / "out",
                     "--allow-unpinned-images")  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    out = home / "out"
    policy = json.loads((out / "cluster-policy.json").read_text())
    assert policy["cluster"] == "rendered" and "platform_key" not in policy
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(APPS)
    for app in APPS:
        digest = hashlib.sha256((out / app / "app-compose.json").read_bytes()).hexdigest()
        assert (out / app / "compose-hash").read_text() == f"{digest}\n", app
        if app != "coordinator":  # the coordinators admit the workload groups
            assert policy["groups"][app]["compose_hashes"] == [digest], app


def test_up_rendered_runs_the_rendered_bytes_and_admits_every_cvm(home: Path) -> None:
    result = up(home)
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "differs" not in result.stderr, result.stderr
        cvms = status(home)
        assert sorted(cvms) == sorted(["kms-0", "coordinator-0", "api-0", *WORKERS])
        for name, cvm in cvms.items():
            assert set(cvm["processes"].values()) == {"running"}, cvm
            app = {"kms-0": None, "coordinator-0": "coordinator"}.get(name, cvm["group"])
            measured = home / "state" / "cvms" / name / "app-compose.json"
            if app is not None:
                rendered = home / "out" / app / "app-compose.json"
                assert measured.read_bytes() == rendered.read_bytes(), name
            if cvm["role"] == "workload":
                assert cvm["sidecar"]["admission"]["state"] == "admitted", cvm
        called = fetch(home / "state", "api-0", "http://worker:9090/hello")
        assert called.returncode == 0, called.stderr
        assert json.loads(called.stdout)["peer_id"] in WORKERS
    finally:
        down = teemesh("down", "--state", home / "state")
        assert down.returncode == 0, down.stderr


def flip(path: Path) -> None:
    """Change one byte: the first character of the first image name in docker_compose_file."""
    data = path.read_bytes()
    at = data.index(b"image: ") + len(b"image: ")
    changed = data[:at] + (b"z" if data[at : at + 1] == b"y" else b"y") + data[at + 1 :]
    json.loads(changed)  # still valid JSON, one byte apart
    path.write_bytes(changed)


def test_one_changed_byte_gets_that_group_refused_and_restart_readmits(home: Path) -> None:
    compose = home / "out" / "worker" / "app-compose.json"
    original = compose.read_bytes()
    flip(compose)
    try:
        result = up(home, timeout=15)
        assert result.returncode == 3, result.stdout + result.stderr  # up, but not ready
        warned = " ".join(result.stderr.split())  # rich wraps long lines
        assert warned.count("differs from what") == 1, result.stderr
        assert "warning: worker: " in warned, result.stderr
        deadline = time.monotonic() + 30
        while True:
            cvms = status(home)
            admission = {n: c["sidecar"]["admission"] for n, c in cvms.items() if c.get("sidecar")}
            refused = all(
                admission.get(w, {}).get("state") == "refused"
                and "COMPOSE_HASH_NOT_ALLOWED" in (admission[w].get("last_error") or "")
                for w in WORKERS
            )
            if refused and admission.get("api-0", {}).get("state") == "admitted":
                break
            if time.monotonic() > deadline:
                pytest.fail(f"want the workers refused and api admitted: {admission}")
            time.sleep(0.5)
        measured = home / "state" / "cvms" / "worker-0" / "app-compose.json"
        assert measured.read_bytes() == compose.read_bytes() != original

        compose.write_bytes(original)  # the fix, then a reboot measures the folder again
        for worker in WORKERS:
            restarted = teemesh("restart", worker, "--state", home / "state")
            assert restarted.returncode == 0, restarted.stderr
        assert measured.read_bytes() == original
        wait_ready(home / "state", timeout=60)
        called = fetch(home / "state", "api-0", "http://worker:9090/hello")
        assert called.returncode == 0, called.stderr
    finally:
        compose.write_bytes(original)
        teemesh("down", "--state", home / "state")
