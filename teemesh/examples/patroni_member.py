"""One member of a Patroni cluster (PostgreSQL 15, etcd3 as DCS), as a mesh workload runs it.

``python -m teemesh.examples.patroni_member --state /var/lib/patroni`` does, in order:

1. derives the superuser and replication passwords inside the TEE (guest agent ``GetKey``,
   one path each, purpose = cluster name): every replica of the group is the same app, so all
   derive the same bytes and nothing secret is in the spec, argv or logs;
2. writes ``STATE/patroni.yml`` (0600) and runs Patroni on it as a child;
3. watches Patroni's REST API and tells the sidecar this member's role (``master``/``replica``)
   and health, so the ``postgres-master`` route follows a promotion within a second.

Timers: Patroni refuses a ``ttl`` below 20 s and wants ``loop_wait + 2 * retry_timeout <= ttl``;
the defaults (20/2/5) are the fastest it accepts with some slack for a slow DCS. A crashed leader
is replaced once its leader key expires: at most ``ttl`` seconds. ``synchronous_mode`` is on, so
a commit is acknowledged only once a standby has it and only that standby may be promoted:
acknowledged writes survive a failover. ``synchronous_mode_strict`` is off, so a lone survivor
still takes writes (availability over durability when two of three members are gone).

PostgreSQL refuses to run as root. Started as root, Patroni runs as the ``postgres`` OS user:
``--run-as userns`` (the default when root and user namespaces work) maps that user onto root in
a user namespace, so Patroni keeps reaching this interpreter and the agent's socket and nothing
needs a chown; ``--run-as postgres`` switches user and chowns the state folder instead (Python and
teemesh must then be readable by that user).

When Patroni exits, the backend is reported critical with no role before this process exits with
Patroni's status: a postmaster Patroni left behind is then unreachable through the mesh.

The app user (``demo``) has no password: other apps cannot derive this app's keys, so a shared
password would have to travel to them somehow, and the mesh already says who they are. Every
connection the mesh delivers comes from loopback, after the serving sidecar has checked the
caller's attested group against the route's ``callers``; pg_hba trusts the app user there and
asks every other user (the superuser, the replication user) for its derived password. The
post_bootstrap hook creates the app user, its database and the demo table on the member that ran
initdb.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from teemesh.checks import split_host_port
from teemesh.errors import InputError, MeshError
from teemesh.fsutil import write_private
from teemesh.platform.agent_client import AgentClient

SECRET_PATHS = {
    "superuser": "patroni/superuser",
    "replication": "patroni/replication",
}
"""GetKey paths of the cluster's passwords; the purpose is the cluster name."""
ROLE_TAGS = {
    "master": "master",
    "primary": "master",
    "replica": "replica",
    "standby_leader": "replica",
    "sync_standby": "replica",
}
"""Patroni's ``role`` -> the sidecar's role tag, as the anchor's role watcher maps them."""
DEBIAN_PG, PG_MAJOR = Path("/usr/lib/postgresql"), 15
MEMBER_SETTING = "teemesh.member"
"""A custom PostgreSQL setting holding the member name."""
POLL_INTERVAL = 0.5
HTTP_TIMEOUT = 1.0
MIN_TTL, MIN_LOOP_WAIT, MIN_RETRY_TIMEOUT = 20, 1, 3
"""The smallest timers Patroni accepts (patroni/config.py raises smaller ones to these)."""


