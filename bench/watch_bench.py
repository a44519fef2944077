"""Catalog watch: change propagation from one catalog write to many SSE watchers (p50/p99).

    .venv/bin/python bench/watch_bench.py
    .venv/bin/python bench/watch_bench.py --watchers 10,100,1000 --writes 20 --spacing 0.15 --json

Printed, never asserted. A real ``teemesh agent`` (the coordinator's CVM) and a real
``teemesh coordinator`` (embedded SQLite store) on loopback in a temporary folder. Two peers are
admitted through the real admission API (``AdmissionClient``, quoting in-process with
``SimulatedCvm``): a writer, in a process of its own, and a watcher. At each level, N watch streams
(``GET /v1/catalog/watch?prefix=instances/``) are opened over mTLS with the watcher's SVID (one
SVID for all N connections), each checking the coordinator's RA-TLS evidence as a sidecar does;
once every stream has its snapshot, the writer makes K writes through the catalog API
(``CatalogClient``: a register, then PATCHes toggling health and tags), on a fixed schedule.
Each write's propagation is measured per watcher, from just before the write call to that
watcher's receipt of the ``change`` event carrying the write's revision. Every watcher must see
every revision exactly once and nothing else; misses, duplicates and strays are counted.

The client is one uvloop process: ``AsyncAttestedHttps.stream`` (h11 over TLS) and
``SseParser`` per stream, the receipt time taken as each chunk comes out of the stream. Its
CPU is reported beside the coordinator's: both share this machine's cores.

Issue 4's target on a 2-core machine (1,000 watchers notified within 500 ms p99) is printed
beside the results for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import astuple, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import uvloop
from _harness import (
    GROUP,
    admit,
    coordinator_check,
    latency_ms,
    machine_busy_seconds,
    ms,
    process_cpu_seconds,
    process_open_files_limit,
    process_rss_mib,
    raise_open_files,
    simulated_cluster,
)
from rich import box
from rich.console import Console
from rich.table import Table

from teemesh.attest.simulated import PlatformKey
from teemesh.coordinator.catalog_client import CatalogClient
from teemesh.errors import MeshError, PeerError
from teemesh.identity.certs import pem_pair
from teemesh.identity.meshca import COORDINATOR_USAGE
from teemesh.net.async_https import AsyncAttestedHttps
from teemesh.net.attested_https import der_check
from teemesh.net.sse import SseParser

SERVICE = "web"
PREFIX = "instances/"
TARGET_WATCHERS, TARGET_P99_MS = 1000, 500
CONNECT_PARALLEL = 32
"""Watch streams opened at once: a burst of 1,000 handshakes would only measure the backlog."""
DRAIN_SECONDS = 10.0
"""After the last write, how long the stragglers get before what is missing counts as missed."""

console = Console(highlight=False, width=None if sys.stdout.isatty() else 100)


@dataclass
class Watcher:
    """One watch stream: what it received, and when (perf_counter, this process)."""

    snapshot: int | None = None
    changes: list[tuple[int, float]] = field(default_factory=list)
    data: list[tuple[int, str]] = field(default_factory=list)
    error: str | None = None


@dataclass
class Progress:
    """Counts the watchers report, so the bench waits on an event instead of polling N lists."""

    wanted_snapshots: int
    snapshots: int = 0
    changes: int = 0
    wanted_changes: int = -1
    all_snapshots: asyncio.Event = field(default_factory=asyncio.Event)
    all_changes: asyncio.Event = field(default_factory=asyncio.Event)
    failed: int = 0

    def snapshot(self) -> None:
        self.snapshots += 1
        if self.snapshots >= self.wanted_snapshots:
            self.all_snapshots.set()

    def change(self) -> None:
        self.changes += 1
        if self.changes == self.wanted_changes:
            self.all_changes.set()

    def fail(self) -> None:
        self.failed += 1
        self.snapshot()  # nothing more will come from it: do not wait for it


async def watch(
    https: AsyncAttestedHttps, gate: asyncio.Semaphore, out: Watcher, progress: Progress
) -> None:
    """One sidecar's watch stream, until cancelled; a failure is recorded, not raised."""
    path = f"/v1/catalog/watch?prefix={PREFIX}"
    try:
        async with gate:
            status, chunks = await https.stream(path)
    except PeerError as exc:
        out.error = f"connect: {exc}"
        progress.fail()
        return
    try:
        if status != 200:
            body = b"".join([c async for c in chunks])
            out.error = f"HTTP {status}: {body[:200]!r}"
            return
        parser = SseParser()
        async for chunk in chunks:
            now = time.perf_counter()
            for event in parser.feed(chunk):
                if event.event == "change" and event.id is not None:
                    revision = int(event.id)
                    out.changes.append((revision, now))
                    out.data.append((revision, event.data))  # checked after the run
                    progress.change()
                elif event.event == "snapshot" and event.id is not None:
                    out.snapshot = int(event.id)
                    progress.snapshot()
                else:
                    out.error = f"{event.event}: {event.data[:200]}"
        out.error = out.error or "the stream ended"
    except (PeerError, OSError, ValueError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
        if out.snapshot is None and out.error is not None:
            progress.fail()


@dataclass
class Write:
    what: str
    revision: int
    started: float
    latency: float


async def make_writes(writer: CatalogClient, count: int, spacing: float, level: int) -> list[Write]:
    """A register (which also refreshes the peer's lease), then PATCHes: health, tags, ..."""
    writes = []
    began = time.perf_counter()
    for n in range(count):
        await asyncio.sleep(max(0.0, began + n * spacing - time.perf_counter()))
        start = time.perf_counter()
        if n == 0:
            tags = {"level": str(level), "seq": "0"}
            reply = await writer.register(SERVICE, "10.0.0.1", 8080, tags=tags)
            what = "register"
        elif n % 2:
            health = "warning" if n % 4 == 1 else "passing"
            reply = await writer.update(SERVICE, health=health)
            what = "health"
        else:
            reply = await writer.update(SERVICE, tags={"level": str(level), "seq": str(n)})
            what = "tags"
        elapsed = time.perf_counter() - start
        writes.append(Write(what, int(reply["revision"]), start, elapsed))
    return writes


def writer_main(conn: Connection, url: str, platform_pem: bytes) -> None:
    """The writing sidecar, in a process of its own: admitted here, then one batch of writes
    per job it receives (``(count, spacing, level)``; None ends it).

    Apart from the watchers, so that neither delays the other in one event loop; its
    ``perf_counter`` (CLOCK_MONOTONIC) is the parent's clock.
    """
    try:
        platform = PlatformKey.from_pem(platform_pem)
        svid = admit(url, platform, "writer-0")
        check = der_check(coordinator_check(platform), COORDINATOR_USAGE)
        client = CatalogClient([url], check, pem_pair(svid.certificate, svid.key))
        conn.send(("ready", None))
        while (job := conn.recv()) is not None:
            count, spacing, level = job
            cpu = time.process_time()
            made = uvloop.run(make_writes(client, count, spacing, level))
            conn.send(("done", ([astuple(w) for w in made], time.process_time() - cpu)))
    except (MeshError, OSError) as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    except EOFError:  # the bench went away
        pass


class WriterProcess:
    """The writer's process, stopped by its own PID (the Process object) when done."""

    def __init__(self, url: str, platform: PlatformKey) -> None:
        context = multiprocessing.get_context("spawn")  # no copy of this process's loop
        self.conn, child = context.Pipe()
        self.proc = context.Process(
            target=writer_main, args=(child, url, platform.private_pem()), name="writer"
        )
        self.proc.start()
        child.close()

    async def reply(self, timeout: float) -> Any:
        def receive() -> Any:
            if not self.conn.poll(timeout):
                raise SystemExit(f"the writer process did not answer within {timeout:.0f} s")
            kind, value = self.conn.recv()
            if kind == "error":
                raise SystemExit(f"the writer process failed: {value}")
            return value

        return await asyncio.to_thread(receive)

    async def writes(self, count: int, spacing: float, level: int) -> tuple[list[Write], float]:
        """Make the writes; returns them and the CPU seconds the writer spent on them."""
        self.conn.send((count, spacing, level))
        rows, cpu = await self.reply(60 + count * spacing)
        return [Write(*row) for row in rows], cpu

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def check_watchers(
    watchers: list[Watcher], writes: list[Write]
) -> tuple[list[float], list[float], Counter[str]]:
    """Propagation samples (all), the slowest watcher per write, and what went wrong."""
    by_revision = {w.revision: w for w in writes}
    samples: list[float] = []
    slowest = dict.fromkeys(by_revision, 0.0)
    problems: Counter[str] = Counter()
    for watcher in watchers:
        if watcher.error is not None:
            problems[f"stream: {watcher.error[:120]}"] += 1
        seen = Counter(revision for revision, _ in watcher.changes)
        for revision, count in seen.items():
            if revision not in by_revision:
                problems["stray revision"] += count
            elif count > 1:
                problems["duplicated"] += count - 1
        problems["missed"] += sum(1 for r in by_revision if r not in seen)
        revisions = [revision for revision, _ in watcher.changes]
        if revisions != sorted(revisions):
            problems["out of order"] += 1
        for revision, data in watcher.data:
            doc = json.loads(data)
            keys = [e.get("key") for e in doc.get("events", [])]
            if doc.get("revision") != revision or keys != [f"{PREFIX}{SERVICE}/writer-0"]:
                problems["change data does not match its id"] += 1
        counted: set[int] = set()
        for revision, received in watcher.changes:
            write = by_revision.get(revision)
            if write is None or revision in counted:
                continue
            counted.add(revision)
            delay = received - write.started
            samples.append(delay)
            slowest[revision] = max(slowest[revision], delay)
    for name in ("missed", "duplicated"):
        problems.setdefault(name, 0)
    return samples, list(slowest.values()), problems


def coordinator_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def run_level(
    url: str,
    platform: PlatformKey,
    watcher_svid: tuple[Any, Any],
    writer: WriterProcess,
    count: int,
    *,
    writes: int,
    spacing: float,
    coordinator_pid: int,
) -> dict[str, Any]:
    check = der_check(coordinator_check(platform), COORDINATOR_USAGE)
    https = AsyncAttestedHttps(url, check, client_cert=pem_pair(*watcher_svid), timeout=30)
    watchers = [Watcher() for _ in range(count)]
    progress = Progress(count)
    gate = asyncio.Semaphore(CONNECT_PARALLEL)
    fds_before = coordinator_fds(coordinator_pid)
    cpu_server, cpu_client = process_cpu_seconds(coordinator_pid), time.process_time()
    began = time.perf_counter()
    tasks = [asyncio.create_task(watch(https, gate, w, progress)) for w in watchers]
    try:
        async with asyncio.timeout(60 + count * 0.2):
            await progress.all_snapshots.wait()
        connect_seconds = time.perf_counter() - began
        connect_server = process_cpu_seconds(coordinator_pid) - cpu_server
        connect_client = time.process_time() - cpu_client
        fds_held = coordinator_fds(coordinator_pid)
        rss = process_rss_mib(coordinator_pid)
        await asyncio.sleep(0.5)  # let the handshakes' leftovers settle before measuring

        progress.wanted_changes = (count - progress.failed) * writes
        cpu_server, cpu_client = process_cpu_seconds(coordinator_pid), time.process_time()
        cpu_all = machine_busy_seconds()
        began = time.perf_counter()
        made, cpu_writer = await writer.writes(writes, spacing, count)
        try:
            async with asyncio.timeout(DRAIN_SECONDS):
                await progress.all_changes.wait()
        except TimeoutError:
            pass  # what did not arrive is counted as missed
        elapsed = time.perf_counter() - began
        cpu_server = process_cpu_seconds(coordinator_pid) - cpu_server
        cpu_client = time.process_time() - cpu_client
        cpu_other = machine_busy_seconds() - cpu_all - cpu_server - cpu_client - cpu_writer
        await asyncio.sleep(0.3)  # a duplicate or stray event would arrive now
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    # the coordinator lets go of the streams: wait for it, so levels do not overlap
    deadline = time.monotonic() + 15
    while coordinator_fds(coordinator_pid) > fds_before + 5 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)

    samples, slowest, problems = check_watchers(watchers, made)
    delivered = sum(len(w.changes) for w in watchers)
    write_latencies = [w.latency for w in made]
    return {
        "watchers": count,
        "streams_failed": progress.failed,
        "writes": len(made),
        "spacing_ms": round(1e3 * spacing, 1),
        "connect_seconds": round(connect_seconds, 2),
        "connect_coordinator_cpu_ms_per_stream": round(1e3 * connect_server / count, 3),
        "connect_client_cpu_ms_per_stream": round(1e3 * connect_client / count, 3),
        "coordinator_fds_with_streams": fds_held,
        "coordinator_rss_mib_with_streams": round(rss, 1),
        "propagation": latency_ms(samples),
        "slowest_watcher_per_write": latency_ms(slowest),
        "write_call": latency_ms(write_latencies),
        "missed": problems.pop("missed"),
        "duplicated": problems.pop("duplicated"),
        "other_problems": dict(problems),
        "measured_seconds": round(elapsed, 3),
        "coordinator_cpu_percent": round(100 * cpu_server / elapsed, 1),
        "coordinator_cpu_ms_per_write": round(1e3 * cpu_server / len(made), 2),
        "client_cpu_percent": round(100 * cpu_client / elapsed, 1),
        "client_cpu_ms_per_write": round(1e3 * cpu_client / len(made), 2),
        "coordinator_cpu_us_per_event": round(1e6 * cpu_server / max(1, delivered), 2),
        "client_cpu_us_per_event": round(1e6 * cpu_client / max(1, delivered), 2),
        "writer_cpu_ms_per_write": round(1e3 * cpu_writer / len(made), 2),
        "other_cpu_percent": round(max(0.0, 100 * cpu_other / elapsed), 1),
    }


