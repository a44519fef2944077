"""Routing decisions (``sidecar.routing``) and backend health (``sidecar.health.HealthState``).

Pure: catalog values and watch events in, instances and orders out; the clock is a number.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from teemesh.sidecar.config import HealthCheck, Route
from teemesh.sidecar.health import HealthState
from teemesh.sidecar.routing import (
    Balancer,
    Instance,
    InstanceTable,
    revocation_serial,
    revoked_serials,
)


def value(service: str = "db", peer: str = "db-1", **extra: Any) -> dict[str, Any]:
    return {
        "service": service,
        "group": "db",
        "peer_id": peer,
        "address": "10.0.0.1",
        "port": 7443,
        **extra,
    }


def instance(key: str, service: str = "db", **extra: Any) -> Instance:
    found = Instance.from_value(key, value(service, key, **extra))
    assert found is not None
    return found


DB = Route(backend="db", port=5432)
PRIMARY = Route(backend="db", port=5432, role="primary")

# -- Instance --------------------------------------------------------------------------------


def test_from_value_reads_every_field() -> None:
    got = Instance.from_value(
        "instances/db/db-1",
        value(tags={"role": "primary", "zone": 1}, health="warning", instance_id="ab" * 20),
    )
    assert got == Instance(
        "instances/db/db-1", "db", "db", "db-1", "10.0.0.1", 7443, {}, "warning", "ab" * 20
    )
    assert got is not None
    assert got.tags == {"role": "primary", "zone": "1"}


def test_from_value_defaults() -> None:
    got = Instance.from_value("k", value())
    assert got is not None
    assert (got.tags, got.health, got.instance_id) == ({}, "passing", None)


@pytest.mark.parametrize("encode", [json.dumps, lambda v: json.dumps(v).encode()])
def test_from_value_accepts_json_text(encode: Any) -> None:
    assert Instance.from_value("k", encode(value())) == Instance.from_value("k", value())


@pytest.mark.parametrize(
    "bad",
    [
        None,
        42,
        [value()],
        "not json",
        b"\xff\xfe",
        json.dumps([1]),
        {k: v for k, v in value().items() if k != "service"},
        {k: v for k, v in value().items() if k != "group"},
        {k: v for k, v in value().items() if k != "peer_id"},
        {k: v for k, v in value().items() if k != "address"},
        {k: v for k, v in value().items() if k != "port"},
        value(port=0),
        value(port=65536),
        value(port=-1),
        value(port="http"),
        value(port=None),
        value(port=[7443]),
        value(port=float("nan")),
        value(port=float("inf")),
        value(tags=["role", "primary"]),
        value(tags="role=primary"),
        '{"service": "db", "group": "db", "peer_id": "p", "address": "a", "port": Infinity}',
    ],
)
def test_from_value_skips_what_it_cannot_use(bad: Any) -> None:
    assert Instance.from_value("k", bad) is None


def test_serves() -> None:
    assert instance("a").serves(DB)
    assert not instance("a", service="kv").serves(DB)
    assert not instance("a", health="critical").serves(DB)
    assert instance("a", health="warning").serves(DB)


def test_role_route_selects_only_role_tagged_instances_never_critical_ones() -> None:
    assert instance("a", tags={"role": "primary"}).serves(PRIMARY)
    assert not instance("a", tags={"role": "replica"}).serves(PRIMARY)
    assert not instance("a").serves(PRIMARY)
    assert not instance("a", tags={"primary": "role"}).serves(PRIMARY)
    assert not instance("a", tags={"role": "primary"}, health="critical").serves(PRIMARY)
    # a route without a role takes every role
    assert instance("a", tags={"role": "replica"}).serves(DB)


# -- InstanceTable ---------------------------------------------------------------------------


def test_table_load_replaces_and_skips_malformed_values() -> None:
    table = InstanceTable()
    table.load({"instances/db/old": value(peer="old")})
    table.load(
        {
            "instances/db/a": value(peer="a"),
            "instances/db/b": json.dumps(value(peer="b")),
            "instances/db/bad": {"service": "db"},
            "instances/db/junk": "{",
        }
    )
    assert sorted(table.instances) == ["instances/db/a", "instances/db/b"]


def test_table_apply_watch_events() -> None:
    table = InstanceTable()
    table.load({"instances/db/a": value(peer="a"), "instances/db/b": value(peer="b")})
    table.apply(
        [
            {"type": "put", "key": "instances/db/c", "value": value(peer="c")},
            {"type": "delete", "key": "instances/db/a", "value": None},
            {"type": "put", "key": "instances/db/b", "value": value(peer="b", port=8443)},
            {"type": "delete", "key": "instances/db/never-there", "value": None},
        ]
    )
    assert {k: i.port for k, i in table.instances.items()} == {
        "instances/db/b": 8443,
        "instances/db/c": 7443,
    }


def test_table_put_of_a_malformed_value_drops_the_old_one_and_raises_nothing() -> None:
    table = InstanceTable()
    table.load({"instances/db/a": value(peer="a"), "instances/db/b": value(peer="b")})
    table.apply(
        [
            {"type": "put", "key": "instances/db/a", "value": {"port": "x"}},
            {"type": "put", "key": "instances/db/b", "value": value(peer="b", port=float("inf"))},
            {"type": "put", "key": "instances/db/c", "value": None},
        ]
    )
    assert table.instances == {}


def test_table_serving() -> None:
    table = InstanceTable()
    table.load(
        {
            "p": value(peer="p", tags={"role": "primary"}),
            "r": value(peer="r", tags={"role": "replica"}),
            "x": value(peer="x", tags={"role": "primary"}, health="critical"),
            "k": value(service="kv", peer="k"),
        }
    )
    assert sorted(i.key for i in table.serving(DB)) == ["p", "r"]
    assert [i.key for i in table.serving(PRIMARY)] == ["p"]
    assert table.serving(Route(backend="nothing", port=1)) == []


# -- Balancer --------------------------------------------------------------------------------

A, B, C = instance("a"), instance("b"), instance("c")


def keys(order: list[Instance]) -> list[str]:
    return [i.key for i in order]


def test_balancer_empty() -> None:
    assert Balancer(10).order([], 0) == []


def test_balancer_prefers_the_least_loaded() -> None:
    balancer = Balancer(10)
    for key in ("a", "a", "b", "c", "c", "c"):
        balancer.opened(key)
    for _ in range(3):  # whatever the rotation
        assert keys(balancer.order([A, B, C], 0)) == ["b", "a", "c"]
    balancer.closed("c")
    balancer.closed("c")
    balancer.closed("c")
    assert keys(balancer.order([A, B, C], 0))[0] == "c"
    assert balancer.open == {"a": 2, "b": 1}  # a count that reaches zero is forgotten


def test_balancer_rotates_ties() -> None:
    balancer = Balancer(10)
    firsts = [balancer.order([A, B, C], 0)[0].key for _ in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]
    balancer.opened("b")
    orders = [keys(balancer.order([A, B, C], 0)) for _ in range(2)]
    assert {tuple(o[:2]) for o in orders} == {("a", "c"), ("c", "a")}
    assert all(o[2] == "b" for o in orders)


def test_balancer_puts_ejected_last_and_un_ejects_after_eject_seconds() -> None:
    balancer = Balancer(eject_seconds=5)
    balancer.opened("b")
    balancer.opened("b")
    balancer.eject("a", now=100)
    for now in (100, 102, 104.9):
        assert keys(balancer.order([A, B, C], now))[-1] == "a"
    assert keys(balancer.order([A, B], 104.9)) == ["b", "a"]  # loaded, but not ejected
    assert keys(balancer.order([A], 104.9)) == ["a"]  # still tried when nothing else is left
    assert keys(balancer.order([A, B], 105)) == ["a", "b"]  # back, and the least loaded


def test_balancer_orders_ejected_ones_by_load_too() -> None:
    balancer = Balancer(5)
    balancer.opened("a")
    balancer.eject("a", 0)
    balancer.eject("b", 0)
    for _ in range(2):
        assert keys(balancer.order([A, B, C], 1)) == ["c", "b", "a"]


def test_balancer_a_successful_open_un_ejects() -> None:
    balancer = Balancer(5)
    balancer.eject("a", 0)
    balancer.opened("a")
    balancer.closed("a")
    assert keys(balancer.order([B, A], 1)) == ["b", "a"]
    assert keys(balancer.order([B, A], 1)) == ["a", "b"]


def test_balancer_closed_never_goes_negative() -> None:
    balancer = Balancer(5)
    balancer.closed("a")
    balancer.opened("a")
    assert balancer.open == {"a": 1}


# -- revocations -----------------------------------------------------------------------------


def test_revoked_serials() -> None:
    snapshot = {"revocations/1f": {}, "revocations/ABCDEF": {}, "revocations/zz": {}, "x/": {}}
    assert revoked_serials(snapshot) == {0x1F, 0xABCDEF}
    assert revocation_serial("revocations/" + "f" * 40) == int("f" * 40, 16)
    assert revocation_serial("revocations/") is None
    assert revocation_serial("revocations/0x") is None


# -- HealthState -----------------------------------------------------------------------------


def run(state: HealthState, probes: str) -> list[tuple[str, bool]]:
    """(status, changed) after each probe: ``+`` passes, ``-`` fails."""
    return [(state.status, changed) for changed in (state.observe(p == "+") for p in probes)]


def test_health_rise_and_fall() -> None:
    state = HealthState(HealthCheck(rise=2, fall=3))
    assert state.status == "critical"
    assert run(state, "+-++") == [
        ("critical", False),
        ("critical", False),
        ("critical", False),
        ("passing", True),
    ]
    assert run(state, "--+---") == [
        ("passing", False),
        ("passing", False),
        ("passing", False),
        ("passing", False),
        ("passing", False),
        ("critical", True),
    ]
    assert run(state, "-") == [("critical", False)]


def test_health_defaults_one_pass_rises_two_failures_fall() -> None:
    state = HealthState(HealthCheck())
    assert run(state, "+--") == [("passing", True), ("passing", False), ("critical", True)]


def test_health_initial_passing_stays_until_fall() -> None:
    state = HealthState(HealthCheck(fall=1), initial="passing")
    assert run(state, "++-") == [("passing", False), ("passing", False), ("critical", True)]
