"""The Patroni demo (``examples/patroni-demo``) as a user runs it: HA PostgreSQL behind role
routes, written to from this machine through the gateway while members and coordinators fail.

The writes go through the public name of the web app (gateway, then the web app's sidecar, then
``postgres-master`` through the mesh), one new connection each, so every failure a client could
see is counted. After each fault every acknowledged write must be in the database exactly once:
Patroni's synchronous mode promotes only a standby that has every commit.

Needs root, Patroni and PostgreSQL 15 (scripts/test installs them); the cluster comes up once
for the module, the tests run in order on it, and it is always taken down.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from localkit import ROOT, store_peer_members, teemesh, wait_ready

from teemesh.examples.dbwriter import Record, Writer

pytestmark = pytest.mark.e2e
SPEC = ROOT / "examples" / "patroni-demo" / "cluster.yaml"
MEMBERS = ("postgres-0", "postgres-1", "postgres-2")
PATRONICTL = str(Path(sys.executable).parent / "patronictl")
ROWS = """
import json, psycopg
with psycopg.connect(host="postgres-master", port=5432, dbname="demo", user="demo",
                     connect_timeout=5) as conn:
    rows = conn.execute("SELECT id, writer FROM writes").fetchall()
print(json.dumps(rows))
"""


def waited(what: str, check: Callable[[], Any], timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while (got := check()) is None or got is False:
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.25)
    return got


class Demo:
    def __init__(self, state: Path) -> None:
        self.state = state
        launch = json.loads((state / "launch.json").read_text())
        self.url = launch["public"][0].rstrip("/")
        self.ca = str(state / "gateway-ca.pem")
        self.down: set[str] = set()

    def address(self, cvm: str) -> str:
        launch = json.loads((self.state / "launch.json").read_text())
        return str(next(c["address"] for c in launch["cvms"] if c["name"] == cvm))

    def writer(self) -> Writer:
        return Writer(self.url, self.ca)

    def leader(self) -> str | None:
        return self.writer().master()

    def patronictl(self, cvm: str, *args: str) -> str:
        config = self.state / "cvms" / cvm / "data" / "patroni" / "patroni.yml"
        result = teemesh("exec", cvm, "--state", self.state, "--", PATRONICTL, "-c", config,
                         *args, timeout=90)  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    def members(self) -> dict[str, dict[str, Any]]:
        """Patroni's view (``patronictl list``, run in a live member CVM) by member name."""
        alive = next(m for m in MEMBERS if m not in self.down)
        doc = json.loads(self.patronictl(alive, "list", "--format", "json"))
        return {m["Member"]: m for m in doc}

    def rows(self) -> list[tuple[int, str]]:
        """Every row of the demo table, read through postgres-master from a member's CVM."""
        alive = next(m for m in MEMBERS if m not in self.down)
        result = teemesh("exec", alive, "--state", self.state, "--", sys.executable, "-c", ROWS)
        assert result.returncode == 0, result.stderr
        return [(int(i), str(w)) for i, w in json.loads(result.stdout)]

    def fault(self, command: str, cvm: str) -> None:
        result = teemesh(command, cvm, "--state", self.state)
        assert result.returncode == 0, result.stderr
        if command in ("crash", "kill"):
            self.down.add(cvm)
        elif command == "restart":
            self.down.discard(cvm)


class Writing:
    """A writer running in a thread for the length of a ``with`` block."""

    def __init__(self, demo: Demo) -> None:
        self.writer = demo.writer()
        self.thread = threading.Thread(target=self.writer.run, args=(0.05, None), daemon=True)

    def __enter__(self) -> Writing:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.writer.stopping.set()
        self.thread.join(30)

    @property
    def record(self) -> Record:
        return self.writer.record

    def acknowledged_since(self, since: float, member: str | None = None) -> int:
        return sum(1 for w in list(self.record.writes) if w.status == 200 and w.sent > since
                   and (member is None or w.member == member))  # fmt: skip


def check_every_acknowledged_write_is_there_once(demo: Demo, record: Record) -> None:
    tags = Counter(writer.partition(" ")[2] for _, writer in demo.rows())
    ours = {tag: n for tag, n in tags.items() if tag.startswith(f"{record.run}-")}
    acknowledged = record.acknowledged()
    missing = [tag for tag in acknowledged if tag not in ours]
    assert not missing, f"{len(missing)} acknowledged writes lost: {missing[:5]}"
    twice = {tag: n for tag, n in ours.items() if n > 1}
    assert not twice, f"writes stored more than once: {twice}"
    # rows of writes that got no answer may be there (committed, answer lost): never twice


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    if os.geteuid() != 0:
        pytest.fail("the e2e tests make network namespaces: run them as root")
    if not Path(PATRONICTL).exists():
        pytest.fail("Patroni is not installed: pip install -e '.[patroni]' (scripts/test does)")
    state = tmp_path_factory.mktemp("pgdemo") / "state"
    try:
        result = teemesh("up", SPEC, "--state", state, "--timeout", "150", timeout=240)
        assert result.returncode == 0, result.stdout + result.stderr
        yield Demo(state)
    finally:
        teemesh("down", "--state", state)


