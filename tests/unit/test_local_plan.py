"""The local platform's launch, worked out from a plan without starting anything: which process
runs in which CVM and stage, how the coordinators find their etcd members, and how a sidecar's
status is judged ready."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from teemesh.platform.local_plan import (
    STAGE_COORDINATOR,
    STAGE_STORE,
    STAGE_WORKLOAD,
    Launch,
    launch,
    launch_files,
    not_ready,
    unsupported,
)
from teemesh.spec import parse_spec, plan_cluster

ROOT = Path(__file__).resolve().parents[2]
STARTER = yaml.safe_load((ROOT / "examples" / "starter" / "cluster.yaml").read_text())
STATE = Path("/state")


def starter_launch(**changes: Any) -> Launch:
    doc = copy.deepcopy(STARTER)
    doc.update(changes)
    plan = plan_cluster(parse_spec(doc))
    return launch(plan, STATE, Path("/spec/cluster.yaml"), "/bin/teemesh", b"seed", etcd="/e")


def test_every_cvm_runs_its_agent_and_its_role_in_stage_order() -> None:
    record = starter_launch()
    roles = {c.name: [p.name for p in c.processes] for c in record.cvms}
    assert roles["kms-0"] == ["agent", "kms"]
    assert roles["coordinator-0"] == ["agent", "coordinator"]
    assert roles["worker-4"] == ["agent", "sidecar", "app"]
    for cvm in record.cvms:
        stages = [p.stage for p in cvm.processes]
        assert stages == sorted(stages), cvm.name
    kms_stage = record.cvm("kms-0").processes[1].stage
    assert all(p.stage > kms_stage for p in record.cvm("api-0").processes)
    assert record.hosts == {"api": "127.77.0.10", "worker": "127.77.0.11"}
    assert record.instances == {"api": 2, "worker": 5}


def test_instance_ids_are_fixed_per_cvm_and_differ_between_cvms() -> None:
    def ids(record: Launch) -> dict[str, str]:
        out = {}
        for cvm in record.cvms:
            argv = cvm.processes[0].argv
            out[cvm.name] = argv[argv.index("--instance-id") + 1]
        return out

    first, again = ids(starter_launch()), ids(starter_launch())
    assert first == again
    assert len(set(first.values())) == len(first)


def test_the_app_runs_with_its_cvm_identity_and_the_agent_socket() -> None:
    app = starter_launch().cvm("worker-3").processes[2]
    assert app.argv == ("/bin/sh", "-c", "python -m teemesh.examples.starter --port 9090")
    assert app.env["TEEMESH_PEER_ID"] == "worker-3"
    assert app.env["DSTACK_SIMULATOR_ENDPOINT"] == "/state/cvms/worker-3/agent.sock"
    assert app.env["PATH"].startswith("/bin:")  # the teemesh installation's Python first
    assert app.cwd == "/spec"


def test_coordinators_on_etcd_each_run_a_member_and_use_their_own_first() -> None:
    record = starter_launch(coordinators={"count": 3, "store": "etcd"})
    coordinators = [c for c in record.cvms if c.role == "coordinator"]
    assert [c.name for c in coordinators] == [f"coordinator-{i}" for i in range(3)]
    peers = ",".join(f"{c.name}=https://{c.address}:2380" for c in coordinators)
    for cvm in coordinators:
        etcd, coordinator = cvm.processes[1], cvm.processes[2]
        assert (etcd.name, etcd.stage) == ("etcd", STAGE_STORE)
        assert etcd.argv[:2] == ("/bin/teemesh", "store-member")
        command = etcd.argv[etcd.argv.index("--") + 1 :]
        assert command[0] == "/e"
        assert command[command.index("--initial-cluster") + 1] == peers
        assert etcd.ready_http == f"http://{cvm.address}:2381/health"
        assert coordinator.stage == STAGE_COORDINATOR
        endpoints = coordinator.argv[coordinator.argv.index("--etcd-endpoints") + 1].split(",")
        assert endpoints[0] == f"https://{cvm.address}:2379"
        assert sorted(endpoints) == sorted(f"https://{c.address}:2379" for c in coordinators)
    assert all(p.stage == STAGE_WORKLOAD for p in record.cvm("api-0").processes[1:])


def test_an_embedded_coordinator_runs_no_etcd() -> None:
    coordinator = starter_launch().cvm("coordinator-0").processes[1]
    assert "--store" not in coordinator.argv


def test_what_the_local_platform_cannot_run_is_said_together() -> None:
    doc = copy.deepcopy(STARTER)
    doc.update(tee="tdx", os_image_hashes=["ab" * 32], kms={"count": 0},
               coordinators={"count": 2, "store": "etcd"})  # fmt: skip
    problems = unsupported(plan_cluster(parse_spec(doc)))
    assert len(problems) == 2
    assert problems[0].startswith("tee: the local platform simulates the TEE")
    assert problems[1].startswith("kms: several coordinators share their CA key")


def test_only_sidecar_configs_are_secret() -> None:
    plan = plan_cluster(parse_spec(copy.deepcopy(STARTER)))
    files = launch_files(plan, STATE, "PUB")
    secret = sorted(str(p) for p, (_, is_secret) in files.items() if is_secret)
    assert secret == sorted(f"/state/cvms/{c.name}/sidecar.yaml" for c in plan.cvms
                            if c.role in ("workload", "gateway"))  # fmt: skip
    assert Path("/state/cluster-policy.yaml") in files


ADMITTED = {"state": "admitted"}
PASSING = [{"name": "worker", "health": "passing", "registered": True}]
ALL_ROUTES = [{"name": "api", "instances": [1, 2]}, {"name": "worker", "instances": [1] * 5}]


@pytest.mark.parametrize(
    ("status", "error", "why"),
    [
        (None, "connection refused", "its sidecar API does not answer (connection refused)"),
        ({"admission": {"state": "attesting", "last_error": "no coordinator"}}, "",
         "not admitted: attesting (no coordinator)"),
        ({"admission": {"state": "pending"}}, "", "not admitted: pending (no error yet)"),
        ({"admission": ADMITTED, "backends": [{"name": "worker", "health": "critical",
                                               "registered": True}]}, "",
         "backend worker is critical"),
        ({"admission": ADMITTED, "backends": [{"name": "worker", "health": "passing",
                                               "registered": False}]}, "",
         "backend worker is passing, not registered yet"),
        ({"admission": ADMITTED, "backends": PASSING,
          "routes": [{"name": "worker", "instances": [1, 2]}]}, "",
         "route worker sees 2 of 5 instances"),
        ({"admission": ADMITTED, "backends": PASSING, "routes": ALL_ROUTES}, "", None),
        ({"admission": {"state": "renewing"}, "backends": PASSING, "routes": ALL_ROUTES}, "",
         None),
    ],
)  # fmt: skip
def test_readiness_names_the_first_thing_missing(
    status: dict[str, Any] | None, error: str, why: str | None
) -> None:
    assert not_ready(starter_launch(), "worker-0", status, error) == why
