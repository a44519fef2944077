"""Fuzz the cluster spec: whatever the document, ``parse_spec`` returns a spec or raises
ConfigError (an InputError), never anything else; and whatever it accepts plans, renders a
policy the coordinator loads, and gives every sidecar a configuration it loads.

Two generators: any JSON-like value (the shapes are wrong almost always), and spec-like
documents built from the real field names, small names and ports, so the cross-field checks
(duplicates, references, ports per CVM) run on near misses. The Terraform importer gets HCL
text built from the same values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fuzzkit
import yaml
from fuzzkit import input_error_only
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from teemesh.attest.simulated import PlatformKey
from teemesh.config import ConfigError, parse_model
from teemesh.coordinator.policy import ClusterPolicy
from teemesh.sidecar.config import load_sidecar_config
from teemesh.spec import (
    cluster_policy,
    coordinator_attest_policy,
    gateway_settings,
    parse_spec,
    plan_cluster,
    sidecar_config,
)
from teemesh.spec.hcl import import_hcl

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_SMALL = settings(FUZZ, max_examples=60)
PEM = PlatformKey.generate().public_pem().decode()


def mostly(valid: tuple[Any, ...], wrong: tuple[Any, ...]) -> st.SearchStrategy[Any]:
    """Mostly ``valid`` values, now and then a ``wrong`` one: specs near the accepted ones."""
    return st.sampled_from(valid * 6 + wrong)


names = mostly(("api", "worker", "db"), ("gateway", "kms", "api-0", "API", "", "w" * 64))
ports = mostly((8080, 9090, 5432), (7443, 7001, 0, 65536))
vips = mostly((None,) * 4 + ("127.77.0.10", "127.77.9.9"), ("10.0.0.1", "127.0.0.1", "x"))


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


backends = st.builds(
    lambda port, owner, public, http: _drop_none(
        {"port": port, "owner": owner, "public": public,
         "health": None if http is None else {"http": http}}
    ),
    ports, mostly((None, "platform", "workload"), ("x",)), st.none() | st.booleans(),
    mostly((None, "/hello"), ("nope",)),
)  # fmt: skip
routes = st.builds(
    lambda backend, port, role, who, vip: _drop_none(
        {"backend": backend, "port": port, "role": role, "callers": who, "vip": vip}
    ),
    names, mostly((None,), (8080, 1)), mostly((None, None, "master"), ("Bad",)),
    st.none() | st.lists(names, max_size=2), vips,
)  # fmt: skip
groups = st.builds(
    lambda replicas, command, b, r, env: _drop_none(
        {"replicas": replicas, "command": command, "backends": b, "routes": r, "compose_env": env}
    ),
    mostly((None, 1, 2, 5), (0, -1, 40)),
    mostly((None, "python -m x", ["python", "-m", "x"]), ("", [], [""])),
    st.none() | st.dictionaries(names, backends, max_size=3),
    st.none() | st.dictionaries(names, routes, max_size=3),
    st.none() | st.dictionaries(mostly(("A", "B"), ("TEEMESH_X", "1B")), st.text(max_size=3)),
)  # fmt: skip
specs = st.builds(
    lambda tee, network, coordinators, gateway, transport, workload_groups: _drop_none(
        {"cluster": "demo", "tee": tee, "network": network, "coordinators": coordinators,
         "gateway": gateway, "transport": transport, "workload_groups": workload_groups}
    ),
    mostly(("simulated",), ("tdx", None)),
    mostly((None, "10.9.0.0/26"), ("10.9.0.0/29", "8.8.8.0/24", "10.9.0.1/24")),
    mostly((None, {"count": 1}, {"count": 3, "store": "etcd"}), ({"count": 2}, {"count": 0})),
    mostly((None, {}), ({"base_domain": "Bad Domain"},)),
    mostly((None, "direct"), ("gateway", "udp")),
    st.dictionaries(names, groups, min_size=1, max_size=3),
)  # fmt: skip
documents = specs | fuzzkit.json_values()


def check_accepted(doc: Any, tmp: Path | None = None) -> None:
    spec = input_error_only(parse_spec, doc, source="fuzz.yaml")
    if spec is None:
        return
    plan = plan_cluster(spec)
    addresses = [c.address for c in plan.cvms]
    assert len(set(addresses)) == len(addresses)
    assert len({r.vip for r in plan.routes}) == len(plan.routes)
    key = PEM if spec.tee == "simulated" else None
    parse_model(ClusterPolicy, cluster_policy(plan, key), source="policy")
    pin = coordinator_attest_policy(plan, key)
    sidecars = [c for c in plan.cvms if c.role in ("workload", "gateway")]
    for cvm in sidecars[:2] if tmp else ():
        path = tmp / f"{cvm.name}.yaml"  # type: ignore[operator]
        gateway = None
        if cvm.role == "gateway":
            gateway = gateway_settings(plan, certificate="/tls.pem", key="/tls.key")
        config = sidecar_config(plan, cvm, plan.coordinator_urls(), pin, gateway=gateway)
        path.write_text(yaml.safe_dump(config))
        loaded = load_sidecar_config(path)
        assert loaded.vips() == {r.name: r.vip for r in plan.routes}


@FUZZ
@given(documents)
@example({"cluster": "demo", "tee": "simulated", "workload_groups": {"a": {}}})
@example({"cluster": "demo", "tee": "simulated", "workload_groups": {"a": {"command": "\ud800"}}})
@example({"cluster": "demo", "tee": "simulated", "workload_groups": {"a": {"command": ["\x00"]}}})
def test_parse_spec_accepts_or_names_the_problem(doc: Any) -> None:
    check_accepted(doc)


@FUZZ_SMALL
@given(specs)
def test_accepted_specs_give_loadable_sidecar_configs(doc: Any) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        check_accepted(doc, Path(tmp))


@FUZZ_SMALL
@given(st.text(max_size=200) | st.binary(max_size=100).map(lambda b: b.decode("latin-1")))
@example("locals { workload_groups = { a = { replicas = 1 } } }")
def test_load_spec_reads_any_file(text: str) -> None:
    import tempfile

    from teemesh.spec import load_spec

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cluster.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        input_error_only(load_spec, path)


def hcl(value: Any) -> str:
    """A JSON-like value as HCL text (objects with quoted keys, strings JSON-escaped)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {hcl(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(hcl(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value != value:  # NaN has no HCL literal
        return "0"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "1"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value)


anchor_values = st.dictionaries(names, groups, min_size=1, max_size=3).map(
    lambda gs: {
        g: {**body, "size": "tdx.small", "services": [{"name": "s", "port": 1, "subset": "m"}]}
        for g, body in gs.items()
    }
)
hcl_texts = (
    st.builds(lambda v: f"locals {{\n  workload_groups = {hcl(v)}\n}}\n", anchor_values)
    | st.builds(lambda v: f"locals {{\n  workload_groups = {hcl(v)}\n}}\n", fuzzkit.json_values())
    | st.text(max_size=120)
)


@FUZZ
@given(hcl_texts)
@example("locals { workload_groups = { a = { replicas = ${x} } } }")
@example("locals { workload_groups = { a = { compose = file(1) } } }")
def test_import_hcl_gives_a_document_or_config_error(text: str) -> None:
    try:
        doc, notes = import_hcl(text, source="fuzz.tf")
    except ConfigError as exc:
        assert exc.problems
        return
    assert isinstance(doc["workload_groups"], dict)
    assert all(isinstance(n, str) for n in notes)
    check_accepted(doc)  # whatever it produced is judged by the spec's own rules
