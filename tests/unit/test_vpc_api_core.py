"""The VPC API's pure parts: dstack-vpc's allowlist, query parameters, node records, replies."""

from __future__ import annotations

import base64
import ipaddress
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teemesh.config import ConfigError, parse_model
from teemesh.coordinator import vpc
from teemesh.coordinator.policy import ClusterPolicy
from teemesh.coordinator.records import PolicyEpoch
from teemesh.errors import InputError

APP_A = "ab" * 20
APP_B = "0123456789" * 4

app_ids = st.binary(min_size=20, max_size=20).map(bytes.hex)
# an app id as an operator might write it: any case, padded with spaces
written = st.tuples(app_ids, st.booleans(), st.sampled_from(["", " ", "  "])).map(
    lambda t: (t[0].upper() if t[1] else t[0]).join([t[2], t[2]])
)
entries = st.lists(st.one_of(written, st.sampled_from(["any", "ANY", " Any ", "", " "])))


@settings(max_examples=300)
@given(items=entries, probe=app_ids)
def test_the_allowlist_reads_as_dstack_vpc_reads_allowed_apps(items: list[str], probe: str) -> None:
    as_text = vpc.parse_allowed_apps(",".join(items))
    assert vpc.parse_allowed_apps(items) == as_text  # a YAML list means the same as the CSV
    wanted = {i.strip().lower() for i in items} - {""}
    assert set(as_text) == wanted
    for entry in wanted - {"any"}:  # every listed app, in any case
        assert vpc.app_allowed(as_text, entry.upper()) and vpc.app_allowed(as_text, entry)
    assert vpc.app_allowed(as_text, probe) == ("any" in wanted or probe in wanted)


def test_any_allows_all_empty_denies_all_and_typos_are_refused() -> None:
    assert vpc.app_allowed(vpc.parse_allowed_apps("any"), APP_A)
    assert vpc.app_allowed(vpc.parse_allowed_apps([APP_B, "any"]), APP_A)
    for empty in ("", " , ", []):
        assert not vpc.app_allowed(vpc.parse_allowed_apps(empty), APP_A)
    assert not vpc.app_allowed(vpc.parse_allowed_apps(APP_B), APP_A)
    for wrong in (["web"], "anyone", APP_A[:-1], 42, [1], f"0x{APP_A}"):
        with pytest.raises(ValueError):
            vpc.parse_allowed_apps(wrong)


def policy(vpc_section: object = None) -> ClusterPolicy:
    doc: dict[str, object] = {"cluster": "demo"}
    if vpc_section is not None:
        doc["vpc"] = vpc_section
    return parse_model(ClusterPolicy, doc, source="cluster.yaml")


def test_the_vpc_section_of_the_cluster_policy() -> None:
    off = policy()
    assert off.vpc is None and "vpc" not in off.model_dump(mode="json")  # old digests hold
    on = policy({"allowed_apps": f"{APP_A.upper()}, {APP_B}"})
    assert on.vpc is not None and on.vpc.allows(APP_A) and not on.vpc.allows("cd" * 20)
    epoch = PolicyEpoch(1, PolicyEpoch.digest_of(on), on)
    assert PolicyEpoch.from_bytes(epoch.to_bytes()).policy == on  # as the store keeps it
    with pytest.raises(ConfigError, match=r"vpc\.allowed_apps: 'web' is neither"):
        policy({"allowed_apps": ["web"]})
    with pytest.raises(ConfigError, match=r"vpc\.allowed_apps: Field required"):
        policy({})
    with pytest.raises(ConfigError, match=r"vpc\.allow: Extra inputs"):
        policy({"allowed_apps": "any", "allow": "any"})


# -- parameters ------------------------------------------------------------------------------

UPDATE_NAMES = ("uuid", "node_type", "tailscale_ip", "hostname", "other")
texts = st.one_of(
    st.text(max_size=300),
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,130}", fullmatch=True),
    st.ip_addresses().map(str),
)
queries = st.lists(st.tuples(st.sampled_from(UPDATE_NAMES), texts), max_size=6)