def test_the_demo_writes_and_reads_through_the_gateway(demo: Demo) -> None:
    writer = demo.writer()
    status, written = writer.request("POST", "/db/write?tag=hello")
    assert status == 200, written
    status, doc = writer.request("GET", "/db/status")
    assert status == 200, doc
    assert doc["master"]["in_recovery"] is False
    assert doc["master"]["member"] == written["member"]
    assert doc["replica"]["in_recovery"] is True
    assert doc["replica"]["member"] in set(MEMBERS) - {written["member"]}

    def replica_has_it() -> bool:
        status, read = writer.request("GET", "/db/read")
        # An empty table on a replica that has not replayed the row yet reads as None.
        return status == 200 and (read["last_id"] or 0) >= written["id"]

    waited("the replica route reads the write", replica_has_it, timeout=10)

    def roles() -> list[str] | None:
        members = demo.members()
        got = sorted(m["Role"] for m in members.values())
        ok = sorted(members) == list(MEMBERS) and got == ["Leader", "Replica", "Sync Standby"]
        return got if ok else None

    waited("a leader, a synchronous standby and a replica", roles, timeout=30)


def test_the_dcs_peers_talk_only_to_coordinator_cvms(demo: Demo) -> None:
    """The DCS is served to its callers only through the mesh: its peer port on the bridge
    demands a member certificate from the DCS's store CA, which only the coordinator app
    derives (and etcd holds a peer to its certificate's addresses)."""
    peer = f"https://{demo.address('coordinator-1')}:2390"
    for cvm, certified in [("webdemo-0", False), ("postgres-0", False), ("webdemo-0", True)]:
        refused = store_peer_members(demo.state, cvm, peer, "dcs", certified=certified)
        assert refused.returncode != 0 and "coordinator-1" not in refused.stdout, refused.stdout
    allowed = store_peer_members(demo.state, "coordinator-0", peer, "dcs", certified=True)
    assert allowed.returncode == 0 and "coordinator-1" in allowed.stdout, allowed.stderr


def test_losing_a_coordinator_changes_nothing_for_the_clients(demo: Demo) -> None:
    with Writing(demo) as writing:
        waited("writes flow", lambda: writing.acknowledged_since(0) >= 20, timeout=30)
        crashed_at = time.time()
        demo.fault("crash", "coordinator-0")  # its catalog etcd member and its DCS member too
        waited("writes after the crash", lambda: writing.acknowledged_since(crashed_at + 8) >= 20)
    failed = [w for w in writing.record.writes if w.status != 200]
    assert not failed, f"{len(failed)} writes failed, the first: {failed[0]}"
    check_every_acknowledged_write_is_there_once(demo, writing.record)


def test_the_leader_crashes_a_replica_is_promoted_and_writes_resume(demo: Demo) -> None:
    # coordinator-0 is still down: the DCS and the catalog run on two members of three
    leader = waited("a leader", demo.leader)
    with Writing(demo) as writing:
        waited("writes flow", lambda: writing.acknowledged_since(0, leader) >= 20, timeout=30)
        crashed_at = time.time()
        demo.fault("crash", leader)
        new = waited("a new leader", lambda: (m := demo.leader()) != leader and m)
        waited("writes resume", lambda: writing.acknowledged_since(crashed_at, new) >= 20)
    assert new in MEMBERS and new != leader
    record = writing.record
    assert {w.member for w in record.writes if w.status == 200} == {leader, new}
    check_every_acknowledged_write_is_there_once(demo, record)
    members = demo.members()
    assert members[new]["Role"] == "Leader"


def test_crashed_cvms_come_back_and_rejoin(demo: Demo) -> None:
    for cvm in sorted(demo.down):
        demo.fault("restart", cvm)
    wait_ready(demo.state, timeout=120)

    def all_streaming() -> bool:
        members = demo.members()
        states = sorted(m["State"] for m in members.values())
        return len(members) == 3 and states == ["running", "streaming", "streaming"]

    waited("three members, two streaming", all_streaming)


def test_a_planned_switchover_moves_the_master_through_the_mesh(demo: Demo) -> None:
    leader = waited("a leader", demo.leader)
    candidate = next(m for m, doc in demo.members().items() if doc["Role"] == "Sync Standby")
    # run in the third member's CVM: patronictl reaches the DCS and the leader's REST API only
    # through mesh routes (etcd:2379, patroni-<n>:8008)
    elsewhere = next(m for m in MEMBERS if m not in (leader, candidate))
    with Writing(demo) as writing:
        waited("writes flow", lambda: writing.acknowledged_since(0, leader) >= 20, timeout=30)
        out = demo.patronictl(elsewhere, "switchover", "--leader", leader, "--candidate",
                              candidate, "--force")  # fmt: skip
        assert "Successfully switched over" in out, out
        moved_at = time.time()
        waited("writes on the new master", lambda: writing.acknowledged_since(moved_at, candidate)
               >= 20)  # fmt: skip
    assert demo.leader() == candidate
    check_every_acknowledged_write_is_there_once(demo, writing.record)
