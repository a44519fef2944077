"""The local platform's pure core: names, checks, plans and the state file (no root needed)."""

from __future__ import annotations

import ipaddress
import json
import stat
from pathlib import Path

import pytest

from teemesh.errors import InputError
from teemesh.platform import netns, vmm
from teemesh.platform.netns import NetworkState, Present, Process

CVMS = {"a": "10.77.0.11/24", "b": "10.77.0.12/24", "c": "10.77.0.13/24"}
LONGEST = "x" * 63


@pytest.fixture
def state() -> NetworkState:
    return netns.plan_network("starter", "10.77.0.1/24", CVMS)


def everything_of(state: NetworkState) -> Present:
    return Present(
        namespaces=frozenset(c.netns for c in state.cvms) | {"someone-else"},
        links=frozenset([state.bridge, "eth0", *(c.veth for c in state.cvms)]),
        etc_dirs=frozenset(c.etc_dir for c in state.cvms),
    )


def test_names_fit_linux_limits_and_are_stable() -> None:
    for cluster, cvm in [("starter", "api-0"), (LONGEST, LONGEST), ("a", "b")]:
        for name in (netns.bridge_name(cluster), netns.veth_name(cluster, cvm)):
            assert len(name) <= netns.IFNAMSIZ
            assert name.startswith("tm")
    assert netns.bridge_name("starter") == netns.bridge_name("starter")
    assert netns.veth_name("starter", "api-0") == netns.veth_name("starter", "api-0")
    assert netns.netns_name("starter", "api-0") == "tm-starter-api-0"


def test_names_differ_between_clusters_and_cvms() -> None:
    assert netns.bridge_name("starter") != netns.bridge_name("starter2")
    veths = {netns.veth_name(c, v) for c in ("s", "s-a", "t") for v in ("a", "a-0", "b")}
    assert len(veths) == 9
    # a name pair that collides as text ("a-b" + "c" vs "a" + "b-c") still gets two veths
    assert netns.veth_name("a-b", "c") != netns.veth_name("a", "b-c")


def test_plan_derives_every_name(state: NetworkState) -> None:
    assert state.bridge == netns.bridge_name("starter")
    a = state.cvm("a")
    assert (a.netns, a.ip, a.address) == ("tm-starter-a", "10.77.0.11", "10.77.0.11/24")
    assert a.etc_dir == "/etc/netns/tm-starter-a"
    assert not state.ready
    with pytest.raises(InputError, match="has no CVM 'zz'"):
        state.cvm("zz")


def test_plan_reports_every_problem_at_once() -> None:
    cvms = {
        "Bad_Name": "10.77.0.20/24",
        "far": "10.78.0.11/24",
        "twin": "10.77.0.11/24",
        "same": "10.77.0.11/24",
        "host": "10.77.0.1/24",
        "net": "10.77.0.0/24",
        "junk": "not-an-address",
    }
    with pytest.raises(InputError) as caught:
        netns.plan_network("Cluster!", "10.77.0.1/24", cvms)
    message = str(caught.value)
    for expected in [
        "cluster: 'Cluster!' is not a name",
        "cvms.Bad_Name: not a name",
        "cvms.far: 10.78.0.11/24 is not in the host's network 10.77.0.0/24",
        "cvms.same: 10.77.0.11 is already used by twin",
        "cvms.host: 10.77.0.1 is already used by the host",
        "cvms.net: 10.77.0.0/24 is not a host address",
        "cvms.junk: 'not-an-address' is not an IPv4 address",
    ]:
        assert expected in message


@pytest.mark.parametrize(
    ("host", "cvms", "expected"),
    [
        ("10.77.0.1/24", {}, "at least one CVM"),
        ("10.77.0.1/32", {"a": "10.77.0.1/32"}, "host_address: 10.77.0.1/32 is not a host"),
        ("fd00::1/64", {"a": "fd00::2/64"}, "not an IPv4 address"),
    ],
)
def test_plan_refuses(host: str, cvms: dict[str, str], expected: str) -> None:
    with pytest.raises(InputError, match=expected):
        netns.plan_network("starter", host, cvms)


def test_conflicts_name_what_is_in_the_way(state: NetworkState) -> None:
    assert netns.find_conflicts(state, Present()) == []
    present = Present(
        namespaces=frozenset({"tm-starter-b"}),
        links=frozenset({state.bridge}),
        routes=(
            ipaddress.IPv4Network("0.0.0.0/0"),  # the default route overlaps everything: ignored
            ipaddress.IPv4Network("192.0.2.0/24"),
            ipaddress.IPv4Network("10.0.0.0/8"),
        ),
    )
    problems = netns.find_conflicts(state, present)
    assert len(problems) == 3
    assert f"interface {state.bridge} already exists" in problems[0]
    assert "network namespace tm-starter-b already exists" in problems[1]
    assert "10.0.0.0/8, which overlaps 10.77.0.0/24" in problems[2]


def test_creation_commands(state: NetworkState) -> None:
    assert netns.bridge_commands(state)[1] == ("addr", "add", "10.77.0.1/24", "dev", state.bridge)
    commands = netns.cvm_commands(state, state.cvm("a"))
    assert commands[0] == ("netns", "add", "tm-starter-a")
    veth = state.cvm("a").veth
    assert (
        "link",
        "add",
        veth,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        "tm-starter-a",
    ) in commands
    assert ("-n", "tm-starter-a", "link", "set", "lo", "up") in commands


