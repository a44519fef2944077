"""The sidecar on dstack (``teemesh.sidecar.dstack``): its configuration is its measured
app-compose's ``teemesh`` section completed by the replica's environment.

The point of the equality tests: what ``teemesh sidecar dstack`` runs on a dstack CVM is exactly
what the local platform's ``sidecar_config`` gives the same CVM.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from teemesh.attest.dstack import compose_hash
from teemesh.attest.simulated import PlatformKey
from teemesh.config import ConfigError
from teemesh.coordinator.policy import load_cluster_policy, parse_cluster_policy
from teemesh.errors import InputError
from teemesh.sidecar.config import load_sidecar_config
from teemesh.sidecar.dstack import (
    ENV_ADDRESS,
    ENV_COORDINATORS,
    ENV_INDEX,
    ENV_PEER_ID,
    ENV_PLATFORM_KEY,
    ENV_VIA_GATEWAY,
    dstack_sidecar_config,
    measured_section,
    pem_from_env,
)
from teemesh.spec import (
    cluster_policy,
    coordinator_attest_policy,
    gateway_settings,
    group_app_compose,
    parse_spec,
    plan_cluster,
    sidecar_config,
    system_app_compose,
)
from teemesh.spec.model import ClusterSpec
from teemesh.spec.plan import Cvm, Plan

PEM = PlatformKey.generate().public_pem().decode()
SPEC: dict[str, Any] = {
    "cluster": "starter",
    "tee": "simulated",
    "workload_groups": {
        "api": {
            "replicas": 2,
            "command": "python -m teemesh.examples.starter --port 8080",
            "backends": {"api": {"port": 8080, "public": True, "health": {"http": "/hello"}}},
            "routes": {"api": {"backend": "api"}},
        },
        "worker": {
            "replicas": 3,
            "command": "python -m teemesh.examples.starter --port 9090",
            "backends": {"worker": {"port": 9090}},
            "routes": {"worker": {"backend": "worker", "callers": ["api"]}},
        },
    },
}


def spec_of(**top: Any) -> ClusterSpec:
    return parse_spec(copy.deepcopy(SPEC) | top)


def info_of(app_compose: bytes, reported: str | None = None) -> dict[str, Any]:
    """The guest agent's Info for a CVM measured by ``app_compose`` (as the agent replies)."""
    digest = compose_hash(app_compose).hex() if reported is None else reported
    tcb = {"compose_hash": digest, "app_compose": app_compose.decode()}
    return {"app_id": "00" * 20, "tcb_info": json.dumps(tcb), "compose_hash": digest}


def env_of(plan: Plan, cvm: Cvm, platform_key: str = PEM) -> dict[str, str]:
    return {
        ENV_PEER_ID: cvm.name,
        ENV_INDEX: str(cvm.index),
        ENV_ADDRESS: cvm.address,
        ENV_COORDINATORS: ",".join(plan.coordinator_urls()),
        ENV_PLATFORM_KEY: platform_key,
    }


def completed(app_compose: bytes, env: dict[str, str], **kw: Any) -> dict[str, Any]:
    section, digest = measured_section(info_of(app_compose))
    assert digest == compose_hash(app_compose).hex()
    return dstack_sidecar_config(section, digest, env, **kw)


def loads(tmp_path: Path, name: str, doc: dict[str, Any]) -> Any:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_sidecar_config(path)


# -- what the sidecar runs on dstack is what the local platform runs -------------------------


@pytest.mark.parametrize("name", ["api-0", "api-1", "worker-2"])
def test_a_workload_sidecar_runs_what_the_local_platform_gives_it(
    name: str, tmp_path: Path
) -> None:
    spec = spec_of()
    plan = plan_cluster(spec)
    cvm = plan.cvm(name)
    config = completed(group_app_compose(spec, cvm.group), env_of(plan, cvm))
    local = sidecar_config(plan, cvm, plan.coordinator_urls(), coordinator_attest_policy(plan, PEM))
    assert config == local
    assert loads(tmp_path, "dstack", config) == loads(tmp_path, "local", local)


def test_the_platform_key_is_pem_text_with_or_without_its_last_newline() -> None:
    """An env value often loses its trailing newline; the pin is the same PEM either way."""
    spec = spec_of()
    plan = plan_cluster(spec)
    cvm = plan.cvm("api-0")
    config = completed(group_app_compose(spec, "api"), env_of(plan, cvm, PEM.strip()))
    assert config["coordinator_policy"]["platform_key"] == PEM


