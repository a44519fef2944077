"""The Patroni demo's web app: the starter's /hello and /all, plus writes and reads through the
mesh's role routes.

    POST /db/write    insert a row through postgres-master:5432; {"id": ..., "member": ...}
                      (``?tag=T`` stores T with the row, so a client can find its writes)
    GET  /db/read     count and last id, read through postgres-replica:5432
    GET  /db/status   which member answered each route: address, in recovery, member name

``python -m teemesh.examples.webdemo --port 8080``. It connects as the app user without a
password: the mesh authenticates it (only the groups in the routes' ``callers`` reach the
database, see :mod:`teemesh.examples.patroni_member`). A new connection per request, so a request
after a failover lands on the new leader; a database that cannot be reached is a 503 with a JSON
reason.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg

from teemesh.checks import split_host_port
from teemesh.examples import starter
from teemesh.examples.patroni_member import MEMBER_SETTING

CONNECT_TIMEOUT = 3
MAX_TAG = 64
INSERT_SQL = "INSERT INTO writes (writer) VALUES (%s) RETURNING id, current_setting(%s, true)"
STATUS_SQL = (
    "SELECT host(inet_server_addr()), inet_server_port(), pg_is_in_recovery(),"
    f" current_setting('{MEMBER_SETTING}', true)"
)


@dataclass(frozen=True)
class Database:
    """Where the app database is, and through which routes."""

    master: tuple[str, int] = ("postgres-master", 5432)
    replica: tuple[str, int] = ("postgres-replica", 5432)
    name: str = "demo"
    user: str = "demo"


class Unavailable(Exception):
    """The database could not be reached: the reply is a 503."""


class WebDemo(starter.Starter):
    def __init__(self, routes: dict[str, tuple[str, int]], db: Database) -> None:
        super().__init__(routes)
        self.db = db

    async def handle_method(self, method: str, target: str) -> tuple[int, Any]:
        url = urlsplit(target)
        path = url.path
        wanted = {"/db/write": "POST", "/db/read": "GET", "/db/status": "GET"}.get(path)
        if wanted is None:
            return await super().handle_method(method, target)
        if method != wanted:
            return 405, {"error": f"{path} takes {wanted}"}
        try:
            if path == "/db/write":
                return await self.write(parse_qs(url.query).get("tag", [""])[-1])
            if path == "/db/read":
                return 200, await self.read()
            return await self.status()
        except Unavailable as exc:
            return 503, {"error": str(exc)}

    async def write(self, tag: str = "") -> tuple[int, Any]:
        """One row, its writer being this replica (and the client's tag, if any)."""
        if len(tag) > MAX_TAG or not tag.isprintable():
            return 400, {"error": f"tag: at most {MAX_TAG} printable characters"}
        writer = f"{self.me['peer_id']} {tag}" if tag else self.me["peer_id"]
        rows = await self.query(self.db.master, INSERT_SQL, (writer, MEMBER_SETTING))
        (row_id, member), *_ = rows
        return 200, {"id": row_id, "member": member, "via": _where(self.db.master)}

    async def read(self) -> dict[str, Any]:
        rows = await self.query(self.db.replica, "SELECT count(*), max(id) FROM writes")
        return {"count": rows[0][0], "last_id": rows[0][1], "via": _where(self.db.replica)}

    async def status(self) -> tuple[int, Any]:
        doc: dict[str, Any] = {}
        for route, where in (("master", self.db.master), ("replica", self.db.replica)):
            try:
                addr, port, recovery, member = (await self.query(where, STATUS_SQL))[0]
            except Unavailable as exc:
                doc[route] = {"via": _where(where), "error": str(exc)}
                continue
            doc[route] = {"via": _where(where), "server": f"{addr}:{port}",
                          "in_recovery": recovery, "member": member}  # fmt: skip
        ok = any("error" not in v for v in doc.values())
        return (200 if ok else 503), doc

    async def query(
        self, where: tuple[str, int], sql: str, args: tuple[Any, ...] = ()
    ) -> list[tuple[Any, ...]]:
        try:
            conn = await psycopg.AsyncConnection.connect(
                host=where[0], port=where[1], dbname=self.db.name, user=self.db.user,
                connect_timeout=CONNECT_TIMEOUT, application_name="webdemo", autocommit=True,
            )  # fmt: skip
            async with conn:
                cursor = await conn.execute(sql, args)
                return await cursor.fetchall()
        except psycopg.Error as exc:
            raise Unavailable(f"{_where(where)}: {str(exc).strip() or type(exc).__name__}") from exc


def _where(where: tuple[str, int]) -> str:
    return f"{where[0]}:{where[1]}"


def _address(text: str) -> tuple[str, int]:
    try:
        return split_host_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def main(argv: list[str] | None = None) -> None:
    parser = starter.argument_parser("python -m teemesh.examples.webdemo")
    parser.add_argument(
        "--db-master",
        type=_address,
        default=Database.master,
        help="where writes go (default: the mesh route postgres-master:5432)",
    )
    parser.add_argument(
        "--db-replica",
        type=_address,
        default=Database.replica,
        help="where reads go (default: the mesh route postgres-replica:5432)",
    )
    parser.add_argument("--db-name", default=Database.name)
    parser.add_argument("--db-user", default=Database.user)
    args = parser.parse_args(argv)
    db = Database(args.db_master, args.db_replica, args.db_name, args.db_user)
    routes = starter.DEFAULT_ROUTES | dict(args.route)
    starter.serve("webdemo", args.host, args.port, routes, lambda r: WebDemo(r, db))


if __name__ == "__main__":
    main()