@settings(max_examples=500)
@given(items=queries)
def test_an_update_is_parsed_or_refused_naming_its_parameter(
    items: list[tuple[str, str]],
) -> None:
    names = [n for n, _ in items if n != "other"]
    given_values = {n: v for n, v in items if v}
    try:
        update = vpc.parse_update(items)
    except InputError as exc:
        assert exc.field in UPDATE_NAMES[:4]
        if isinstance(exc, vpc.MissingParameter):
            assert exc.problem == "uuid parameter is required" and "uuid" not in given_values
        return
    assert len(names) == len(set(names))  # a repeated parameter is refused
    assert update.uuid == given_values["uuid"] and len(update.uuid) <= 128
    assert "/" not in update.uuid  # one store key segment
    if update.tailscale_ip is not None:
        assert update.tailscale_ip == str(ipaddress.ip_address(given_values["tailscale_ip"]))
    assert update.node_type == given_values.get("node_type")
    assert update.hostname == given_values.get("hostname")
    if update.hostname is not None:
        assert len(update.hostname) <= 253 and update.hostname.isascii()


@settings(max_examples=300)
@given(instance_id=texts, node_name=st.one_of(st.none(), texts))
def test_a_registration_needs_an_instance_id_and_defaults_the_node_name(
    instance_id: str, node_name: str | None
) -> None:
    items = [("instance_id", instance_id)] + ([("node_name", node_name)] if node_name else [])
    try:
        request = vpc.parse_register(items)
    except vpc.MissingParameter as exc:
        assert instance_id == "" and exc.problem == "Missing required parameters"
        return
    except InputError as exc:
        assert exc.field in ("instance_id", "node_name")
        return
    assert request.instance_id == instance_id
    assert request.node_name == (node_name or f"node-{instance_id}")


def test_parameters_exactly() -> None:
    assert vpc.parse_update([("uuid", "n1"), ("hostname", ""), ("x", "y")]) == vpc.NodeUpdate("n1")
    full = [
        ("uuid", "n1"),
        ("node_type", "etcd"),
        ("tailscale_ip", "fd7a::0:1"),
        ("hostname", "a.b"),
    ]
    assert vpc.parse_update(full) == vpc.NodeUpdate("n1", "etcd", "fd7a::1", "a.b")
    with pytest.raises(vpc.MissingParameter) as missing:
        vpc.parse_update([("uuid", ""), ("node_type", "app")])
    assert missing.value.problem == "uuid parameter is required"
    for name, value in [("uuid", "a/b"), ("uuid", "x" * 129), ("tailscale_ip", "100.64.0.256"),
                        ("hostname", "a..b"), ("node_type", "etcd/x")]:  # fmt: skip
        with pytest.raises(InputError) as info:
            vpc.parse_update([("uuid", "n1"), (name, value)])
        assert info.value.field == name
    with pytest.raises(InputError, match="more than once"):
        vpc.parse_update([("uuid", "n1"), ("uuid", "n2")])
    assert vpc.parse_register([("instance_id", "i-1")]).node_name == "node-i-1"


# -- records and replies ---------------------------------------------------------------------


OWNER_A = vpc.Owner(APP_A, "web", "web-0")
OWNER_B = vpc.Owner(APP_B, "db", "db-0")


def test_an_update_merges_only_the_fields_it_carries() -> None:
    created = vpc.merge(None, vpc.NodeUpdate("n1", node_type="app"), OWNER_A)
    assert created == vpc.Node("n1", "app", None, None, OWNER_A)
    update = vpc.NodeUpdate("n1", tailscale_ip="100.64.0.1", hostname="h1")
    merged = vpc.merge(created, update, vpc.Owner(APP_A, "web", "web-1"))
    assert merged == vpc.Node("n1", "app", "100.64.0.1", "h1", OWNER_A)  # the creator stays
    assert vpc.merge(merged, vpc.NodeUpdate("n1", node_type="etcd"), OWNER_A).hostname == "h1"
    assert vpc.Node.from_bytes(merged.to_bytes()) == merged
    assert merged.to_json() == {
        "uuid": "n1", "name": "n1", "node_type": "app",
        "tailscale_ip": "100.64.0.1", "actual_hostname": "h1",
    }  # fmt: skip
    assert "owner" in json.loads(merged.to_bytes())  # kept in the store, never listed


def test_only_the_app_that_created_a_node_may_change_it() -> None:
    node = vpc.merge(None, vpc.NodeUpdate("e1", node_type="etcd"), OWNER_A)
    assert vpc.may_change(node, APP_A) and vpc.may_change(node, APP_A.upper())
    assert not vpc.may_change(node, APP_B)
    stored = vpc.Node.from_bytes(node.to_bytes())
    assert stored == node and stored.owner == OWNER_A  # the store keeps who created it
    assert str(OWNER_B) == f"app {APP_B} (db/db-0)"  # what the log says