def test_the_coordinators_dcs_sidecar_pins_its_own_compose_hash(tmp_path: Path) -> None:
    spec = spec_of(coordinators={"count": 3, "store": "etcd", "dcs": {"callers": ["api"]}})
    plan = plan_cluster(spec)
    cvm = plan.cvm("coordinator-1")
    app_compose = system_app_compose(spec, "coordinator")
    section, digest = measured_section(info_of(app_compose))
    assert "compose_hashes" not in section["sidecar"]["coordinator_policy"]
    config = dstack_sidecar_config(section, digest, env_of(plan, cvm))
    assert config["coordinator_policy"]["compose_hashes"] == [compose_hash(app_compose).hex()]
    local = sidecar_config(plan, cvm, plan.coordinator_urls(), coordinator_attest_policy(plan, PEM))
    assert config == local
    assert loads(tmp_path, "dstack", config) == loads(tmp_path, "local", local)


def test_a_workload_pins_the_coordinators_compose_hash_not_its_own() -> None:
    spec = spec_of()
    plan = plan_cluster(spec)
    config = completed(group_app_compose(spec, "api"), env_of(plan, plan.cvm("api-0")))
    coordinators = compose_hash(system_app_compose(spec, "coordinator")).hex()
    assert config["coordinator_policy"]["compose_hashes"] == [coordinators]


def test_with_transport_gateway_a_workload_reaches_its_peers_through_the_gateway() -> None:
    spec = spec_of(gateway={"base_domain": "example.test"}, transport="gateway")
    plan = plan_cluster(spec)
    cvm = plan.cvm("worker-0")
    way_in = f"{plan.of_role('gateway')[0].address}:{spec.gateway.port}"  # type: ignore[union-attr]
    env = env_of(plan, cvm) | {ENV_VIA_GATEWAY: way_in}
    config = completed(group_app_compose(spec, "worker"), env)
    local = sidecar_config(plan, cvm, plan.coordinator_urls(), coordinator_attest_policy(plan, PEM))
    assert config == local
    with pytest.raises(InputError, match=ENV_VIA_GATEWAY):
        completed(group_app_compose(spec, "worker"), env_of(plan, cvm))


def test_the_gateway_app_takes_its_certificate_and_key_from_the_files_given(
    tmp_path: Path,
) -> None:
    spec = spec_of(gateway={"base_domain": "example.test"})
    plan = plan_cluster(spec)
    cvm = plan.cvm("gateway-0")
    app_compose = system_app_compose(spec, "gateway")
    files = ("/state/gateway-tls.pem", "/state/gateway-tls.key")
    config = completed(app_compose, env_of(plan, cvm), gateway_files=files)
    local = sidecar_config(
        plan, cvm, plan.coordinator_urls(), coordinator_attest_policy(plan, PEM),
        gateway=gateway_settings(plan, certificate=files[0], key=files[1]),
    )  # fmt: skip
    # the local platform may give TXT records; dstack's measured section has no place for them
    assert local["gateway"].pop("txt_records") is None
    assert config == local
    with pytest.raises(InputError, match="TEEMESH_GATEWAY_CERT, TEEMESH_GATEWAY_KEY"):
        completed(app_compose, env_of(plan, cvm))


# -- what is refused ---------------------------------------------------------------------------


def test_every_missing_variable_is_named_at_once() -> None:
    spec = spec_of()
    with pytest.raises(InputError) as info:
        completed(group_app_compose(spec, "api"), {ENV_INDEX: "0", ENV_ADDRESS: "  "})
    message = str(info.value)
    assert info.value.field == "environment"
    for name in (ENV_PEER_ID, ENV_ADDRESS, ENV_COORDINATORS, ENV_PLATFORM_KEY):
        assert f"{name}: not set" in message


def test_a_tdx_cluster_needs_no_platform_key() -> None:
    spec = spec_of(tee="tdx", os_image_hashes=["ab" * 32])
    plan = plan_cluster(spec)
    env = env_of(plan, plan.cvm("api-0"))
    del env[ENV_PLATFORM_KEY]
    config = completed(group_app_compose(spec, "api"), env)
    assert "platform_key" not in config["coordinator_policy"]


def test_too_many_coordinators_are_refused() -> None:
    spec = spec_of()
    plan = plan_cluster(spec)
    env = env_of(plan, plan.cvm("api-0"))
    env[ENV_COORDINATORS] = ",".join(f"https://10.0.0.{i}:8443" for i in range(17))
    with pytest.raises(InputError, match="more than 16 URLs"):
        completed(group_app_compose(spec, "api"), env)


def test_an_app_compose_that_does_not_hash_to_the_measured_hash_is_refused() -> None:
    app_compose = group_app_compose(spec_of(), "api")
    with pytest.raises(InputError, match="not to the compose hash the agent measured"):
        measured_section(info_of(app_compose, reported="00" * 32))
    tampered = app_compose.replace(b'"starter-api"', b'"starter-apj"')
    assert tampered != app_compose
    with pytest.raises(InputError, match="not to the compose hash"):
        measured_section(info_of(tampered, reported=compose_hash(app_compose).hex()))


