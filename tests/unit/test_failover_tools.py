"""What watches and survives a failover: dbwriter's record of writes, patroni_member's wait for
its DCS and data folder, webdemo's write tags, and ``vmm.stop(hard=True)`` (a power cut)."""

from __future__ import annotations

import asyncio
import http.client
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from teemesh.examples import patroni_member as pm
from teemesh.examples import webdemo
from teemesh.examples.dbwriter import Record, Write, Writer
from teemesh.platform import vmm

# -- dbwriter.Record -----------------------------------------------------------------------------


def ok(n: int, sent: float, member: str = "pg-0") -> Write:
    return Write(f"r-{n}", sent, sent + 0.1, 200, id=100 + n, member=member)


def failed(n: int, sent: float, status: int | None = None) -> Write:
    return Write(f"r-{n}", sent, sent + 0.5, status, error="refused")


def test_a_run_without_writes_sums_to_nothing() -> None:
    record = Record("https://x.localhost/", "r")
    assert record.acknowledged() == {}
    assert record.outages() == []
    assert record.summary() == {
        "url": "https://x.localhost/",
        "run": "r",
        "writes": 0,
        "acknowledged": 0,
        "failed": 0,
        "members": [],
        "longest_outage": 0.0,
    }


def test_acknowledged_are_the_writes_answered_200_with_an_id() -> None:
    writes = [
        ok(0, 10.0),
        failed(1, 11.0),
        Write("r-2", 12.0, 12.1, 503, error="down"),
        Write("r-3", 13.0, 13.1, 200),  # 200 but no id: not acknowledged
        ok(4, 14.0, member="pg-1"),
    ]
    record = Record("u", "r", writes)
    assert record.acknowledged() == {"r-0": 100, "r-4": 104}


def test_an_outage_runs_from_the_first_failure_sent_to_the_next_success_answered() -> None:
    writes = [
        ok(0, 10.0),
        failed(1, 11.0),
        failed(2, 12.0, status=503),
        ok(3, 13.0, member="pg-1"),
        ok(4, 14.0, member="pg-1"),
        failed(5, 15.0),
        ok(6, 17.0, member="pg-2"),
    ]
    record = Record("u", "r", writes)
    assert record.outages() == [(11.0, 13.1), (15.0, 17.1)]
    summary = record.summary()
    assert summary["writes"] == 7
    assert summary["acknowledged"] == 4
    assert summary["failed"] == 3
    assert summary["members"] == ["pg-0", "pg-1", "pg-2"]
    assert summary["longest_outage"] == 2.1


def test_an_outage_still_open_ends_with_the_last_write() -> None:
    record = Record("u", "r", [ok(0, 10.0), failed(1, 11.0), failed(2, 12.0)])
    assert record.outages() == [(11.0, 12.5)]
    assert record.summary()["longest_outage"] == 1.5
    assert record.summary()["failed"] == 2
    assert Record("u", "r", [failed(0, 5.0)]).outages() == [(5.0, 5.5)]


def test_the_json_record_lists_every_write() -> None:
    record = Record("u", "r", [ok(0, 10.0), failed(1, 11.0)])
    doc = record.to_json()
    assert doc["writes"] == 2
    assert [w["tag"] for w in doc["records"]] == ["r-0", "r-1"]
    assert doc["records"][1] == {
        "tag": "r-1", "sent": 11.0, "done": 11.5, "status": None, "id": None, "member": None,
        "error": "refused",
    }  # fmt: skip


# -- dbwriter.Writer -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["http://app.teemesh.localhost:8445/", "app.teemesh.localhost", "https:///db", "ftp://x"]
)
def test_the_writer_wants_an_https_url(url: str) -> None:
    with pytest.raises(ValueError, match="is not an https:// URL"):
        Writer(url, None)


def test_localhost_names_are_dialled_on_loopback_and_kept_for_tls() -> None:
    writer = Writer("https://abc-8080.teemesh.localhost:8445", None, run="run1")
    assert (writer.host, writer.port, writer.dial) == (
        "abc-8080.teemesh.localhost",
        8445,
        "127.0.0.1",
    )
    assert writer.base == ""
    assert writer.record.run == "run1"
    assert writer.record.url == "https://abc-8080.teemesh.localhost:8445"


def test_other_names_are_dialled_as_they_are() -> None:
    writer = Writer("https://app.example.com/base/", None)
    assert (writer.host, writer.port, writer.dial) == ("app.example.com", 443, "app.example.com")
    assert writer.base == "/base"
    assert len(writer.record.run) == 8  # a random run id when none is given
    assert Writer("https://localhost:8445", None).dial == "localhost"


