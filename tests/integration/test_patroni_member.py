"""Three ``patroni_member`` processes on loopback, without a mesh: a real etcd, real guest agents
(one per member, the same app: same compose, same app keys), real Patroni and PostgreSQL 15, and
a recording HTTP server standing in for each member's sidecar API.

Each member's connect address is its own 127.0.0.1 port (in the mesh it is the route
postgres-master:5432). The failover test SIGKILLs the leader's Patroni and its postmaster (the
member wrapper survives to report the death) and times kill -> promotion -> role post.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import http.server
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import vector_path
from etcdkit import etcd_cluster, free_ports
from procs import free_port, started
from serverkit import Hello, serving

from teemesh.examples import patroni_member, starter, webdemo
from teemesh.platform.agent_client import AgentClient

pytestmark = [pytest.mark.integration, pytest.mark.patroni]

CLUSTER = "pgtest"
COMPOSE = b'{"manifest_version":2,"name":"pgtest-postgres","runner":"docker-compose"}\n'
FORM_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0


def require_patroni() -> str:
    """PostgreSQL's bin folder; a missing Patroni or PostgreSQL fails the test (never skips)."""
    if importlib.util.find_spec("patroni") is None:
        pytest.fail(
            "Patroni is not installed in the venv: pip install -e '.[patroni]' (scripts/test does)"
        )
    try:
        return patroni_member.find_bin_dir()
    except Exception as exc:
        pytest.fail(f"{exc} (Debian: apt-get install postgresql-15; scripts/test does)")


class Recorder(http.server.ThreadingHTTPServer):
    """A stand-in for one sidecar's local API: records every backend post with its time."""

    def __init__(self) -> None:
        self.posts: list[tuple[float, str, dict[str, Any]]] = []
        super().__init__(("127.0.0.1", 0), _RecordingHandler)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def last(self) -> dict[str, Any] | None:
        return self.posts[-1][2] if self.posts else None


class _RecordingHandler(Hello):
    server: Recorder

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.posts.append((time.monotonic(), self.path, body))
        self.answer(json.dumps({"ok": True}).encode())


@dataclass
class Member:
    name: str
    state: Path
    pg_port: int
    rest_port: int
    sidecar: Recorder
    process: subprocess.Popen[bytes]
    log: Path
    killed: bool = False

    def status(self) -> dict[str, Any] | None:
        try:
            return patroni_member.http_json(f"127.0.0.1:{self.rest_port}", "GET", "/patroni")[1]
        except (OSError, ValueError, http.client.HTTPException):
            return None

    def patroni_pid(self) -> int:
        """The wrapper's child: Patroni itself (unshare execs it)."""
        pid = self.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        assert len(children) == 1, children
        return int(children[0])

    def postmaster_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.state / "pgdata" / "postmaster.pid").read_text().split()[0])
        return None

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]


@dataclass
class Cluster:
    members: list[Member]
    agent: Path
    password: str

    def wait(self, what: str, check: Callable[[], Any], timeout: float = FORM_TIMEOUT) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (got := check()) is not None:
                return got
            time.sleep(0.1)
        logs = "\n".join(f"--- {m.name}:\n{m.output()}" for m in self.members)
        pytest.fail(f"{what}: not within {timeout} s\n{logs}")

    def formed(self) -> tuple[Member, list[Member]] | None:
        """(leader, replicas) once one leads, the others stream, and one is synchronous."""
        alive = [m for m in self.members if not m.killed]
        statuses = {m.name: m.status() or {} for m in alive}
        leaders = [m for m in alive if statuses[m.name].get("role") == "primary"]
        replicas = [m for m in alive if statuses[m.name].get("replication_state") == "streaming"]
        if len(leaders) != 1 or len(replicas) != len(alive) - 1:
            return None
        if not any(statuses[m.name].get("sync_standby") for m in replicas):
            return None
        if any(statuses[m.name].get("state") != "running" for m in alive):
            return None
        return leaders[0], replicas

    def connect(self, member: Member) -> psycopg.Connection[Any]:
        return psycopg.connect(host="127.0.0.1", port=member.pg_port, dbname="demo", user="demo",
                               autocommit=True, connect_timeout=5)  # fmt: skip