@dataclass(frozen=True)
class MemberConfig:
    """Everything patroni.yml depends on, except the passwords."""

    cluster: str
    name: str
    state: Path
    bin_dir: str
    etcd_hosts: tuple[str, ...] = ("etcd:2379",)
    rest_port: int = 8008
    rest_connect_address: str | None = None
    pg_port: int = 5432
    connect_address: str = "postgres-master:5432"
    ttl: int = 20
    loop_wait: int = 2
    retry_timeout: int = 5
    app_user: str = "demo"
    app_database: str = "demo"

    def __post_init__(self) -> None:
        for name, low in (("ttl", MIN_TTL), ("loop_wait", MIN_LOOP_WAIT),
                          ("retry_timeout", MIN_RETRY_TIMEOUT)):  # fmt: skip
            if getattr(self, name) < low:
                raise InputError(f"Patroni's minimum is {low}", field=name)
        if self.loop_wait + 2 * self.retry_timeout > self.ttl:
            raise InputError("Patroni needs loop_wait + 2 * retry_timeout <= ttl", field="ttl")
        if not self.cluster or not self.name:
            raise InputError("a cluster name and a member name are needed", field="cluster")
        if not self.etcd_hosts:
            raise InputError("Patroni needs at least one etcd host", field="etcd")


@dataclass(frozen=True)
class Passwords:
    """The cluster's passwords (hex of GetKey bytes); ``repr`` never shows them."""

    superuser: str = field(repr=False)
    replication: str = field(repr=False)


def derive_password(agent: AgentClient, name: str, cluster: str) -> str:
    """The ``name`` password (superuser, replication) of ``cluster``: the same in every
    replica of the app, because GetKey is rooted in the app id."""
    return agent.get_key(SECRET_PATHS[name], cluster).hex()


def derive_passwords(agent: AgentClient, cluster: str) -> Passwords:
    return Passwords(**{name: derive_password(agent, name, cluster) for name in SECRET_PATHS})


def render_config(cfg: MemberConfig, secrets: Passwords, post_bootstrap: str) -> dict[str, Any]:
    """patroni.yml as a document; ``post_bootstrap`` is the command that creates the app user."""
    rest = f"127.0.0.1:{cfg.rest_port}"
    loopback = "127.0.0.1/32"
    return {
        "scope": cfg.cluster,
        "name": cfg.name,
        "log": {"level": "INFO"},
        "restapi": {"listen": rest, "connect_address": cfg.rest_connect_address or rest},
        # mesh routes, not members: no discovery of the members' own (unreachable) addresses
        "etcd3": {"hosts": list(cfg.etcd_hosts), "use_proxies": True},
        "bootstrap": {
            "dcs": {
                "ttl": cfg.ttl,
                "loop_wait": cfg.loop_wait,
                "retry_timeout": cfg.retry_timeout,
                "maximum_lag_on_failover": 1048576,
                "synchronous_mode": True,
                "synchronous_mode_strict": False,
                "postgresql": {
                    "use_pg_rewind": True,
                    "use_slots": True,
                    "parameters": {
                        "max_connections": 100,
                        "max_wal_senders": 10,
                        "wal_keep_size": "256MB",
                        "hot_standby": "on",
                        "wal_log_hints": "on",
                    },
                },
            },
            "initdb": [{"encoding": "UTF8"}, "data-checksums"],
            "post_bootstrap": post_bootstrap,
        },
        "postgresql": {
            "listen": f"127.0.0.1:{cfg.pg_port}",
            "connect_address": cfg.connect_address,
            "data_dir": str(cfg.state / "pgdata"),
            "bin_dir": cfg.bin_dir,
            "pgpass": str(cfg.state / "pgpass"),
            # a new replica copies the leader at once, not after a spread checkpoint (minutes)
            "basebackup": [{"checkpoint": "fast"}],
            "authentication": {
                "superuser": {"username": "postgres", "password": secrets.superuser},
                "replication": {"username": "replicator", "password": secrets.replication},
            },
            "parameters": {
                # the member name, so a client can tell which member answered (Patroni
                # forces cluster_name to the scope): current_setting('teemesh.member')
                MEMBER_SETTING: cfg.name,
                # our own folder: Debian's /var/run/postgresql is not ours in a user namespace
                "unix_socket_directories": str(cfg.state),
            },
            "pg_hba": [
                f"host replication replicator {loopback} md5",
                # the mesh authenticated the caller (see the module's docstring)
                f"host {cfg.app_database} {cfg.app_user} {loopback} trust",
                f"host all all {loopback} md5",
            ],
        },
        "tags": {
            "nofailover": False,
            "noloadbalance": False,
            "clonefrom": False,
            "nosync": False,
        },
    }