def test_a_write_that_gets_no_answer_is_recorded_as_such(monkeypatch: pytest.MonkeyPatch) -> None:
    writer = Writer("https://a.localhost", None, run="r")

    def refused(method: str, path: str) -> tuple[int, Any]:
        assert (method, path) == ("POST", "/db/write?tag=r-7")
        raise ConnectionRefusedError("refused")

    monkeypatch.setattr(writer, "request", refused)
    got = writer.write_once(7)
    assert (got.tag, got.status, got.id) == ("r-7", None, None)
    assert got.error == "ConnectionRefusedError: refused"
    monkeypatch.setattr(writer, "request", lambda m, p: (200, {"id": "12", "member": "pg-2"}))
    got = writer.write_once(8)
    assert (got.tag, got.status, got.id, got.member) == ("r-8", 200, 12, "pg-2")
    monkeypatch.setattr(writer, "request", lambda m, p: (503, {"error": "no master"}))
    assert writer.write_once(9).error == "no master"


# -- patroni_member: its data folder and its wait for the DCS ------------------------------------


def test_the_state_defaults_to_the_platforms_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEEMESH_DATA_DIR", "/data/cvm")
    assert pm.arguments([]).state == Path("/data/cvm/patroni")
    assert pm.arguments(["--state", "/x"]).state == Path("/x")


def test_the_state_defaults_to_var_lib_without_a_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEEMESH_DATA_DIR", raising=False)
    assert pm.arguments([]).state == Path("/var/lib/patroni")
    monkeypatch.setenv("TEEMESH_DATA_DIR", "")
    assert pm.arguments([]).state == Path("/var/lib/patroni")


class Answers:
    """http_json that answers from a list: an exception is raised, a status is returned."""

    def __init__(self, *answers: int | Exception) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, str, str]] = []

    def __call__(self, address: str, method: str, path: str, doc: Any = None) -> tuple[int, Any]:
        self.calls.append((address, method, path))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer, {}


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    return slept


def test_wait_for_dcs_returns_once_etcd_answers(
    monkeypatch: pytest.MonkeyPatch, sleeps: list[float], capsys: pytest.CaptureFixture[str]
) -> None:
    answers = Answers(ConnectionRefusedError("refused"), ConnectionRefusedError("refused"), 200)
    monkeypatch.setattr(pm, "http_json", answers)
    pm.wait_for_dcs(("etcd:2379",))
    assert answers.calls == [("etcd:2379", "GET", "/version")] * 3
    assert answers.answers == []
    assert sleeps == [pm.POLL_INTERVAL] * 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["patroni_member: waiting for the DCS (etcd:2379: refused)"]


def test_wait_for_dcs_says_each_new_problem(
    monkeypatch: pytest.MonkeyPatch, sleeps: list[float], capsys: pytest.CaptureFixture[str]
) -> None:
    answers = Answers(
        ConnectionRefusedError("refused"), 503, 503, http.client.BadStatusLine("x"), 200
    )
    monkeypatch.setattr(pm, "http_json", answers)
    pm.wait_for_dcs(("etcd:2379",))
    assert len(sleeps) == 4
    assert capsys.readouterr().err.splitlines() == [
        "patroni_member: waiting for the DCS (etcd:2379: refused)",
        "patroni_member: waiting for the DCS (etcd:2379: HTTP 503)",
        "patroni_member: waiting for the DCS (etcd:2379: x)",
    ]


def test_wait_for_dcs_tries_every_host_before_sleeping(
    monkeypatch: pytest.MonkeyPatch, sleeps: list[float], capsys: pytest.CaptureFixture[str]
) -> None:
    answers = Answers(OSError("down"), 200)
    monkeypatch.setattr(pm, "http_json", answers)
    pm.wait_for_dcs(("a:1", "b:2"))
    assert [c[0] for c in answers.calls] == ["a:1", "b:2"]
    assert sleeps == []
    assert capsys.readouterr().err == ""


# -- webdemo: write tags ---------------------------------------------------------------------------


class NoDatabase(webdemo.WebDemo):
    def __init__(self) -> None:
        super().__init__({}, webdemo.Database(("127.0.0.1", 1), ("127.0.0.1", 1)))
        self.queries: list[tuple[Any, ...]] = []

    async def query(
        self, where: tuple[str, int], sql: str, args: tuple[Any, ...] = ()
    ) -> list[tuple[Any, ...]]:
        self.queries.append((where, sql, args))
        return [(41, "pg-1")]