async def bench(
    levels: list[int], writes: int, spacing: float, progress: bool
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    # SIGTERM cancels the run, so that leaving the context managers stops our processes.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    clock = time.get_clock_info("perf_counter").implementation
    if "CLOCK_MONOTONIC" not in clock:  # the writer's timestamps must be ours
        raise SystemExit(f"perf_counter is {clock}: not one clock across processes")
    # every stream is a socket here and one in the coordinator (which inherits this limit)
    nofile = raise_open_files(max(4096, 2 * max(levels) + 512))
    platform = PlatformKey.generate()
    results = []
    with (
        tempfile.TemporaryDirectory(prefix="teemesh-watch-bench-") as tmp,
        simulated_cluster(
            Path(tmp),
            platform,
            group_lines=[f"services: [{SERVICE}]"],
            # no heartbeats (PATCH does not refresh the lease); each level registers again
            top_lines=["lease_ttl_seconds: 300"],
        ) as (port, pid),
    ):
        coordinator_nofile = process_open_files_limit(pid)
        if coordinator_nofile < max(levels) + 256:
            raise SystemExit(
                f"the coordinator may open {coordinator_nofile} files: too few for "
                f"{max(levels)} streams (raise the hard limit: ulimit -Hn)"
            )
        url = f"https://127.0.0.1:{port}"
        writer = WriterProcess(url, platform)
        try:
            watcher_svid = await asyncio.to_thread(admit, url, platform, "watcher-0")
            await writer.reply(60)  # admitted too
            for level in levels:
                if progress:
                    console.print(f"[dim]{level} watchers, {writes} writes...[/dim]")
                results.append(
                    await run_level(
                        url,
                        platform,
                        (watcher_svid.certificate, watcher_svid.key),
                        writer,
                        level,
                        writes=writes,
                        spacing=spacing,
                        coordinator_pid=pid,
                    )
                )
        finally:
            writer.stop()
    limits = {"bench_nofile": nofile, "coordinator_nofile": coordinator_nofile}
    return results, limits


# ---------------------------------------------------------------------------------------------
# output


def _table(title: str, headers: tuple[str, ...], caption: str | None = None) -> Table:
    table = Table(
        title=title,
        caption=caption,
        caption_justify="left",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    for name in headers:
        table.add_column(name, justify="right")
    return table


def print_tables(doc: dict[str, Any]) -> None:
    target = f"target: {TARGET_WATCHERS} watchers notified within {TARGET_P99_MS} ms p99"
    spread = _table(
        f"Catalog watch: one write to N watchers, real coordinator on {doc['cpus']} CPUs",
        (
            "watchers", "writes", "prop\np50 ms", "prop\np99 ms", "prop\nmax ms",
            "last\np50 ms", "last\np99 ms", "write\np50 ms", "write\np99 ms", "missed", "dup",
        ),
        target,
    )  # fmt: skip
    for row in doc["levels"]:
        prop, last, call = row["propagation"], row["slowest_watcher_per_write"], row["write_call"]
        spread.add_row(
            str(row["watchers"]), str(row["writes"]),
            ms(prop["p50_ms"], 1), ms(prop["p99_ms"], 1), ms(prop["max_ms"], 1),
            ms(last["p50_ms"], 1), ms(last["p99_ms"], 1),
            ms(call["p50_ms"], 1), ms(call["p99_ms"], 1),
            str(row["missed"]), str(row["duplicated"]),
        )  # fmt: skip
    console.print(spread)
    cpu = _table(
        "CPU while the changes flow (100% = one core)",
        (
            "watchers", "seconds", "coord\nCPU", "coord\nms/write", "coord\nus/event",
            "client\nCPU", "client\nms/write", "client\nus/event", "writer\nms/write",
            "other\nCPU",
        ),
    )  # fmt: skip
    for row in doc["levels"]:
        cpu.add_row(
            str(row["watchers"]), f"{row['measured_seconds']:.1f}",
            f"{row['coordinator_cpu_percent']:.0f}%", ms(row["coordinator_cpu_ms_per_write"], 1),
            ms(row["coordinator_cpu_us_per_event"], 1),
            f"{row['client_cpu_percent']:.0f}%", ms(row["client_cpu_ms_per_write"], 1),
            ms(row["client_cpu_us_per_event"], 1), ms(row["writer_cpu_ms_per_write"], 1),
            f"{row['other_cpu_percent']:.0f}%",
        )  # fmt: skip
    console.print(cpu)
    setup = _table(
        "Opening the streams (before the measurement)",
        (
            "watchers", "failed", "seconds", "coord CPU\nms/stream", "client CPU\nms/stream",
            "coord fds\nheld", "coord RSS\nMiB",
        ),
    )  # fmt: skip
    for row in doc["levels"]:
        setup.add_row(
            str(row["watchers"]), str(row["streams_failed"]), f"{row['connect_seconds']:.1f}",
            ms(row["connect_coordinator_cpu_ms_per_stream"]),
            ms(row["connect_client_cpu_ms_per_stream"]),
            str(row["coordinator_fds_with_streams"]),
            f"{row['coordinator_rss_mib_with_streams']:.0f}",
        )  # fmt: skip
    console.print(setup)
    for row in doc["levels"]:
        for kind, count in row["other_problems"].items():
            console.print(f"  {row['watchers']} watchers: {count} x {kind}")
    console.print()
    for note in doc["notes"]:
        console.print(f"- {note}")


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers like 10,100,1000, got {text!r}"
        ) from None
    if not levels or any(not 1 <= n <= 10_000 for n in levels):
        raise argparse.ArgumentTypeError("each watcher level must be within 1..10000")
    return levels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--watchers", type=parse_levels, default=[1000], help="watch streams per level (1000)"
    )
    parser.add_argument("--writes", type=int, default=20, help="writes per level (20)")
    parser.add_argument(
        "--spacing", type=float, default=0.15, help="seconds between write starts (0.15)"
    )
    parser.add_argument(
        "--timeout", type=float, default=900, help="bound on the whole run, seconds (900)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document instead")
    args = parser.parse_args()
    if not 1 <= args.writes <= 1000:
        parser.error("--writes must be within 1..1000")
    if not 0 <= args.spacing <= 10:
        parser.error("--spacing must be within [0, 10]")

    async def bounded() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        async with asyncio.timeout(args.timeout):
            return await bench(args.watchers, args.writes, args.spacing, not args.json)

    try:
        levels, limits = uvloop.run(bounded())
    except asyncio.CancelledError:  # SIGTERM: the processes we started are stopped by now
        raise SystemExit(128 + signal.SIGTERM) from None
    except TimeoutError:
        raise SystemExit(f"the run took over --timeout {args.timeout:.0f} s") from None
    notes = [
        "prop: from just before a write call to a watcher's receipt of that revision's change "
        "event, over every (watcher, write); last: the slowest watcher of each write, p50/p99 "
        "over the writes; write: the write call itself (CatalogClient in the writer's own "
        "process: a new mTLS connection with the RA-TLS check, the request, the reply).",
        f"CPU is measured from the first write until every watcher had every change (or "
        f"{DRAIN_SECONDS:.0f} s after the last write); us/event is per change delivered to one "
        "watcher, the write's own handling included (it dominates at a few watchers). 'other "
        "CPU' is what the rest of the machine used meanwhile: above a few %, the numbers are "
        "disturbed (client and coordinator share the cores).",
        f"Writes start every --spacing; a register, then PATCHes of {GROUP}'s '{SERVICE}' "
        "instance alternating health and tags. Missed/dup: every watcher must receive every "
        "write's revision exactly once (strays and disorder are listed when found).",
        f"Open files: this process {limits['bench_nofile']}, the coordinator "
        f"{limits['coordinator_nofile']} (soft RLIMIT_NOFILE, inherited).",
    ]
    doc: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "targets": {"watchers": TARGET_WATCHERS, "p99_ms": TARGET_P99_MS},
        "limits": limits,
        "levels": levels,
        "notes": notes,
    }
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_tables(doc)


if __name__ == "__main__":
    main()