def test_partition_routes_both_ways(state: NetworkState) -> None:
    assert netns.partition_commands(state, "a", "b", heal=False) == [
        ("-n", "tm-starter-a", "route", "replace", "unreachable", "10.77.0.12/32"),
        ("-n", "tm-starter-b", "route", "replace", "unreachable", "10.77.0.11/32"),
    ]
    healing = netns.partition_commands(state, "b", "a", heal=True)
    assert {cmd[3] for cmd in healing} == {"del"}
    assert netns.pair("b", "a") == ("a", "b")
    with pytest.raises(InputError, match="from itself"):
        netns.pair("a", "a")
    with pytest.raises(InputError, match="no CVM"):
        netns.partition_commands(state, "a", "nope", heal=False)


def test_hosts_file_names_every_cvm_and_extras(state: NetworkState) -> None:
    text = netns.hosts_text(state, "b", {"worker": "127.77.0.5"})
    lines = text.splitlines()
    assert "127.0.0.1\tlocalhost" in lines
    assert lines.index("10.77.0.12\tb") < lines.index("10.77.0.11\ta")  # its own name first
    assert "10.77.0.13\tc" in lines
    assert lines[-1] == "127.77.0.5\tworker"
    with pytest.raises(InputError, match="not a host name"):
        netns.hosts_text(state, "b", {"bad name": "127.77.0.5"})
    with pytest.raises(InputError, match="not an IP address"):
        netns.hosts_text(state, "b", {"worker": "127.77.0"})


def test_teardown_plan_removes_what_exists_in_order(state: NetworkState) -> None:
    plan = netns.plan_teardown(state, everything_of(state))
    veths = [("link", "del", c.veth) for c in state.cvms]
    namespaces = [("netns", "del", c.netns) for c in state.cvms]
    assert list(plan.commands) == [*veths, *namespaces, ("link", "del", state.bridge)]
    assert set(plan.remove_dirs) == {c.etc_dir for c in state.cvms}
    assert "someone-else" not in str(plan)


def test_teardown_plan_is_idempotent(state: NetworkState) -> None:
    assert netns.plan_teardown(state, Present()).empty
    # half made (a crash while creating b): only what is there is removed
    partial = Present(
        namespaces=frozenset({"tm-starter-a", "tm-starter-b"}),
        links=frozenset({state.bridge, state.cvm("a").veth}),
        etc_dirs=frozenset({state.cvm("a").etc_dir}),
    )
    plan = netns.plan_teardown(state, partial)
    assert list(plan.commands) == [
        ("link", "del", state.cvm("a").veth),
        ("netns", "del", "tm-starter-a"),
        ("netns", "del", "tm-starter-b"),
        ("link", "del", state.bridge),
    ]


def test_state_file_round_trip(tmp_path: Path, state: NetworkState) -> None:
    record = Process(cvm="a", name="sidecar", pid=4242, start_time=99, log="/x/sidecar.log")
    state = state.model_copy(
        update={"processes": (record,), "partitions": (("a", "b"),), "ready": True}
    )
    netns.save_state(tmp_path, state)
    path = tmp_path / netns.STATE_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert netns.load_state(tmp_path) == state
    assert json.loads(path.read_text())["partitions"] == [["a", "b"]]
    assert state.process("a", "sidecar") == record
    assert state.without_processes("a").processes == ()
    assert state.without_processes("a", "other").processes == (record,)


def test_state_file_missing_or_broken(tmp_path: Path) -> None:
    assert netns.load_state(tmp_path) is None
    with pytest.raises(InputError, match="no cluster network recorded"):
        netns.require_state(tmp_path)
    (tmp_path / netns.STATE_FILE).write_text('{"version": 1, "cluster": 3}')
    with pytest.raises(InputError, match="not a readable network state"):
        netns.load_state(tmp_path)


def test_teardown_without_state_has_nothing_to_do(tmp_path: Path) -> None:
    def no_ip(args: object) -> str:
        raise AssertionError(f"ip called: {args}")

    assert vmm.teardown(tmp_path / "never-created", run=no_ip) is False
    assert not (tmp_path / "never-created").exists()


@pytest.mark.parametrize(
    ("cap_eff", "missing"),
    [
        ("000001ffffffffff", []),
        ("0000000000000000", ["CAP_NET_ADMIN", "CAP_SYS_ADMIN"]),
        ("0000000000001000", ["CAP_SYS_ADMIN"]),  # CAP_NET_ADMIN is bit 12
        ("0000000000200000", ["CAP_NET_ADMIN"]),  # CAP_SYS_ADMIN is bit 21
    ],
)
def test_missing_capabilities(cap_eff: str, missing: list[str]) -> None:
    status = f"Name:\tpython\nCapInh:\t0000000000000000\nCapEff:\t{cap_eff}\nCapBnd:\t0\n"
    assert netns.missing_capabilities(status) == missing


def test_proc_stat_survives_odd_command_names() -> None:
    fields = ["S", "1", "777", "777"] + ["0"] * 15 + ["123456"] + ["0"] * 30
    text = "4242 (evil) name (x)) " + " ".join(fields)
    assert vmm.parse_stat(text) == vmm.ProcStat(state="S", pgrp=777, start_time=123456)