def role_tag(role: object) -> str | None:
    return ROLE_TAGS.get(role) if isinstance(role, str) else None


def backend_state(status: object) -> dict[str, Any]:
    """What to tell the sidecar, given Patroni's ``GET /patroni`` document (None: no answer).

    A member that is not running, or whose role we cannot map, loses its role tag as well as
    its health: no route may pick it by role while it is in doubt.
    """
    doc = status if isinstance(status, dict) else {}
    role = role_tag(doc.get("role"))
    running = doc.get("state") == "running" and role is not None
    return {"role": role if running else None, "health": "passing" if running else "critical"}


def find_bin_dir(root: Path = DEBIAN_PG) -> str:
    """Debian's PostgreSQL 15, else the newest Debian PostgreSQL, else ``pg_ctl`` on PATH."""
    versions = sorted(
        (int(p.parts[-3]), str(p.parent))
        for p in root.glob("*/bin/pg_ctl")
        if p.parts[-3].isdigit()
    )
    found = [d for v, d in versions if v == PG_MAJOR] + [d for _, d in reversed(versions)]
    if pg_ctl := shutil.which("pg_ctl"):
        found.append(str(Path(pg_ctl).parent))
    if not found:
        raise InputError("PostgreSQL is not installed (Debian: postgresql-15)", field="bin_dir")
    return found[0]


# -- I/O edge -------------------------------------------------------------------------------------


def http_json(address: str, method: str, path: str, doc: Any = None) -> tuple[int, Any]:
    """One request to ``HOST:PORT`` (no proxies: everything here is on loopback)."""
    conn = http.client.HTTPConnection(*split_host_port(address), timeout=HTTP_TIMEOUT)
    try:
        body = None if doc is None else json.dumps(doc).encode()
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        reply = conn.getresponse()
        raw = reply.read()
        return reply.status, json.loads(raw) if raw.strip() else None
    finally:
        conn.close()


class RoleWatcher:
    """Polls Patroni, posts this backend's role and health to the sidecar when they change."""

    def __init__(self, rest: str, sidecar: str, backend: str) -> None:
        self.rest, self.sidecar, self.path = rest, sidecar, f"/v1/backends/{backend}"
        self.posted: dict[str, Any] | None = None
        self.failing: str | None = None
        self.stopping = threading.Event()

    def step(self) -> None:
        try:
            _, status = http_json(self.rest, "GET", "/patroni")
        except (OSError, ValueError, http.client.HTTPException):
            status = None
        self.post(backend_state(status))

    def post(self, state: dict[str, Any]) -> bool:
        """Tell the sidecar ``state`` unless it already knows; False to try again later."""
        if state == self.posted:
            return True
        try:
            code, reply = http_json(self.sidecar, "POST", self.path, state)
            problem = None if code == 200 else f"sidecar refused {state}: HTTP {code} {reply}"
        except (OSError, ValueError, http.client.HTTPException) as exc:
            problem = f"sidecar {self.sidecar} unreachable ({exc})"
        if problem is not None:
            if problem != self.failing:  # once per kind of failure, not every half second
                log(f"{problem}; retrying every {POLL_INTERVAL} s")
            self.failing = problem
            return False
        log(f"told the sidecar: {state}")
        self.posted, self.failing = state, None
        return True

    def run(self) -> None:
        while not self.stopping.is_set():
            self.step()
            self.stopping.wait(POLL_INTERVAL)