def test_the_hash_may_come_from_info_when_tcb_info_has_none() -> None:
    app_compose = group_app_compose(spec_of(), "api")
    info = info_of(app_compose)
    info["tcb_info"] = json.dumps({"app_compose": app_compose.decode()})
    assert measured_section(info)[1] == compose_hash(app_compose).hex()
    del info["compose_hash"]
    with pytest.raises(InputError, match=r"measured \(none\)"):
        measured_section(info)


@pytest.mark.parametrize(
    "info",
    [
        {},
        {"tcb_info": None},
        {"tcb_info": "not json"},
        {"tcb_info": "[1, 2]"},
        {"tcb_info": json.dumps({"compose_hash": "00" * 32})},
        {"tcb_info": json.dumps({"app_compose": 7})},
        {"tcb_info": "[" * 100_000},
    ],
)
def test_an_info_without_an_app_compose_is_refused(info: dict[str, Any]) -> None:
    with pytest.raises(InputError):
        measured_section(info)


def _measured(text: str) -> dict[str, Any]:
    digest = hashlib.sha256(text.encode()).hexdigest()
    return {"tcb_info": json.dumps({"app_compose": text, "compose_hash": digest})}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("not json", "not JSON"),
        ("[" * 100_000, "not JSON"),
        ('{"manifest_version": 2}', "no teemesh.sidecar section"),
        ('["teemesh"]', "no teemesh.sidecar section"),
        ('{"teemesh": {"sidecar": "yes"}}', "no teemesh.sidecar section"),
    ],
)
def test_an_app_compose_not_rendered_by_teemesh_is_refused(text: str, problem: str) -> None:
    with pytest.raises(InputError, match=problem):
        measured_section(_measured(text))


def test_an_app_compose_with_a_lone_surrogate_is_refused() -> None:
    info = {"tcb_info": json.dumps({"app_compose": "\ud800", "compose_hash": "00" * 32})}
    with pytest.raises(InputError, match="not UTF-8"):
        measured_section(info)


@pytest.mark.parametrize("role", ["kms", "coordinator"])
def test_the_apps_without_a_sidecar_are_refused(role: str) -> None:
    """The KMS runs none, and a coordinator only when it serves a DCS."""
    with pytest.raises(InputError, match=r"no teemesh\.sidecar section"):
        measured_section(info_of(system_app_compose(spec_of(), role)))


@pytest.mark.parametrize("name", ["coordinator_policy", "via_gateway", "gateway"])
def test_a_section_entry_of_the_wrong_shape_is_refused(name: str) -> None:
    section = {"sidecar": {name: "x"}}
    with pytest.raises(InputError, match=f"teemesh.sidecar.{name}: expected a mapping"):
        dstack_sidecar_config(section, "00" * 32, {})


def test_a_coordinators_list_without_a_url_is_refused() -> None:
    spec = spec_of()
    plan = plan_cluster(spec)
    env = env_of(plan, plan.cvm("api-0")) | {ENV_COORDINATORS: " , "}
    with pytest.raises(InputError, match="TEEMESH_COORDINATORS: no URL"):
        completed(group_app_compose(spec, "api"), env)


# -- the coordinators' policy as text (coordinator --policy-env) -------------------------------


def test_the_rendered_policy_parses_from_text_as_from_a_file(tmp_path: Path) -> None:
    policy = cluster_policy(plan_cluster(spec_of()), PEM)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(policy))
    from_json = parse_cluster_policy(json.dumps(policy), "$POLICY")
    assert from_json == parse_cluster_policy(yaml.safe_dump(policy), "$POLICY")
    assert from_json == load_cluster_policy(path)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "(top level): expected a mapping"),
        ("[1]", "(top level): expected a mapping"),
        ("cluster: [", "invalid YAML"),
        ("cluster: demo\ntee: simulated\n", "tee: simulated needs platform_key"),
        ("cluster: demo\ntee: simulated\nplatform_key: platform.pub\n", "expected PEM text"),
        ("[" * 100_000, "nested too deeply"),
    ],
)
def test_a_bad_policy_text_is_refused_naming_its_source(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_cluster_policy(text, "$POLICY")
    assert info.value.source == "$POLICY"
    assert any(problem in p for p in info.value.problems), info.value.problems


@pytest.mark.parametrize(
    "value",
    [PEM, PEM.strip(), PEM.strip().replace("\n", "\\n"), f"  {PEM}  "],
    ids=["as-is", "no-final-newline", "one-line-escaped", "padded"],
)
def test_pem_in_env_is_taken_whole_or_on_one_line(value: str) -> None:
    assert pem_from_env(value) == PEM.strip() + "\n"