@pytest.mark.parametrize(
    "query",
    ["x" * 65, "bell%07", "new%0Aline", "tab%09", "%00", "ok&tag=" + "x" * 70],
)
def test_a_bad_tag_is_refused_before_the_database(query: str) -> None:
    app = NoDatabase()
    status, doc = asyncio.run(app.handle_method("POST", "/db/write?tag=" + query))
    assert status == 400
    assert doc == {"error": "tag: at most 64 printable characters"}
    assert app.queries == []


def test_the_last_tag_given_counts() -> None:
    app = NoDatabase()
    status, _ = asyncio.run(app.handle_method("POST", "/db/write?tag=" + "x" * 70 + "&tag=ok"))
    assert status == 200
    assert app.queries[0][2][0].endswith(" ok")


def test_a_tag_is_stored_with_the_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEEMESH_PEER_ID", "web-0")
    app = NoDatabase()
    status, doc = asyncio.run(app.handle_method("POST", "/db/write?tag=" + "x" * 64))
    assert status == 200
    assert doc == {"id": 41, "member": "pg-1", "via": "127.0.0.1:1"}
    ((where, sql, args),) = app.queries
    assert where == ("127.0.0.1", 1)
    assert args == ("web-0 " + "x" * 64, pm.MEMBER_SETTING)
    assert sql == webdemo.INSERT_SQL
    asyncio.run(app.handle_method("POST", "/db/write"))
    assert app.queries[1][2] == ("web-0", pm.MEMBER_SETTING)


def test_write_takes_post_only() -> None:
    app = NoDatabase()
    status, doc = asyncio.run(app.handle_method("GET", "/db/write?tag=a"))
    assert (status, doc) == (405, {"error": "/db/write takes POST"})
    assert app.queries == []


# -- vmm.stop(hard=True) ---------------------------------------------------------------------------


class Signals:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, live: list[list[int]]) -> None:
        self.sent: list[tuple[str, int, int]] = []
        self.live = live
        monkeypatch.setattr(vmm, "signal_group", self.group)
        monkeypatch.setattr(vmm, "signal_process", self.process)
        monkeypatch.setattr(vmm, "live_pids", self.pids)
        monkeypatch.setattr(time, "sleep", lambda _s: None)

    def group(self, leader: vmm.Handle, signum: int) -> bool:
        self.sent.append(("group", leader.pid, signum))
        return True

    def process(self, handle: vmm.Handle, signum: int) -> bool:
        self.sent.append(("process", handle.pid, signum))
        return True

    def pids(self, groups: Any, singles: Any = ()) -> list[int]:
        return self.live.pop(0) if len(self.live) > 1 else self.live[0]


def test_a_hard_stop_sends_only_sigkill(monkeypatch: pytest.MonkeyPatch) -> None:
    signals = Signals(monkeypatch, [[]])
    left = vmm.stop([vmm.Handle(10, 1)], [vmm.Handle(20, 2)], grace=5.0, hard=True)
    assert left == []
    assert signals.sent == [("group", 10, signal.SIGKILL), ("process", 20, signal.SIGKILL)]


def test_a_hard_stop_reports_what_survived(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vmm, "KILL_WAIT", 0.0)
    signals = Signals(monkeypatch, [[11]])
    assert vmm.stop([vmm.Handle(10, 1)], hard=True) == [11]
    assert [s[2] for s in signals.sent] == [signal.SIGKILL]


def test_a_soft_stop_asks_first_and_kills_only_what_is_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    signals = Signals(monkeypatch, [[]])
    assert vmm.stop([vmm.Handle(10, 1)], [vmm.Handle(20, 2)], grace=5.0) == []
    assert signals.sent == [
        ("group", 10, signal.SIGTERM), ("process", 20, signal.SIGTERM),
        ("group", 10, signal.SIGCONT), ("process", 20, signal.SIGCONT),
    ]  # fmt: skip
    monkeypatch.setattr(vmm, "KILL_WAIT", 0.0)
    stubborn = Signals(monkeypatch, [[10]])
    assert vmm.stop([vmm.Handle(10, 1)], grace=0.0) == [10]
    assert [s[2] for s in stubborn.sent] == [signal.SIGTERM, signal.SIGCONT, signal.SIGKILL]


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ({"master": {"member": "postgres-2", "in_recovery": False}}, "postgres-2"),
        ({"master": {"error": "no reachable instance"}}, None),
        ({"master": "postgres-2"}, None),
        (None, None),
        (OSError("refused"), None),
        (http.client.RemoteDisconnected("closed"), None),
    ],
)
def test_writer_master_is_the_member_or_none(
    monkeypatch: pytest.MonkeyPatch, answer: Any, expected: str | None
) -> None:
    writer = Writer("https://app-8080.teemesh.localhost:8445", None)

    def status() -> Any:
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(writer, "status", status)
    assert writer.master() == expected