def wait_for_dcs(hosts: tuple[str, ...]) -> None:
    """Return once an etcd host answers ``GET /version``. Patroni exits when it cannot reach its
    DCS at start, and the mesh route to it comes up with the sidecar, after this process starts."""
    said = None
    while True:
        for host in hosts:
            try:
                code, _ = http_json(host, "GET", "/version")
            except (OSError, ValueError, http.client.HTTPException) as exc:
                problem = f"{host}: {exc}"
            else:
                if code == 200:
                    return
                problem = f"{host}: HTTP {code}"
        if problem != said:
            log(f"waiting for the DCS ({problem})")
            said = problem
        time.sleep(POLL_INTERVAL)


def log(message: str) -> None:
    print(f"patroni_member: {message}", file=sys.stderr, flush=True)


def userns(user: pwd.struct_passwd) -> list[str]:
    """``unshare`` mapping ``user`` onto root in a new user namespace; the command follows."""
    return ["unshare", "--user", f"--map-user={user.pw_uid}", f"--map-group={user.pw_gid}"]


def runner(mode: str) -> str:
    """``self`` when not root; as root, ``userns`` when user namespaces work, else ``postgres``."""
    if mode != "auto":
        return mode
    if os.geteuid() != 0:
        return "self"
    probe = [*userns(pwd.getpwnam("postgres")), "true"]
    try:
        ok = subprocess.run(probe, capture_output=True, timeout=10, check=False).returncode == 0
    except OSError:
        ok = False
    return "userns" if ok else "postgres"


def start_patroni(config: Path, run_as: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "patroni", str(config)]
    if run_as == "self":
        return subprocess.Popen(argv)
    user = pwd.getpwnam("postgres")
    if run_as == "userns":
        return subprocess.Popen([*userns(user), "--", *argv])
    for folder, _, files in os.walk(config.parent):
        for name in (folder, *(os.path.join(folder, f) for f in files)):
            os.chown(name, user.pw_uid, user.pw_gid)
    env = {**os.environ, "HOME": user.pw_dir, "USER": "postgres"}
    return subprocess.Popen(argv, user=user.pw_uid, group=user.pw_gid, extra_groups=[], env=env)


def post_bootstrap(argv: list[str]) -> int:
    """Patroni's post_bootstrap hook (STATE, then Patroni's connection string): creates the app
    user, its database and the demo table, once, on the member that ran initdb."""
    import psycopg  # noqa: PLC0415  (only this hook needs it; Patroni brings it)
    from psycopg import sql  # noqa: PLC0415

    state, dsn = Path(argv[0]), argv[1]
    app = json.loads((state / "app.json").read_text())
    user, database = sql.Identifier(app["user"]), sql.Identifier(app["database"])
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(user))
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(database, user))
    with psycopg.connect(dsn, dbname=app["database"], autocommit=True) as conn:
        conn.execute(sql.SQL(
            "CREATE TABLE writes (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now(),"
            " writer text NOT NULL); ALTER TABLE writes OWNER TO {}").format(user))  # fmt: skip
    return 0


def sidecar_api(text: str) -> str:
    """``HOST:PORT``, or the ``http://HOST:PORT`` URL the platform sets TEEMESH_SIDECAR_API to."""
    address = text.removeprefix("http://").rstrip("/")
    try:
        split_host_port(address)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return address


