"""``teemesh sidecar dstack`` and ``teemesh coordinator --policy-env`` as real processes on
loopback, configured as on dstack: the sidecar by the app-compose its guest agent measured
(``group_app_compose``) and its environment, the coordinator by the rendered cluster policy in
its environment.
"""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from meshkit import Mesh, ready
from procs import free_port, run_teemesh, started, teemesh_exe
from sidecarkit import WAIT, Sidecar, wait_for

from teemesh.coordinator.policy_signing import (
    load_signing_key,
    new_signing_key,
    sign_policy,
    signer_hex,
    verified_policy,
)
from teemesh.sidecar.dstack import (
    ENV_ADDRESS,
    ENV_COORDINATORS,
    ENV_INDEX,
    ENV_PEER_ID,
    ENV_PLATFORM_KEY,
)
from teemesh.spec import (
    cluster_policy,
    group_app_compose,
    parse_spec,
    plan_cluster,
    system_app_compose,
)
from teemesh.spec.model import ClusterSpec

pytestmark = pytest.mark.integration
SIGNING_KEY, _ = new_signing_key()
ADMIN_TOKEN_ENV = "TEEMESH_TEST_ADMIN_TOKEN"
ADMIN_TOKEN = "an-admin-token-of-the-operator-0123456789"
POLICY_ENV = "TEEMESH_CLUSTER_POLICY"


@dataclass
class Cluster:
    mesh: Mesh
    spec: ClusterSpec
    api: int
    ingress: int
    url: str = ""


def spec_with_free_ports() -> tuple[ClusterSpec, int, int]:
    """One group, one replica; its sidecar's ports are free here, its route on its own VIP."""
    ingress, api, backend = free_port(), free_port(), free_port()
    vip = f"127.79.{random.randint(1, 254)}.{random.randint(10, 254)}"
    spec = parse_spec({
        "cluster": "demo",
        "tee": "simulated",
        "kms": {"count": 0},  # the agents' own keys: key provider none
        "sidecar": {"ingress": ingress, "api": api},
        "workload_groups": {
            "web": {
                "command": "run-web",
                "backends": {"web": {"port": backend}},
                "routes": {"web": {"backend": "web", "vip": vip}},
            }
        },
    })  # fmt: skip
    return spec, api, ingress


