"""The local platform end to end, driven like a user: ``teemesh up`` the starter mesh in real
network namespaces, call it by route name from inside its CVMs, break it, and ``down`` it.

Needs root. The starter comes up once for the module (its ``down`` always runs); tests run in
file order, and each one that breaks something restores it. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from localkit import ROOT, TEEMESH, calls, fetch, links, namespaces, teemesh, wait_ready

from teemesh.spec import app_id, load_spec

pytestmark = pytest.mark.e2e
STARTER = ROOT / "examples" / "starter" / "cluster.yaml"
WORKERS = [f"worker-{i}" for i in range(5)]


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.fail("the e2e tests make network namespaces: run them as root")
    state = tmp_path_factory.mktemp("starter") / "state"
    try:
        result = teemesh("up", STARTER, "--state", state, timeout=150)
        assert result.returncode == 0, result.stdout + result.stderr
        yield state
    finally:
        teemesh("down", "--state", state)


def test_status_shows_every_cvm_admitted_and_healthy(state: Path) -> None:
    doc = json.loads(teemesh("status", "--state", state, "--json").stdout)
    names = [c["name"] for c in doc["cvms"]]
    assert names == ["kms-0", "coordinator-0", "gateway-0", "api-0", "api-1", *WORKERS]
    for cvm in doc["cvms"]:
        assert set(cvm["processes"].values()) == {"running"}, cvm
        if cvm["role"] == "workload":
            admission = cvm["sidecar"]["admission"]
            assert admission["state"] == "admitted"
            assert admission["expires_at"] > time.time()
            assert [b["health"] for b in cvm["sidecar"]["backends"]] == ["passing"]
    table = teemesh("status", "--state", state)
    assert table.returncode == 0 and "worker-4" in table.stdout


def test_a_route_name_resolves_and_calls_across_cvms(state: Path) -> None:
    result = fetch(state, "api-0", "http://worker:9090/hello")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["group"] == "worker"
    through_api = json.loads(fetch(state, "api-1", "http://api:8080/worker").stdout)
    assert through_api["from"] in ("api-0", "api-1")
    assert through_api["worker"]["peer_id"] in WORKERS


def gateway_get(state: Path, host: str, path: str) -> subprocess.CompletedProcess[str]:
    """curl from this machine to the published gateway, trusting the cluster's local CA."""
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--cacert", str(state / "gateway-ca.pem"),
         f"https://{host}:8443{path}"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def test_the_gateway_publishes_the_public_api_with_dstack_names(state: Path) -> None:
    app = app_id(load_spec(STARTER), "api")
    hello = gateway_get(state, f"{app}-8080.teemesh.localhost", "/hello")
    assert hello.returncode == 0, hello.stderr
    assert json.loads(hello.stdout)["peer_id"] in ("api-0", "api-1")
    worker = gateway_get(state, f"{app}-8080.teemesh.localhost", "/worker")
    assert json.loads(worker.stdout)["worker"]["peer_id"] in WORKERS
    status = json.loads(teemesh("status", "--state", state, "--json").stdout)
    assert status["public"] == [f"https://{app}-8080.teemesh.localhost:8443/"]
    health = gateway_get(state, "health.teemesh.localhost", "/")
    assert health.stdout == "ok\n", health.stderr


def test_the_gateway_refuses_what_is_not_public(state: Path) -> None:
    worker_app = app_id(load_spec(STARTER), "worker")
    for host in (f"{worker_app}-9090.teemesh.localhost", "nothing-8080.teemesh.localhost"):
        result = gateway_get(state, host, "/hello")
        assert result.returncode == 35 and "unrecognized name" in result.stderr, result.stderr


def test_answers_come_from_several_workers(state: Path) -> None:
    doc = json.loads(fetch(state, "api-0", "http://api:8080/all?route=worker&n=25").stdout)
    assert doc["errors"] == {}
    assert len(doc["counts"]) >= 3, doc