def arguments(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m teemesh.examples.patroni_member")
    data = env("TEEMESH_DATA_DIR")
    p.add_argument(
        "--state",
        type=Path,
        default=Path(data) / "patroni" if data else Path("/var/lib/patroni"),
        help="folder for patroni.yml, pgpass and the data directory "
        "(default: TEEMESH_DATA_DIR/patroni, else /var/lib/patroni)",
    )
    p.add_argument(
        "--cluster", default=env("TEEMESH_CLUSTER"), help="Patroni scope (TEEMESH_CLUSTER)"
    )
    p.add_argument("--name", default=env("TEEMESH_PEER_ID"), help="member name (TEEMESH_PEER_ID)")
    p.add_argument("--etcd", action="append", help="etcd HOST:PORT (repeatable; default etcd:2379)")
    p.add_argument("--rest-port", type=int, default=MemberConfig.rest_port)
    p.add_argument("--rest-connect-address", help="how other members reach our REST API")
    p.add_argument("--pg-port", type=int, default=MemberConfig.pg_port)
    p.add_argument(
        "--connect-address",
        default=MemberConfig.connect_address,
        help="how replicas reach the leader (default: the mesh route postgres-master:5432)",
    )
    p.add_argument("--ttl", type=int, default=MemberConfig.ttl)
    p.add_argument("--loop-wait", type=int, default=MemberConfig.loop_wait)
    p.add_argument("--retry-timeout", type=int, default=MemberConfig.retry_timeout)
    p.add_argument("--bin-dir", help="PostgreSQL binaries (default: Debian's PostgreSQL 15)")
    p.add_argument(
        "--sidecar-api",
        type=sidecar_api,
        default=env("TEEMESH_SIDECAR_API", "127.0.0.1:7001"),
        help="the sidecar's local API, HOST:PORT or http://HOST:PORT (TEEMESH_SIDECAR_API)",
    )
    p.add_argument("--backend", default="postgres", help="our backend's name in the spec")
    p.add_argument("--agent", help="guest agent endpoint (default: DSTACK_SIMULATOR_ENDPOINT)")
    p.add_argument("--run-as", choices=("auto", "self", "userns", "postgres"), default="auto")
    return p.parse_args(argv)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["post-bootstrap"]:
        return post_bootstrap(argv[1:])
    args = arguments(argv)
    try:
        cfg = MemberConfig(
            cluster=args.cluster or "", name=args.name or "", state=args.state.resolve(),
            bin_dir=args.bin_dir or find_bin_dir(),
            etcd_hosts=tuple(args.etcd or MemberConfig.etcd_hosts),
            rest_port=args.rest_port, rest_connect_address=args.rest_connect_address,
            pg_port=args.pg_port, connect_address=args.connect_address, ttl=args.ttl,
            loop_wait=args.loop_wait, retry_timeout=args.retry_timeout,
        )  # fmt: skip
        with AgentClient(args.agent) as agent:
            secrets = derive_passwords(agent, cfg.cluster)
        run_as = runner(args.run_as)
    except MeshError as exc:
        log(f"cannot start: {exc}")
        return 2
    cfg.state.mkdir(parents=True, exist_ok=True)
    os.chmod(cfg.state, 0o700)
    hook = shlex.join([sys.executable, "-m", "teemesh.examples.patroni_member",
                       "post-bootstrap", str(cfg.state)])  # fmt: skip
    app = {"user": cfg.app_user, "database": cfg.app_database}
    write_private(cfg.state / "app.json", json.dumps(app).encode())
    config = cfg.state / "patroni.yml"
    document = yaml.safe_dump(render_config(cfg, secrets, hook), sort_keys=False)
    write_private(config, document.encode())
    wait_for_dcs(cfg.etcd_hosts)
    log(f"member {cfg.name} of {cfg.cluster}: Patroni as {run_as}, REST 127.0.0.1:{cfg.rest_port}")
    return supervise(start_patroni(config, run_as), RoleWatcher(
        f"127.0.0.1:{cfg.rest_port}", args.sidecar_api, args.backend))  # fmt: skip


def supervise(patroni: subprocess.Popen[bytes], watcher: RoleWatcher) -> int:
    """Forward SIGTERM/SIGINT to Patroni, watch its role meanwhile, exit with its status."""

    def forward(signum: int, _frame: object) -> None:
        if patroni.poll() is None:
            patroni.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    thread = threading.Thread(target=watcher.run, name="role-watcher", daemon=True)
    thread.start()
    status = patroni.wait()
    watcher.stopping.set()
    thread.join(5)
    for _ in range(3):  # the sidecar must stop routing to us; a few tries, then give up
        if watcher.post(backend_state(None)):
            break
        time.sleep(POLL_INTERVAL)
    log(f"Patroni exited with {status}")
    return 128 - status if status < 0 else status


if __name__ == "__main__":
    sys.exit(main())