@contextlib.contextmanager
def coordinator_of(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """A coordinator whose agent measures the spec's coordinator app-compose, started with
    ``--policy-env`` holding ``cluster_policy`` as JSON."""
    spec, api, ingress = spec_with_free_ports()
    mesh = Mesh(tmp_path)
    pem = mesh.platform.public_pem().decode()
    policy = cluster_policy(plan_cluster(spec), pem)
    monkeypatch.setenv(POLICY_ENV, sign_policy(policy, SIGNING_KEY))
    monkeypatch.setenv(ADMIN_TOKEN_ENV, ADMIN_TOKEN)
    agent_cm, sock = mesh.agent("coordinator-agent", system_app_compose(spec, "coordinator"))
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    args = ["coordinator", "--policy-env", POLICY_ENV, "--policy-signer", signer_hex(SIGNING_KEY),
            "--admin-token-env", ADMIN_TOKEN_ENV,
            "--listen", f"127.0.0.1:{port}", "--state", str(tmp_path / "coordinator"),
            "--agent", str(sock)]  # fmt: skip
    with agent_cm, started(args, tmp_path / "coordinator.log", ready(url)):
        monkeypatch.setenv(ENV_PEER_ID, "web-0")
        monkeypatch.setenv(ENV_INDEX, "0")
        monkeypatch.setenv(ENV_ADDRESS, "127.0.0.1")
        monkeypatch.setenv(ENV_COORDINATORS, url)
        monkeypatch.setenv(ENV_PLATFORM_KEY, pem)
        yield Cluster(mesh, spec, api, ingress, url)


@contextlib.contextmanager
def dstack_sidecar(cluster: Cluster, name: str, app_compose: bytes) -> Iterator[Sidecar]:
    """``teemesh sidecar dstack`` in a CVM whose agent measured ``app_compose``; returns once
    its local API answers, admitted or not."""
    mesh, api = cluster.mesh, f"127.0.0.1:{cluster.api}"

    def answers() -> bool:
        try:
            with urllib.request.urlopen(f"http://{api}/health", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    agent_cm, sock = mesh.agent(name, app_compose)
    args = ["sidecar", "dstack", "--agent", str(sock), "--state", str(mesh.tmp / f"{name}-state")]
    with agent_cm, started(args, mesh.tmp / f"{name}-sidecar.log", answers, timeout=WAIT) as proc:
        yield Sidecar(name, proc, api, cluster.ingress, {})


def test_a_sidecar_configured_by_its_measured_app_compose_is_admitted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with coordinator_of(tmp_path, monkeypatch) as cluster:
        app_compose = group_app_compose(cluster.spec, "web")
        with dstack_sidecar(cluster, "web-0", app_compose) as sidecar:
            wait_for("admission", lambda: sidecar.status()["admission"]["state"] == "admitted")
            status = sidecar.status()
            assert status["peer"] == "web/web-0"
            assert status["admission"]["spiffe_id"] == "spiffe://demo/web/web-0"
            config = tmp_path / "web-0-state" / "sidecar.yaml"
            assert config.stat().st_mode & 0o777 == 0o600
            assert json.loads(config.read_text())["coordinators"] == [cluster.url]
            # the operator holds the admin token the coordinator took from its env
            assert admin_admissions(tmp_path, cluster.url, ADMIN_TOKEN) == ["web/web-0"]
            assert not (tmp_path / "coordinator" / "admin.token").exists()
            wrong = admin(tmp_path, cluster.url, "admissions", token="x" * 40)
            assert wrong.returncode != 0 and "HTTP 401" in said(wrong)


def admin(
    tmp_path: Path, url: str, *args: str, token: str = ADMIN_TOKEN
) -> subprocess.CompletedProcess[str]:
    """``teemesh admin ... ARGS --json`` against the coordinator of ``coordinator_of``."""
    (tmp_path / "token").write_text(token + "\n")
    return run_teemesh(["admin", "--url", url, "--ca", str(tmp_path / "coordinator" /
                        "mesh-ca.crt"), "--token-file", str(tmp_path / "token"), *args, "--json"],
                       tmp_path / "admin.log")  # fmt: skip


def admin_admissions(tmp_path: Path, url: str, token: str) -> list[str]:
    result = admin(tmp_path, url, "admissions", token=token)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(result.stdout)["admissions"]
    return [f"{r['group']}/{r['peer_id']}" for r in rows]


def test_signed_policies_are_published_and_never_rolled_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator publishes through the admin API; what a host could replay (an older signed
    policy, an unsigned one, the env's first one by a reload) is refused and the policy stays."""
    with coordinator_of(tmp_path, monkeypatch) as cluster:
        policy = cluster_policy(plan_cluster(cluster.spec), cluster.mesh.platform.public_pem()
                                .decode())  # fmt: skip

        def publish(
            doc: dict[str, Any], key: Any = SIGNING_KEY
        ) -> subprocess.CompletedProcess[str]:
            (tmp_path / "signed.json").write_text(sign_policy(doc, key))
            return admin(tmp_path, cluster.url, "publish", str(tmp_path / "signed.json"))

        newer = policy | {"serial": 100, "svid_ttl_seconds": 600}
        done = publish(newer)
        assert done.returncode == 0, done.stdout + done.stderr
        assert json.loads(done.stdout)["epoch"] == 2
        older = publish(policy | {"serial": 50})
        assert older.returncode != 0
        assert "the policy in force has serial 100; this one has serial 50" in said(older)
        other, _ = new_signing_key()
        forged = publish(newer | {"serial": 200}, key=other)
        assert forged.returncode != 0 and "not made by the policy signer" in said(forged)
        # the env still holds the first policy (no serial): a reload would roll back
        reload = admin(tmp_path, cluster.url, "reload")
        assert reload.returncode != 0 and "this one has no serial" in said(reload)
        later = publish(newer | {"serial": 101, "svid_ttl_seconds": 900})
        assert later.returncode == 0, later.stdout + later.stderr
        assert json.loads(later.stdout)["epoch"] == 3


def said(result: subprocess.CompletedProcess[str]) -> str:
    return " ".join((result.stdout + result.stderr).split())


def test_a_tampered_app_compose_is_refused_by_the_coordinator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One byte of the app-compose changed: the sidecar still reads its section (the agent
    measured what it serves), but its compose hash is not the one the policy admits."""
    with coordinator_of(tmp_path, monkeypatch) as cluster:
        app_compose = group_app_compose(cluster.spec, "web")
        tampered = app_compose.replace(b'"demo-web"', b'"demo-wec"')
        assert len(tampered) == len(app_compose) and tampered != app_compose
        with dstack_sidecar(cluster, "web-0", tampered) as sidecar:
            wait_for("a refusal", lambda: sidecar.status()["admission"]["last_error"])
            admission = sidecar.status()["admission"]
            assert admission["state"] != "admitted"
            assert "COMPOSE_HASH_NOT_ALLOWED" in admission["last_error"]


def test_a_missing_peer_id_fails_before_the_sidecar_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, _api, _ingress = spec_with_free_ports()
    mesh = Mesh(tmp_path)
    monkeypatch.delenv(ENV_PEER_ID, raising=False)
    monkeypatch.setenv(ENV_ADDRESS, "127.0.0.1")
    monkeypatch.setenv(ENV_COORDINATORS, "https://127.0.0.1:1")
    monkeypatch.setenv(ENV_PLATFORM_KEY, mesh.platform.public_pem().decode())
    agent_cm, sock = mesh.agent("web-0", group_app_compose(spec, "web"))
    state = tmp_path / "state"
    with agent_cm:
        result = run_teemesh(["sidecar", "dstack", "--agent", str(sock), "--state", str(state)],
                             tmp_path / "sidecar.log")  # fmt: skip
    assert result.returncode != 0
    assert f"{ENV_PEER_ID}: not set" in result.stderr
    assert not (state / "sidecar-run.json").exists()


def test_an_unreachable_agent_fails_before_the_sidecar_starts(tmp_path: Path) -> None:
    result = run_teemesh(["sidecar", "dstack", "--agent", str(tmp_path / "none.sock"),
                          "--state", str(tmp_path / "state")], tmp_path / "sidecar.log")  # fmt: skip
    assert result.returncode != 0
    assert "cannot read this CVM's app-compose from its guest agent" in result.stderr


def test_an_app_compose_not_rendered_by_teemesh_fails_before_the_sidecar_starts(
    tmp_path: Path,
) -> None:
    mesh = Mesh(tmp_path)
    agent_cm, sock = mesh.agent("web-0", b'{"manifest_version":2,"name":"web"}')
    with agent_cm:
        result = run_teemesh(["sidecar", "dstack", "--agent", str(sock),
                              "--state", str(tmp_path / "state")], tmp_path / "sidecar.log")  # fmt: skip
    assert result.returncode != 0
    assert "no teemesh.sidecar section" in result.stderr


# -- coordinator --policy-env: refusals before anything starts ---------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], "give exactly one of --policy FILE and --policy-env NAME"),
        (["--policy-env", POLICY_ENV, "--policy", "cluster.yaml"], "give exactly one of"),
        (
            ["--policy-env", "TEEMESH_TEST_UNSET_POLICY", "--unsigned-policy"],
            "$TEEMESH_TEST_UNSET_POLICY: not set",
        ),
        (["--policy-env", POLICY_ENV], "--policy-env needs --policy-signer HEX"),
        (
            ["--policy-env", POLICY_ENV, "--unsigned-policy", "--policy-signer", "ab" * 32],
            "--policy-env needs --policy-signer HEX",
        ),
        (["--policy", "cluster.yaml", "--unsigned-policy"], "go with --policy-env"),
        (
            ["--policy-env", POLICY_ENV, "--policy-signer", "abcd"],
            "expected an Ed25519 public key: 32 bytes in hex",
        ),
    ],
)
def test_the_coordinator_needs_one_policy_source(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    (tmp_path / "cluster.yaml").write_text("cluster: demo\n")
    state = tmp_path / "coordinator"
    with contextlib.chdir(tmp_path):
        result = run_teemesh(["coordinator", "--state", str(state), "--agent",
                              str(tmp_path / "none.sock"), *args], tmp_path / "c.log")  # fmt: skip
    assert result.returncode != 0
    assert expected in result.stderr


@pytest.mark.parametrize(
    ("extra", "policy_change", "problem"),
    [
        (["--unsigned-policy", "--cluster", "other"], {}, "the policy is for cluster 'demo', "
         "not 'other'"),
        (["--unsigned-policy"], {"tee": "tdx", "platform_key": None},
         "a tee: tdx policy is taken only signed"),
    ],
)  # fmt: skip
def test_a_policy_for_another_cluster_or_an_unsigned_tdx_one_is_refused(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    extra: list[str],
    policy_change: dict[str, Any],
    problem: str,
) -> None:
    spec, _, _ = spec_with_free_ports()
    policy = cluster_policy(plan_cluster(spec), Mesh(tmp_path).platform.public_pem().decode())
    doc = {k: v for k, v in (policy | policy_change).items() if v is not None}
    monkeypatch.setenv(POLICY_ENV, json.dumps(doc))
    result = run_teemesh(["coordinator", "--policy-env", POLICY_ENV, *extra, "--state",
                          str(tmp_path / "c"), "--agent", str(tmp_path / "none.sock")],
                         tmp_path / "c.log")  # fmt: skip
    assert result.returncode != 0
    assert problem in said(result)


def test_a_bad_policy_in_the_environment_is_refused_naming_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(POLICY_ENV, '{"cluster": "demo", "tee": "simulated"}')
    result = run_teemesh(["coordinator", "--policy-env", POLICY_ENV, "--unsigned-policy", "--state",
                          str(tmp_path / "c"), "--agent", str(tmp_path / "none.sock")],
                         tmp_path / "c.log")  # fmt: skip
    assert result.returncode != 0
    assert f"${POLICY_ENV}" in result.stderr
    assert "tee: simulated needs platform_key" in result.stderr


@pytest.mark.parametrize(
    ("signed_by", "problem"),
    [
        ("other", "signature: not made by the policy signer this coordinator was measured with"),
        ("nobody", "expected a signed policy"),
    ],
)
def test_a_policy_its_signer_did_not_sign_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signed_by: str, problem: str
) -> None:
    """What a host that can replace the env would try: its own policy, signed or not."""
    spec, _, _ = spec_with_free_ports()
    policy = cluster_policy(plan_cluster(spec), Mesh(tmp_path).platform.public_pem().decode())
    other, _ = new_signing_key()
    text = sign_policy(policy, other) if signed_by == "other" else json.dumps(policy)
    monkeypatch.setenv(POLICY_ENV, text)
    result = run_teemesh(["coordinator", "--policy-env", POLICY_ENV, "--policy-signer",
                          signer_hex(SIGNING_KEY), "--state", str(tmp_path / "c"), "--agent",
                          str(tmp_path / "none.sock")], tmp_path / "c.log")  # fmt: skip
    assert result.returncode != 0
    assert problem in " ".join(result.stderr.split())
    assert not (tmp_path / "c").exists()  # refused before anything was made


def test_policy_keygen_and_sign_make_what_the_coordinator_loads(tmp_path: Path) -> None:
    key = tmp_path / "policy.key"
    made = run_teemesh(["policy", "keygen", "--out", str(key)], tmp_path / "keygen.log")
    assert made.returncode == 0, made.stderr
    assert key.stat().st_mode & 0o777 == 0o600
    signer = signer_hex(load_signing_key(key))
    assert signer in made.stdout
    again = run_teemesh(["policy", "keygen", "--out", str(key)], tmp_path / "again.log")
    assert again.returncode != 0 and "not overwritten" in again.stderr
    spec, _, _ = spec_with_free_ports()
    policy = cluster_policy(plan_cluster(spec), "-----BEGIN PUBLIC KEY-----\nx\n")
    (tmp_path / "policy.json").write_text(json.dumps(policy, indent=2))
    signed = run_teemesh(["policy", "sign", str(tmp_path / "policy.json"), "--key", str(key)],
                         tmp_path / "sign.log")  # fmt: skip
    assert signed.returncode == 0, signed.stderr
    assert signed.stdout.count("\n") == 1
    now = time.time_ns()
    verified = verified_policy(signed.stdout, signer, "$P")
    assert verified == policy | {"serial": verified["serial"]}  # its serial: when it was signed
    assert now - 60 * 10**9 <= verified["serial"] <= now  # in nanoseconds: two in a row differ
    piped = subprocess.run([teemesh_exe(), "policy", "sign", "-", "--key", str(key), "--serial", "7"],
                           input=json.dumps(policy), capture_output=True, text=True, timeout=30,
                           check=False)  # fmt: skip
    assert piped.returncode == 0, piped.stderr
    assert verified_policy(piped.stdout, signer, "$P") == policy | {"serial": 7}  # piped in
    resigned = run_teemesh(["policy", "sign", str(tmp_path / "policy.json"), "--key", str(key)],
                           tmp_path / "resign.log")  # fmt: skip
    assert resigned.returncode == 0
    (tmp_path / "signed.json").write_text(json.dumps(json.loads(resigned.stdout)["policy"]))
    again = run_teemesh(["policy", "sign", str(tmp_path / "signed.json"), "--key", str(key)],
                        tmp_path / "again.log")  # fmt: skip
    assert again.returncode != 0 and "serial: already" in said(again) and "--serial" in said(again)
    (tmp_path / "dated.yaml").write_text("cluster: demo\ntee: tdx\nwhen: 2001-01-01\n")
    dated = run_teemesh(["policy", "sign", str(tmp_path / "dated.yaml"), "--key", str(key)],
                        tmp_path / "dated.log")  # fmt: skip
    assert dated.returncode != 0 and "not JSON data" in said(dated)
    (tmp_path / "bad.json").write_text('{"cluster": "demo", "groups": {"a": {"x": 1}}}')
    refused = run_teemesh(["policy", "sign", str(tmp_path / "bad.json"), "--key", str(key)],
                          tmp_path / "bad.log")  # fmt: skip
    assert refused.returncode != 0 and "groups.a.x" in refused.stderr
