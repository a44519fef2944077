"""The pure parts of the Patroni member: patroni.yml rendering, the role watcher's decisions."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from teemesh.errors import InputError
from teemesh.examples import patroni_member as pm

SECRETS = pm.Passwords(superuser="s" * 64, replication="r" * 64)


def config(**changes: Any) -> pm.MemberConfig:
    fields: dict[str, Any] = {
        "cluster": "pg", "name": "postgres-1", "state": Path("/var/lib/patroni"),
        "bin_dir": "/usr/lib/postgresql/15/bin",
    }  # fmt: skip
    return pm.MemberConfig(**(fields | changes))


def test_rendered_config_defaults() -> None:
    doc = pm.render_config(config(), SECRETS, "hook")
    assert doc["scope"] == "pg"
    assert doc["name"] == "postgres-1"
    assert doc["restapi"] == {"listen": "127.0.0.1:8008", "connect_address": "127.0.0.1:8008"}
    assert doc["etcd3"] == {"hosts": ["etcd:2379"], "use_proxies": True}
    dcs = doc["bootstrap"]["dcs"]
    assert (dcs["ttl"], dcs["loop_wait"], dcs["retry_timeout"]) == (20, 2, 5)
    assert dcs["synchronous_mode"] is True
    assert dcs["synchronous_mode_strict"] is False
    assert dcs["postgresql"]["use_pg_rewind"] is True
    assert doc["bootstrap"]["post_bootstrap"] == "hook"
    pg = doc["postgresql"]
    assert pg["listen"] == "127.0.0.1:5432"
    assert pg["connect_address"] == "postgres-master:5432"
    assert pg["data_dir"] == "/var/lib/patroni/pgdata"
    assert pg["pgpass"] == "/var/lib/patroni/pgpass"
    assert pg["bin_dir"] == "/usr/lib/postgresql/15/bin"
    assert pg["authentication"]["superuser"] == {"username": "postgres", "password": "s" * 64}
    assert pg["authentication"]["replication"] == {"username": "replicator", "password": "r" * 64}
    assert pg["parameters"][pm.MEMBER_SETTING] == "postgres-1"
    assert pg["pg_hba"] == [
        "host replication replicator 127.0.0.1/32 md5",
        "host demo demo 127.0.0.1/32 trust",
        "host all all 127.0.0.1/32 md5",
    ]


def test_rendered_config_options() -> None:
    cfg = config(etcd_hosts=("127.0.0.1:1", "127.0.0.1:2"), rest_port=9008, pg_port=6432,
                 connect_address="127.0.0.1:6432", rest_connect_address="10.0.0.5:9008",
                 ttl=30, loop_wait=5, retry_timeout=10)  # fmt: skip
    doc = pm.render_config(cfg, SECRETS, "hook")
    assert doc["etcd3"]["hosts"] == ["127.0.0.1:1", "127.0.0.1:2"]
    assert doc["restapi"] == {"listen": "127.0.0.1:9008", "connect_address": "10.0.0.5:9008"}
    assert doc["postgresql"]["listen"] == "127.0.0.1:6432"
    assert doc["postgresql"]["connect_address"] == "127.0.0.1:6432"
    dcs = doc["bootstrap"]["dcs"]
    assert (dcs["ttl"], dcs["loop_wait"], dcs["retry_timeout"]) == (30, 5, 10)


@pytest.mark.parametrize(
    ("timers", "field"),
    [
        ({"ttl": 19, "loop_wait": 1, "retry_timeout": 3}, "ttl"),
        ({"loop_wait": 0}, "loop_wait"),
        ({"retry_timeout": 2}, "retry_timeout"),
        ({"ttl": 20, "loop_wait": 3, "retry_timeout": 9}, "ttl"),
    ],
)
def test_timers_patroni_would_change_are_refused(timers: dict[str, int], field: str) -> None:
    with pytest.raises(InputError) as caught:
        config(**timers)
    assert caught.value.field == field


def test_a_cluster_and_a_member_name_are_needed() -> None:
    with pytest.raises(InputError, match="cluster name and a member name"):
        config(name="")


def test_passwords_never_show_in_repr() -> None:
    assert "s" * 64 not in repr(SECRETS)


@pytest.mark.parametrize(
    ("role", "tag"),
    [("master", "master"), ("primary", "master"), ("replica", "replica"),
     ("standby_leader", "replica"), ("sync_standby", "replica"), ("demoted", None),
     ("uninitialized", None), (None, None), (3, None)],
)  # fmt: skip
def test_role_tags(role: object, tag: str | None) -> None:
    assert pm.role_tag(role) == tag


@pytest.mark.parametrize(
    ("status", "state"),
    [
        ({"state": "running", "role": "primary"}, {"role": "master", "health": "passing"}),
        ({"state": "running", "role": "replica", "sync_standby": True},
         {"role": "replica", "health": "passing"}),
        ({"state": "starting", "role": "replica"}, {"role": None, "health": "critical"}),
        ({"state": "running", "role": "demoted"}, {"role": None, "health": "critical"}),
        ({"state": "running"}, {"role": None, "health": "critical"}),
        (None, {"role": None, "health": "critical"}),
        (["not", "a", "dict"], {"role": None, "health": "critical"}),
    ],
)  # fmt: skip
def test_backend_state(status: object, state: dict[str, Any]) -> None:
    assert pm.backend_state(status) == state


class FakeAgent:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def get_key(self, path: str, purpose: str = "") -> bytes:
        self.calls.append((path, purpose))
        return path.encode()


def test_passwords_come_from_distinct_paths_with_the_cluster_as_purpose() -> None:
    agent = FakeAgent()
    got = pm.derive_passwords(agent, "pg")  # type: ignore[arg-type]
    assert agent.calls == [(p, "pg") for p in pm.SECRET_PATHS.values()]
    assert got.superuser == b"patroni/superuser".hex()
    assert len({got.superuser, got.replication}) == 2
    assert "s" * 8 not in repr(SECRETS), "a repr never shows a password"


def test_watcher_posts_only_changes_and_retries_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    replies: list[Any] = [OSError("refused"), (200, {}), (200, {})]
    sent: list[dict[str, Any]] = []

    def fake_http(address: str, method: str, path: str, doc: Any = None) -> tuple[int, Any]:
        assert (address, method, path) == ("127.0.0.1:7001", "POST", "/v1/backends/postgres")
        sent.append(doc)
        reply = replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply

    monkeypatch.setattr(pm, "http_json", fake_http)
    watcher = pm.RoleWatcher("127.0.0.1:8008", "127.0.0.1:7001", "postgres")
    master = {"role": "master", "health": "passing"}
    assert watcher.post(master) is False  # the sidecar is not up yet
    assert watcher.post(master) is True
    assert watcher.post(master) is True  # no change: nothing sent
    assert watcher.post({"role": None, "health": "critical"}) is True
    assert sent == [master, master, {"role": None, "health": "critical"}]


def test_the_sidecar_api_is_the_platforms_url_or_host_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEEMESH_SIDECAR_API", "http://127.0.0.1:7001")  # as spec/render sets it
    assert pm.arguments([]).sidecar_api == "127.0.0.1:7001"
    assert pm.arguments(["--sidecar-api", "127.0.0.2:7002"]).sidecar_api == "127.0.0.2:7002"
    for bad in ("7001", "http://127.0.0.1", "127.0.0.1:port"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected HOST:PORT"):
            pm.sidecar_api(bad)


def test_bin_dir_prefers_postgresql_15_then_the_newest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pm.shutil, "which", lambda name: None)
    with pytest.raises(InputError, match="PostgreSQL is not installed"):
        pm.find_bin_dir(tmp_path)
    for version in ("9", "13", "15", "16", "x"):
        (tmp_path / version / "bin").mkdir(parents=True)
        (tmp_path / version / "bin" / "pg_ctl").touch()
    assert pm.find_bin_dir(tmp_path) == str(tmp_path / "15" / "bin")
    (tmp_path / "15" / "bin" / "pg_ctl").unlink()
    assert pm.find_bin_dir(tmp_path) == str(tmp_path / "16" / "bin")
