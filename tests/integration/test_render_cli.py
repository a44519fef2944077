"""``teemesh render`` as a user runs it: real files, a real compose validator (Debian's
``docker-compose config``, which needs no Docker engine), and clear refusals."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from procs import run_teemesh

ROOT = Path(__file__).resolve().parents[2]
DIGEST = "sha256:" + "0123456789abcdef" * 4
SPEC = f"""\
cluster: shop
tee: simulated
image: registry.example/teemesh@{DIGEST}
coordinators: {{count: 3, store: etcd, dcs: {{route: etcd, callers: [db]}}}}
gateway: {{base_domain: shop.example}}
workload_groups:
  api:
    replicas: 2
    command: python -m teemesh.examples.starter --port 8080
    compose_env: {{API_TOKEN: local}}
    backends: {{api: {{port: 8080, public: true}}}}
    routes: {{api: {{backend: api}}}}
  db:
    compose: db/compose.yaml
    backends: {{db: {{port: 5432}}}}
    routes: {{db: {{backend: db, callers: [api]}}}}
"""
DB_COMPOSE = f"""\
services:
  postgres:
    image: postgres@{DIGEST}
    environment:
      POSTGRES_PASSWORD: ${{DB_PASSWORD}}
    volumes: [pgdata:/var/lib/postgresql/data]
volumes:
  pgdata: {{}}
"""


def docker_compose() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        pytest.fail("docker-compose is not installed (Debian: apt-get install docker-compose; "
                    "scripts/test does)")  # fmt: skip
    return found


def write_spec(folder: Path, spec: str = SPEC, compose: str | None = DB_COMPOSE) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if compose is not None:
        (folder / "db").mkdir(exist_ok=True)
        (folder / "db" / "compose.yaml").write_text(compose)
    path = folder / "cluster.yaml"
    path.write_text(spec)
    return path


def render(spec: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_teemesh(["render", str(spec), "--out", str(out), *extra], out.with_suffix(".log"))


def said(result: subprocess.CompletedProcess[str]) -> str:
    """stderr with rich's line wrapping undone."""
    return " ".join(result.stderr.split())


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def compose_config(folder: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {"PATH": os.environ["PATH"], "HOME": str(folder)} | env
    return subprocess.run(
        [docker_compose(), "--project-directory", str(folder), "-f",
         str(folder / "docker-compose.yaml"), "config"],
        capture_output=True, text=True, timeout=60, env=clean, check=False,
    )  # fmt: skip


def test_rendered_composes_pass_the_compose_validator(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = render(write_spec(tmp_path / "spec"), out)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["apps"]) == ["api", "db", "coordinator", "gateway"]
    for app, facts in manifest["apps"].items():
        env = {name: f"value-of-{name}" for name in facts["allowed_envs"]}
        checked = compose_config(out / app, env)
        assert checked.returncode == 0, f"{app}: {checked.stderr}"
        normalized = yaml.safe_load(checked.stdout)
        for service in normalized["services"].values():
            assert service["network_mode"] == "host"
            assert service["image"].endswith(DIGEST)
        # what the replica's env says is what compose fills in
        if app in ("api", "db"):
            sidecar = normalized["services"]["teemesh-sidecar"]
            assert sidecar["environment"]["TEEMESH_PEER_ID"] == "value-of-TEEMESH_PEER_ID"
    api = yaml.safe_load(compose_config(out / "api", {n: "x" for n in
                                                       manifest["apps"]["api"]["allowed_envs"]}).stdout)  # fmt: skip
    assert "db:127.77.0.11" in api["services"]["app"]["extra_hosts"]


def test_compose_refuses_to_start_an_app_without_its_replica_env(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert render(write_spec(tmp_path / "spec"), out).returncode == 0
    checked = compose_config(out / "api", {})
    assert checked.returncode != 0
    assert "set TEEMESH_" in checked.stderr


def test_hashes_match_an_independent_sha256_and_renders_are_reproducible(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "spec")
    first, second = tmp_path / "one", tmp_path / "two"
    assert render(spec, first).returncode == 0
    assert render(spec, second).returncode == 0
    assert files_of(first) == files_of(second)
    policy = json.loads((first / "cluster-policy.json").read_text())
    for app in ("api", "db", "coordinator", "gateway"):
        digest = hashlib.sha256((first / app / "app-compose.json").read_bytes()).hexdigest()
        assert (first / app / "compose-hash").read_text() == digest + "\n"
        assert policy["groups"][app]["compose_hashes"] == [digest]
    # rendering again over the same folder leaves the same bytes, and nothing else behind
    assert render(spec, first).returncode == 0
    assert files_of(first) == files_of(second)
    # an app the spec no longer has is left alone, but said
    (first / "old").mkdir()
    (first / "old" / "compose-hash").write_text("ab" * 32 + "\n")
    again = render(spec, first)
    assert again.returncode == 0
    assert f"warning: {first / 'old'} is no app of" in said(again)


def test_json_output_is_the_manifest(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = render(write_spec(tmp_path / "spec"), out, "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["apps"]["db"]["compose_hash"] == (out / "db" / "compose-hash").read_text().strip()
    assert "db/app-compose.json" in doc["files"]


def test_refusals_name_the_problem_and_write_nothing(tmp_path: Path) -> None:
    unpinned = SPEC.replace(f"registry.example/teemesh@{DIGEST}", "teemesh:latest")
    out = tmp_path / "out"
    result = render(write_spec(tmp_path / "a", unpinned), out)
    assert result.returncode == 2
    assert "the teemesh image 'teemesh:latest' is not pinned by digest" in said(result)
    assert str(tmp_path / "a" / "cluster.yaml") in said(result)  # the spec, named
    assert not out.exists()
    # the user opts out explicitly
    assert (
        render(write_spec(tmp_path / "a", unpinned), out, "--allow-unpinned-images").returncode == 0
    )

    result = render(write_spec(tmp_path / "b"), tmp_path / "o2", "--group", "web")
    assert result.returncode == 2
    assert "--group web: no such app" in said(result)

    result = render(write_spec(tmp_path / "c", compose=None), tmp_path / "o3")
    assert result.returncode == 2
    assert "workload_groups.db.compose: cannot read" in said(result)
    assert "No such file or directory" in said(result)

    unknown = SPEC.replace("callers: [api]", "callers: [web]")
    result = render(write_spec(tmp_path / "d", unknown), tmp_path / "o4")
    assert result.returncode == 2
    assert "workload_groups.db.routes.db.callers: no group named web" in said(result)

    built = DB_COMPOSE.replace("    volumes:", "    build: .\n    volumes:", 1)
    result = render(write_spec(tmp_path / "e", compose=built), tmp_path / "o5")
    assert result.returncode == 2
    assert "services.postgres" in said(result) and "dstack builds no image" in said(result)


def test_the_examples_render(tmp_path: Path) -> None:
    for example in ("starter", "patroni-demo"):
        out = tmp_path / example
        spec = ROOT / "examples" / example / "cluster.yaml"
        result = render(spec, out, "--allow-unpinned-images")
        assert result.returncode == 0, result.stderr
        manifest = json.loads((out / "manifest.json").read_text())
        for app, facts in manifest["apps"].items():
            env = {name: "x" for name in facts["allowed_envs"]}
            checked = compose_config(out / app, env)
            assert checked.returncode == 0, f"{example}/{app}: {checked.stderr}"
