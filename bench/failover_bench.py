"""The Patroni demo's failover timeline: from a fault on the leader to Patroni's promotion, to
the ``postgres-master`` route's switch in every sidecar, and to the first write that succeeds.

    .venv/bin/python bench/failover_bench.py [--rounds 1] [--json]

Brings up ``examples/patroni-demo`` (root; Patroni, PostgreSQL 15 and etcd installed, as
``scripts/test`` does), writes through the gateway every 50 ms with a new connection each
(``teemesh.examples.dbwriter``), and in each round faults the current leader three ways:

- ``crash``: ``teemesh crash`` kills every process of its CVM at once. Nothing releases Patroni's
  leader key: the others wait for it to expire, ``ttl`` (20 s, Patroni's minimum) after the
  leader last refreshed it.
- ``stop``: ``teemesh kill``, SIGTERM first: Patroni stops PostgreSQL and releases the key.
- ``switchover``: ``patronictl switchover`` from another member's CVM, through the mesh.

A crashed or stopped CVM is restarted and has rejoined before the next fault. Times are seconds
from the fault: ``promoted`` from the new leader's Patroni log, ``routed`` when the last of all
sidecars (a crashed or stopped CVM's aside) logged ``route_changed`` to the new leader, ``first
write`` when the first write committed on the new leader was answered. Printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from teemesh.examples.dbwriter import Writer

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "examples" / "patroni-demo" / "cluster.yaml"
BIN = Path(sys.executable).parent
MEMBERS = ("postgres-0", "postgres-1", "postgres-2")
PROMOTED = "promoted self to leader"
FAULTS = ("crash", "stop", "switchover")
console = Console(stderr=True)


def teemesh(*args: object, timeout: float = 120) -> str:
    result = subprocess.run([str(BIN / "teemesh"), *map(str, args)], capture_output=True,
                            text=True, timeout=timeout, check=False)  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"teemesh {args[0]}: {result.stderr.strip() or result.stdout}")
    return result.stdout


class Cluster:
    def __init__(self, state: Path) -> None:
        self.state = state
        launch = json.loads((state / "launch.json").read_text())
        self.cvms = [c["name"] for c in launch["cvms"] if c.get("api")]
        self.writer = Writer(launch["public"][0], str(state / "gateway-ca.pem"))

    def patronictl(self, cvm: str, *args: str) -> str:
        config = self.state / "cvms" / cvm / "data" / "patroni" / "patroni.yml"
        return teemesh("exec", cvm, "--state", self.state, "--", BIN / "patronictl", "-c",
                       config, *args)  # fmt: skip

    def healthy(self) -> bool:
        """Three members: a leader and two streaming, one of them synchronous."""
        try:
            doc = json.loads(self.patronictl(MEMBERS[0], "list", "--format", "json"))
        except (RuntimeError, ValueError):
            return False
        roles = sorted(m["Role"] for m in doc)
        streaming = sum(m["State"] == "streaming" for m in doc)
        return roles == ["Leader", "Replica", "Sync Standby"] and streaming == 2

    def promoted_at(self, member: str, after: float) -> float | None:
        """When ``member``'s Patroni logged its promotion, after ``after`` (epoch seconds)."""
        for line in (self.state / "logs" / member / "app.log").read_text().splitlines():
            if PROMOTED in line:
                at = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                if at > after:
                    return at
        return None

    def routed_at(self, member: str, after: float, down: str | None) -> dict[str, float | None]:
        """Per sidecar (but ``down``'s), when its postgres-master route reached only ``member``."""
        out: dict[str, float | None] = {}
        for cvm in (c for c in self.cvms if c != down):
            out[cvm] = None
            for line in (self.state / "logs" / cvm / "sidecar.log").read_text().splitlines():
                event = json.loads(line) if line.startswith("{") else {}
                if (event.get("event") == "route_changed" and event["ts"] > after
                        and event.get("route") == "postgres-master"
                        and event.get("instances") == [member]):  # fmt: skip
                    out[cvm] = event["ts"]
                    break
        return out


def wait(what: str, check: Any, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := check()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout} s")
        time.sleep(0.25)
    return got


def fault(cluster: Cluster, kind: str) -> dict[str, Any]:
    leader = wait("a leader", cluster.writer.master)
    writes = cluster.writer.record.writes
    at = time.time()
    if kind == "switchover":
        other = next(m for m in MEMBERS if m != leader)
        cluster.patronictl(other, "switchover", "--leader", leader, "--force")
    else:
        teemesh("crash" if kind == "crash" else "kill", leader, "--state", cluster.state)

    def first_write() -> Any:
        return next((w for w in list(writes) if w.sent > at and w.status == 200
                     and w.member not in (None, leader)), None)  # fmt: skip

    write = wait("a write on a new leader", first_write)
    time.sleep(2)  # the last sidecars' logs
    new = write.member
    promoted = cluster.promoted_at(new, at)
    routed = cluster.routed_at(new, at, down=None if kind == "switchover" else leader)
    during = [w for w in writes if at <= w.sent <= write.done]
    if kind != "switchover":
        teemesh("restart", leader, "--state", cluster.state)
    wait("three members again", cluster.healthy, timeout=180)
    last = None if None in routed.values() else max(v for v in routed.values() if v)
    return {
        "fault": kind, "old": leader, "new": new,
        "promoted": _since(promoted, at), "routed": _since(last, at),
        "route_after_promotion": _since(last, promoted),
        "first_write": _since(write.done, at),
        "failed_writes": sum(w.status != 200 for w in during),
        "sidecars": len(routed), "sidecars_routed": sum(v is not None for v in routed.values()),
    }  # fmt: skip


def _since(when: float | None, start: float | None) -> float | None:
    return None if when is None or start is None else round(when - start, 2)


def run(rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="failover-bench-") as tmp:
        state = Path(tmp) / "state"
        started = time.monotonic()
        console.print("bringing up examples/patroni-demo ...")
        try:
            teemesh("up", SPEC, "--state", state, "--timeout", "150", timeout=240)
            up = round(time.monotonic() - started, 1)
            cluster = Cluster(state)
            wait("three members", cluster.healthy, timeout=120)
            thread = threading.Thread(target=cluster.writer.run, args=(0.05, None), daemon=True)
            thread.start()
            results = []
            for n in range(rounds):
                for kind in FAULTS:
                    console.print(f"round {n + 1}/{rounds}: {kind} the leader ...")
                    results.append(fault(cluster, kind))
            cluster.writer.stopping.set()
            thread.join(30)
            return {"up_seconds": up, "results": results,
                    "writes": cluster.writer.record.summary()}  # fmt: skip
        finally:
            subprocess.run([str(BIN / "teemesh"), "down", "--state", str(state)],
                           capture_output=True, check=False)  # fmt: skip


def report(doc: dict[str, Any]) -> None:
    up = doc["up_seconds"]
    table = Table(title=f"failover timeline (s from the fault); cluster up in {up} s")
    for column in ("fault", "old → new", "promoted", "routed (all sidecars)",
                   "route after promotion", "first write", "failed writes"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("fault", "old → new") else "right")
    for r in doc["results"]:
        table.add_row(r["fault"], f"{r['old']} → {r['new']}", _s(r["promoted"]),
                      f"{_s(r['routed'])} ({r['sidecars_routed']}/{r['sidecars']})",
                      _s(r["route_after_promotion"]), _s(r["first_write"]),
                      str(r["failed_writes"]))  # fmt: skip
    out = Console(width=140)
    out.print(table)
    out.print(f"writes: {doc['writes']}")


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    doc = run(args.rounds)
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        report(doc)


if __name__ == "__main__":
    main()
