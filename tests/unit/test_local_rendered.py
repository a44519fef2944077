"""``teemesh up --rendered DIR``, worked out without starting anything: the CVMs of each app
with a folder in DIR are measured by its bytes, the coordinators admit by its policy (with the
local platform key), a bad policy file stops ``up`` with its name, and without DIR nothing
changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from teemesh.config import ConfigError
from teemesh.errors import InputError
from teemesh.platform.local import read_rendered
from teemesh.platform.local_plan import (
    RenderedApps,
    app_compose,
    launch,
    launch_files,
    rendered_drift,
)
from teemesh.spec import (
    AppComposes,
    Plan,
    cluster_policy,
    group_app_compose,
    parse_spec,
    plan_cluster,
)
from teemesh.spec import system_app_compose as system_compose
from teemesh.spec.deploy import POLICY_FILE, render

STATE = Path("/state")
PUB = "-----BEGIN PUBLIC KEY-----\nlocal\n-----END PUBLIC KEY-----\n"
SPEC = {
    "cluster": "rendered",
    "tee": "simulated",
    "os_image": "dstack-0.5.7-sim",
    "network": "10.78.0.0/24",
    "coordinators": {"count": 1, "store": "embedded"},
    "kms": {"count": 1},
    "workload_groups": {
        "api": {
            "replicas": 1,
            "command": "python -m teemesh.examples.starter --port 8080",
            "backends": {"api": {"port": 8080, "health": {"http": "/hello"}}},
            "routes": {"api": {"backend": "api"}},
        },
        "worker": {
            "replicas": 2,
            "command": "python -m teemesh.examples.starter --port 9090",
            "backends": {"worker": {"port": 9090, "health": {"http": "/hello"}}},
            "routes": {"worker": {"backend": "worker", "callers": ["api"]}},
        },
    },
}


@pytest.fixture
def plan() -> Plan:
    return plan_cluster(parse_spec(SPEC))


def write_rendered(plan: Plan, folder: Path) -> Path:
    """What ``teemesh render --allow-unpinned-images`` writes."""
    for relative, data in render(plan, allow_unpinned=True).files().items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(data)
    return folder


def tampered(data: bytes) -> bytes:
    """One byte of the image name in docker_compose_file changed, still valid JSON."""
    at = data.index(b"image: ") + len(b"image: ")
    out = data[:at] + (b"z" if data[at : at + 1] == b"y" else b"y") + data[at + 1 :]
    assert len(out) == len(data) and json.loads(out)["docker_compose_file"]
    return out


def test_without_rendered_nothing_changes(plan: Plan) -> None:
    files = launch_files(plan, STATE, PUB)
    assert files == launch_files(plan, STATE, PUB, None)
    policy = yaml.safe_load(files[STATE / "cluster-policy.yaml"][0])
    assert policy == cluster_policy(plan, PUB)
    compose = files[STATE / "cvms" / "worker-1" / "app-compose.json"][0]
    assert compose == group_app_compose(plan.spec, "worker")
    record = launch(plan, STATE, Path("/spec.yaml"), "/bin/teemesh", b"seed")
    assert record.rendered is None


def test_rendered_bytes_are_measured_and_its_policy_admits_with_the_local_key(
    plan: Plan,
) -> None:
    worker = tampered(group_app_compose(plan.spec, "worker"))
    rendered_policy = {"cluster": "rendered", "tee": "simulated", "groups": {"x": {}}}
    rendered = RenderedApps("/dir", {"worker": worker}, rendered_policy)
    files = launch_files(plan, STATE, PUB, rendered)
    for cvm in ("worker-0", "worker-1"):
        assert files[STATE / "cvms" / cvm / "app-compose.json"][0] == worker
    api = files[STATE / "cvms" / "api-0" / "app-compose.json"][0]
    assert api == group_app_compose(plan.spec, "api")  # no folder for api: the spec's
    kms = files[STATE / "cvms" / "kms-0" / "app-compose.json"][0]
    assert kms == system_compose(plan.spec, "kms")
    policy = yaml.safe_load(files[STATE / "cluster-policy.yaml"][0])
    assert policy == rendered_policy | {"platform_key": PUB}
    assert "platform_key" not in rendered_policy  # the input is left as it was
    plain = launch_files(plan, STATE, PUB)  # sidecar configs and pins: from the spec
    for path in (STATE / "kms-pin.yaml", STATE / "cvms" / "worker-0" / "sidecar.yaml"):
        assert files[path] == plain[path]
    assert rendered_drift(plan, rendered) == ["worker"]


def test_read_rendered_takes_every_app_and_the_policy(plan: Plan, tmp_path: Path) -> None:
    folder = write_rendered(plan, tmp_path)
    rendered = read_rendered(folder, plan, PUB)
    assert sorted(rendered.app_composes) == ["api", "coordinator", "worker"]
    assert rendered.app_composes["coordinator"] == system_compose(plan.spec, "coordinator")
    assert rendered.policy == cluster_policy(plan)
    assert rendered_drift(plan, rendered) == []
    for cvm in plan.cvms:
        assert app_compose(AppComposes(plan), cvm, rendered) == app_compose(AppComposes(plan), cvm)
    files = launch_files(plan, STATE, PUB, rendered)
    assert files == launch_files(plan, STATE, PUB)  # what render wrote is what the spec gives
    worker = folder / "worker" / "app-compose.json"
    worker.write_bytes(tampered(worker.read_bytes()))
    assert rendered_drift(plan, read_rendered(folder, plan, PUB)) == ["worker"]


def test_an_app_without_its_folder_runs_the_specs(plan: Plan, tmp_path: Path) -> None:
    folder = write_rendered(plan, tmp_path)
    for name in ("app-compose.json", "docker-compose.yaml", "compose-hash"):
        (folder / "api" / name).unlink()
    (folder / "api").rmdir()
    assert sorted(read_rendered(folder, plan, PUB).app_composes) == ["coordinator", "worker"]


def test_a_folder_without_its_app_compose_names_the_file(plan: Plan, tmp_path: Path) -> None:
    folder = write_rendered(plan, tmp_path)
    (folder / "api" / "app-compose.json").unlink()
    with pytest.raises(InputError, match=r"api/app-compose\.json: cannot read it"):
        read_rendered(folder, plan, PUB)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "missing"),
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "expected the cluster policy object"),
        (b'{"cluster": "other", "tee": "simulated", "groups": {}}', "cluster: 'other'"),
        (b'{"cluster": "rendered", "tee": "tdx", "groups": {}}', "platform_key"),
        (b'{"cluster": "rendered", "tee": "simulated", "groups": {"a": {"x": 1}}}', "groups.a.x"),
    ],
)
def test_a_bad_policy_file_is_a_clear_error(
    plan: Plan, tmp_path: Path, content: bytes | None, problem: str
) -> None:
    folder = write_rendered(plan, tmp_path)
    path = folder / POLICY_FILE
    if content is None:
        path.unlink()
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as raised:
        read_rendered(folder, plan, PUB)
    assert raised.value.source == str(path)
    assert problem in "\n".join(raised.value.problems)


def test_a_missing_folder_is_named(plan: Plan, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such folder"):
        read_rendered(tmp_path / "nothing", plan, PUB)


def test_the_launch_records_the_folder_for_restart(plan: Plan) -> None:
    record = launch(plan, STATE, Path("/spec.yaml"), "/bin/teemesh", b"seed", rendered=Path("/d"))
    assert record.rendered == "/d"
    assert type(record).model_validate_json(record.model_dump_json()).rendered == "/d"