def test_a_caller_not_in_callers_is_refused(state: Path) -> None:
    assert fetch(state, "worker-0", "http://api:8080/hello").returncode == 0  # api: any caller
    refused = fetch(state, "worker-0", "http://worker:9090/hello")  # worker: api only
    assert refused.returncode != 0, refused.stdout


def test_an_exit_code_passes_through_exec(state: Path) -> None:
    assert teemesh("exec", "api-0", "--state", state, "--", "sh", "-c", "exit 7").returncode == 7


def test_a_partition_breaks_calls_and_heal_restores_them(state: Path) -> None:
    cut = WORKERS[:4]
    for worker in cut:
        assert teemesh("partition", "api-0", worker, "--state", state).returncode == 0
    try:
        doc = calls(state, "api-0", "http://worker:9090/hello", 20)
        assert set(doc["counts"]) <= {"worker-4"}, doc
        assert doc["counts"].get("worker-4", 0) >= 15, doc
        assert calls(state, "api-1", "http://worker:9090/hello", 20)["counts"].keys() - {
            "worker-4"
        }, "api-1 is not cut off from the others"
    finally:
        assert teemesh("heal", "--state", state).returncode == 0
    deadline = time.monotonic() + 20
    while len((doc := calls(state, "api-0", "http://worker:9090/hello", 20))["counts"]) < 3:
        assert time.monotonic() < deadline, f"heal did not restore the calls: {doc}"
        time.sleep(1)


def test_a_killed_worker_is_routed_around_and_restart_brings_it_back(state: Path) -> None:
    assert teemesh("kill", "worker-0", "--state", state).returncode == 0
    doc = json.loads(teemesh("status", "--state", state, "--json").stdout)
    worker = next(c for c in doc["cvms"] if c["name"] == "worker-0")
    assert worker["processes"] == {} and worker["sidecar"] is None
    doc = calls(state, "api-0", "http://worker:9090/hello", 20)
    assert "worker-0" not in doc["counts"] and sum(doc["counts"].values()) >= 19, doc
    restarted = teemesh("restart", "worker-0", "--state", state, timeout=60)
    assert restarted.returncode == 0, restarted.stderr
    wait_ready(state)
    assert fetch(state, "worker-0", "http://api:8080/hello").returncode == 0


def test_pause_and_resume(state: Path) -> None:
    assert teemesh("pause", "worker-1", "--state", state).returncode == 0
    try:
        doc = json.loads(teemesh("status", "--state", state, "--json").stdout)
        worker = next(c for c in doc["cvms"] if c["name"] == "worker-1")
        assert set(worker["processes"].values()) == {"paused"}
    finally:
        assert teemesh("resume", "worker-1", "--state", state).returncode == 0


def test_logs_of_a_cvm(state: Path) -> None:
    result = teemesh("logs", "coordinator-0", "--process", "coordinator", "--state", state)
    assert result.returncode == 0 and "coordinator" in result.stdout


@pytest.mark.parametrize(
    "args",
    [["kill", "worker-9"], ["exec", "nope-0", "--", "true"], ["partition", "api-0", "db-1"]],
)
def test_an_unknown_cvm_lists_the_valid_names(state: Path, args: list[str]) -> None:
    result = teemesh(args[0], "--state", state, *args[1:])
    assert result.returncode == 2
    assert "api-0" in result.stderr and "worker-4" in result.stderr and "kms-0" in result.stderr


def test_down_leaves_nothing_and_is_safe_twice(state: Path) -> None:
    network = json.loads((state / "network.json").read_text())
    pids = [p["pid"] for p in network["processes"]]
    assert teemesh("down", "--state", state).returncode == 0
    assert not {c["netns"] for c in network["cvms"]} & namespaces()
    assert not ({c["veth"] for c in network["cvms"]} | {network["bridge"]}) & links()
    assert not [c["etc_dir"] for c in network["cvms"] if Path(c["etc_dir"]).exists()]
    alive = [pid for pid in pids if Path(f"/proc/{pid}").exists() and _not_zombie(pid)]
    assert alive == []
    again = teemesh("down", "--state", state)
    assert again.returncode == 0 and "nothing" in again.stderr