def test_a_node_written_before_owners_is_claimed_by_its_first_updater() -> None:
    before = (
        b'{"uuid":"e1","name":"e1","node_type":"etcd","tailscale_ip":null,"actual_hostname":"h"}'
    )
    legacy = vpc.Node.from_bytes(before)
    assert legacy == vpc.Node("e1", "etcd", None, "h") and legacy.owner is None
    assert vpc.may_change(legacy, APP_A) and vpc.may_change(legacy, APP_B)
    claimed = vpc.merge(legacy, vpc.NodeUpdate("e1"), OWNER_B)  # no field: still a change
    assert claimed == vpc.Node("e1", "etcd", None, "h", OWNER_B) and claimed != legacy
    assert not vpc.may_change(claimed, APP_A)


def test_nodes_are_limited_per_app_and_in_all() -> None:
    def owned(owner: vpc.Owner | None, n: int, tag: str) -> list[vpc.Node]:
        return [vpc.Node(f"{tag}{i}", owner=owner) for i in range(n)]

    assert (vpc.MAX_NODES_PER_APP, vpc.MAX_NODES) == (256, 4096)
    full = owned(OWNER_A, vpc.MAX_NODES_PER_APP, "a")
    vpc.check_room(full[1:], APP_A)
    with pytest.raises(vpc.NodeLimit, match=f"app {APP_A} already has 256 nodes, the limit"):
        vpc.check_room(full, APP_A.upper())
    vpc.check_room(full + owned(None, 100, "old"), APP_B)  # another app's, and unowned ones
    others = [vpc.Owner(f"{i:040x}") for i in range(vpc.MAX_NODES // vpc.MAX_NODES_PER_APP)]
    store = [n for o in others for n in owned(o, vpc.MAX_NODES_PER_APP, o.app_id)]
    vpc.check_room(store[1:], APP_A)
    with pytest.raises(vpc.NodeLimit, match="the VPC already has 4096 nodes, the limit is 4096"):
        vpc.check_room(store, APP_A)
    # what a listing can hold is bounded: every node at its largest, ~1 KiB each
    big = vpc.Node("u" * 128, "t" * 63, "ffff:" * 7 + "ffff", "h" * 253, OWNER_A)
    assert len(json.dumps(vpc.nodes_reply([big]))) < 1024


def test_discovery_lists_the_type_with_host_names_and_etcd_ports() -> None:
    nodes = [
        vpc.Node("e1", "etcd", "100.64.0.1", "etcd-1"),
        vpc.Node("e2", "etcd", None, "etcd-2"),
        vpc.Node("e3", "etcd", "100.64.0.3", None),  # no host name yet: not discoverable
        vpc.Node("a1", "app", None, "app-1"),
    ]
    assert vpc.discover_reply(nodes, "etcd") == {
        "nodes": [
            {"hostname": "etcd-1", "tailscale_ip": "100.64.0.1", "uuid": "e1",
             "hostname_with_port": "etcd-1:2379"},
            {"hostname": "etcd-2", "tailscale_ip": None, "uuid": "e2",
             "hostname_with_port": "etcd-2:2379"},
        ],
        "count": 2,
        "node_type": "etcd",
    }  # fmt: skip
    assert vpc.discover_reply(nodes, "app") == {
        "nodes": [{"hostname": "app-1", "tailscale_ip": None, "uuid": "a1"}],
        "count": 1,
        "node_type": "app",
    }
    assert vpc.discover_reply(nodes, "mongodb") is None
    # dstack-vpc's hostname_with_port: etcd's default client port, not the catalog etcd's
    assert vpc.DISCOVERED_ETCD_PORT == 2379 and not hasattr(vpc, "ETCD_CLIENT_PORT")
    assert vpc.nodes_reply(nodes[:1]) == {"nodes": [nodes[0].to_json()], "count": 1}


def test_the_shared_key_is_derived_and_no_pre_auth_key_is_minted() -> None:
    key = vpc.derive_shared_key(b"\x01" * 32)
    assert len(key) == 64 and key == vpc.derive_shared_key(b"\x01" * 32)
    assert key != vpc.derive_shared_key(b"\x02" * 32)
    reply = vpc.register_reply(key, "https://coordinator:8443")
    assert reply == {
        "pre_auth_key": None,
        "shared_key": base64.b64encode(key).decode(),
        "server_url": "https://coordinator:8443",
    }