def _start_member(
    tmp: Path, name: str, etcd: str, agent: Path, bin_dir: str, sidecar: Recorder
) -> Member:
    pg_port, rest_port = free_ports(2)
    state, log = tmp / name, tmp / f"{name}.log"
    argv = [
        sys.executable, "-m", "teemesh.examples.patroni_member", "--state", str(state),
        "--etcd", etcd, "--pg-port", str(pg_port), "--rest-port", str(rest_port),
        "--connect-address", f"127.0.0.1:{pg_port}", "--sidecar-api", sidecar.address,
        "--agent", str(agent), "--bin-dir", bin_dir,
    ]  # fmt: skip
    env = {**os.environ, "TEEMESH_CLUSTER": CLUSTER, "TEEMESH_PEER_ID": name}
    with log.open("wb") as out:
        process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
    return Member(name, state, pg_port, rest_port, sidecar, process, log)


def _stop_member(member: Member) -> None:
    """SIGTERM to the wrapper (it forwards to Patroni, which stops PostgreSQL); SIGKILL after
    a while; then whatever postmaster is left, by its PID file."""
    if member.process.poll() is None:
        member.process.terminate()
        try:
            member.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(member.process.pid, signal.SIGKILL)
            member.process.wait()
    postmaster = member.postmaster_pid()
    if postmaster is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(os.getpgid(postmaster), signal.SIGKILL)
    shutil.rmtree(member.state, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    bin_dir = require_patroni()
    tmp = tmp_path_factory.mktemp("patroni")
    (tmp / "app-compose.json").write_bytes(COMPOSE)
    app_keys = vector_path("dstack/simulator/appkeys.json")
    with contextlib.ExitStack() as stack:
        etcd = stack.enter_context(etcd_cluster(tmp, 1))[0]
        members: list[Member] = []
        passwords = set()
        for n in range(3):
            sock = tmp / f"agent-{n}.sock"
            args = ["agent", "--socket", str(sock), "--state", str(tmp / f"agent-{n}"),
                    "--app-compose", str(tmp / "app-compose.json"), "--app-keys", str(app_keys)]  # fmt: skip
            stack.enter_context(started(args, tmp / f"agent-{n}.log", sock.exists))
            with AgentClient(str(sock)) as agent:
                passwords.add(patroni_member.derive_password(agent, "superuser", CLUSTER))
            sidecar = Recorder()
            stack.enter_context(serving(sidecar, poll=0.05))  # stops after the member, which posts
            member = _start_member(tmp, f"postgres-{n}", etcd.url.removeprefix("http://"), sock,
                                   bin_dir, sidecar)  # fmt: skip
            members.append(member)
            stack.callback(_stop_member, member)
        assert len(passwords) == 1, "one app, one set of keys: every member derives the same"
        yield Cluster(members, tmp / "agent-0.sock", passwords.pop())


def test_three_members_form_a_cluster_and_the_webdemo_uses_it(cluster: Cluster) -> None:
    started_at = time.monotonic()
    leader, replicas = cluster.wait("one leader, two streaming replicas", cluster.formed)
    formed_in = time.monotonic() - started_at
    print(f"cluster formed {formed_in:.1f} s after the fixture returned")

    # each member told its sidecar its role, once it was running
    def told() -> bool | None:
        ok = leader.sidecar.last() == {"role": "master", "health": "passing"} and all(
            r.sidecar.last() == {"role": "replica", "health": "passing"} for r in replicas
        )
        return ok or None

    cluster.wait("the role posts", told, timeout=5)
    for member in cluster.members:
        assert {path for _, path, _ in member.sidecar.posts} == {"/v1/backends/postgres"}
        secret = (member.state / "patroni.yml").stat()
        assert secret.st_mode & 0o777 == 0o600
        assert cluster.password not in member.output()

    async def scenario() -> dict[str, Any]:
        db = webdemo.Database(master=("127.0.0.1", leader.pg_port),
                              replica=("127.0.0.1", replicas[0].pg_port))  # fmt: skip
        server = await starter.start("127.0.0.1", 0, {}, lambda r: webdemo.WebDemo(r, db))
        port = server.sockets[0].getsockname()[1]

        async def call(method: str, path: str) -> tuple[int, Any]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            reply = await reader.read()
            writer.close()
            head, _, body = reply.partition(b"\r\n\r\n")
            return int(head.split()[1]), json.loads(body)

        try:
            writes = [await call("POST", "/db/write") for _ in range(3)]
            # an acknowledged write is on the sync standby at least; the replica read from may
            # be the other one, which catches up a moment later
            deadline = time.monotonic() + 5
            while (read := await call("GET", "/db/read"))[1].get("count") != 3:
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            return {"writes": writes, "read": read,
                    "status": await call("GET", "/db/status"),
                    "get write": await call("GET", "/db/write"),
                    "hello": await call("GET", "/hello")}  # fmt: skip
        finally:
            server.close()
            await server.wait_closed()

    got = asyncio.run(scenario())
    ids = [doc["id"] for status, doc in got["writes"] if status == 200]
    assert len(ids) == 3, got["writes"]
    assert got["read"] == (
        200,
        {"count": 3, "last_id": max(ids), "via": f"127.0.0.1:{replicas[0].pg_port}"},
    )
    status, doc = got["status"]
    assert status == 200
    assert doc["master"]["member"] == leader.name
    assert doc["master"]["in_recovery"] is False
    assert doc["master"]["server"] == f"127.0.0.1:{leader.pg_port}"
    assert doc["replica"]["member"] == replicas[0].name
    assert doc["replica"]["in_recovery"] is True
    assert got["get write"][0] == 405
    assert got["hello"][0] == 200


def test_webdemo_answers_503_when_postgres_is_down() -> None:
    async def scenario() -> list[tuple[int, Any]]:
        closed = ("127.0.0.1", free_port())
        app = webdemo.WebDemo({}, webdemo.Database(closed, closed))
        return [
            await app.handle_method("POST", "/db/write"),
            await app.handle_method("GET", "/db/read"),
            await app.handle_method("GET", "/db/status"),
        ]

    write, read, status = asyncio.run(scenario())
    for code, doc in (write, read, status):
        assert code == 503, doc
    assert write[1]["error"].startswith("127.0.0.1:")
    assert read[1]["error"].startswith("127.0.0.1:")
    assert set(status[1]) == {"master", "replica"}


def test_failover_promotes_the_sync_standby_and_the_route_follows(cluster: Cluster) -> None:
    leader, replicas = cluster.wait("one leader, two streaming replicas", cluster.formed)
    with cluster.connect(leader) as conn:
        acknowledged = [conn.execute("INSERT INTO writes (writer) VALUES ('test') RETURNING id")
                        .fetchone()[0] for _ in range(20)]  # fmt: skip

    killed_at = time.monotonic()
    os.kill(leader.patroni_pid(), signal.SIGKILL)
    postmaster = leader.postmaster_pid()
    assert postmaster is not None
    os.killpg(os.getpgid(postmaster), signal.SIGKILL)  # Patroni starts it in a session of its own
    leader.killed = True

    def promoted() -> tuple[Member, float] | None:
        for member in replicas:
            status = member.status() or {}
            if status.get("role") == "primary" and status.get("state") == "running":
                return member, time.monotonic()
        return None

    ttl = patroni_member.MemberConfig.ttl
    new_leader, promoted_at = cluster.wait("a replica promoted", promoted, timeout=ttl + 25)

    def posted_master() -> float | None:
        for at, _, body in new_leader.sidecar.posts:
            if body == {"role": "master", "health": "passing"}:
                return at
        return None

    posted_at = cluster.wait("the new leader's master post", posted_master, timeout=5)
    print(f"kill -> promotion seen {promoted_at - killed_at:.2f} s; "
          f"promotion seen -> master post {posted_at - promoted_at:+.2f} s")  # fmt: skip
    assert posted_at - promoted_at < 1.0

    # the old leader's wrapper saw Patroni die, withdrew the backend, and exited with its status
    assert leader.process.wait(10) == 128 + signal.SIGKILL
    assert leader.sidecar.last() == {"role": None, "health": "critical"}

    with cluster.connect(new_leader) as conn:
        rows = {r[0] for r in conn.execute("SELECT id FROM writes").fetchall()}
        assert set(acknowledged) <= rows, "an acknowledged write was lost in the failover"
        conn.execute("INSERT INTO writes (writer) VALUES ('after failover')")

    other = next(m for m in replicas if m is not new_leader)
    cluster.wait("the other replica streaming from the new leader", cluster.formed, timeout=30)
    assert other.sidecar.last() == {"role": "replica", "health": "passing"}