def _not_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


# -- specs that `up` refuses before making anything -------------------------------------------

BASE = """
cluster: broken
tee: simulated
network: 10.78.0.0/24
workload_groups:
  api:
    replicas: 1
    command: python -m teemesh.examples.starter --port 8080
    backends: {api: {port: 8080}}
    routes: {api: {backend: api}}
"""
BROKEN = {
    "zero replicas": (BASE.replace("replicas: 1", "replicas: 0"), "replicas"),
    "missing backend": (
        BASE.replace("{backend: api}", "{backend: nope}"),
        "workload_groups.api.routes.api",
    ),
    "unknown field": (BASE + "colour: blue\n", "colour"),
    "duplicate route": (
        BASE
        + "  worker:\n    command: sleep 1\n    backends: {w: {port: 9090}}\n"
        + "    routes: {api: {backend: w}}\n",
        "route name",
    ),
    "gateway transport without a gateway": (BASE + "transport: gateway\n", "gateway section"),
    "not a mapping": ("- a list\n", "expected a mapping"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_spec_is_refused_before_anything_is_made(tmp_path: Path, case: str) -> None:
    text, expected = BROKEN[case]
    spec = tmp_path / "cluster.yaml"
    spec.write_text(text)
    before = namespaces()
    result = teemesh("up", spec, "--state", tmp_path / "state")
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr, result.stderr
    assert not (tmp_path / "state" / "network.json").exists()
    assert namespaces() == before


def test_sigterm_while_starting_removes_what_up_made(tmp_path: Path) -> None:
    spec = tmp_path / "cluster.yaml"
    spec.write_text(
        STARTER.read_text()
        .replace("cluster: starter", "cluster: sigterm")
        .replace("10.77.0.0/24", "10.80.0.0/24")
        .replace("gateway: {", "# gateway: {")  # the module's starter has the published port
    )
    before_ns, before_links = namespaces(), links()
    up = subprocess.Popen(
        [TEEMESH, "up", str(spec), "--state", str(tmp_path / "state")],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    with up:
        assert up.stderr is not None
        seen = []
        for line in up.stderr:  # ends at EOF: up exits at the latest when its timeout passes
            seen.append(line)
            if "started kms" in line:
                up.send_signal(signal.SIGTERM)
                break
        try:
            assert up.wait(60) == 128 + signal.SIGTERM, "".join(seen)
            assert not (tmp_path / "state" / "network.json").exists()
            assert (namespaces(), links()) == (before_ns, before_links)
        finally:  # only if the test failed is there anything left to remove
            if up.poll() is None:
                up.kill()
            teemesh("down", "--state", tmp_path / "state")


def test_without_privileges_up_says_so_and_makes_nothing(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o777)  # nobody may look for its state dir
    before = namespaces()
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", TEEMESH, "up",
         str(STARTER), "--state", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "CAP_NET_ADMIN" in result.stderr and "root" in result.stderr, result.stderr
    assert not (tmp_path / "state").exists()
    assert namespaces() == before


def test_a_cvm_that_never_gets_healthy_is_named_and_left_up(tmp_path: Path) -> None:
    spec = tmp_path / "cluster.yaml"
    spec.write_text(
        BASE.replace("broken", "unhealthy")
        .replace("10.78.0.0/24", "10.79.0.0/24")
        .replace("python -m teemesh.examples.starter --port 8080", "sleep 600")
        .replace("{port: 8080}", "{port: 8080, health: {http: /hello}}")
    )
    state = tmp_path / "state"
    try:
        result = teemesh("up", spec, "--state", state, "--timeout", "8", timeout=120)
        assert result.returncode == 3, result.stderr
        assert "api-0: backend api is" in result.stderr, result.stderr
        assert (state / "network.json").exists()  # left up for inspection
    finally:
        assert teemesh("down", "--state", state).returncode == 0
    assert not (state / "network.json").exists()
