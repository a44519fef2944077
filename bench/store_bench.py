"""Catalog store benchmark: writes per second, write latency, and write -> watcher latency.

    .venv/bin/python bench/store_bench.py                       # SQLite, then SQLite with fsync
    .venv/bin/python bench/store_bench.py --etcd http://127.0.0.1:2379

Printed, never asserted. Runs on uvloop, as the coordinator does.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path

import uvloop
from _harness import percentile

from teemesh.catalog.etcd import EtcdStore
from teemesh.catalog.sqlite import SqliteStore
from teemesh.catalog.store import Store

VALUE = b"x" * 200  # about one service instance record


def report(name: str, what: str, samples: list[float]) -> None:
    p50, p99, top = (
        1e3 * x for x in (percentile(samples, 0.5), percentile(samples, 0.99), max(samples))
    )
    print(f"{name:13} {what:34} p50 {p50:7.3f} ms  p99 {p99:7.3f} ms  max {top:7.2f} ms")


async def writes(name: str, store: Store, count: int) -> None:
    latencies = []
    began = time.perf_counter()
    for n in range(count):
        start = time.perf_counter()
        await store.put(f"bench/k{n % 100}", VALUE)
        latencies.append(time.perf_counter() - start)
    rate = count / (time.perf_counter() - began)
    report(name, f"put, one writer ({rate:,.0f}/s)", latencies)

    async def writer(n: int) -> None:
        for _ in range(count // 32):
            await store.put(f"bench/w{n}", VALUE)

    began = time.perf_counter()
    await asyncio.gather(*(writer(n) for n in range(32)))
    print(f"{name:13} put, 32 writers: {count // 32 * 32 / (time.perf_counter() - began):,.0f}/s")

    revision = await store.put("bench/cas", b"0")
    began = time.perf_counter()
    for n in range(count // 2):
        revision = (await store.put_if("bench/cas", b"%d" % n, mod_revision=revision)).revision
    print(f"{name:13} put_if, one writer: {count // 2 / (time.perf_counter() - began):,.0f}/s")


async def watch_latency(name: str, store: Store, watchers: int, rounds: int) -> None:
    """Time from a put to the moment every watcher has its event."""
    contexts = [store.watch("bench/watched/") for _ in range(watchers)]
    streams = [await context.__aenter__() for context in contexts]
    try:
        latencies = []
        for n in range(rounds):
            start = time.perf_counter()
            await store.put("bench/watched/key", b"%d" % n)
            await asyncio.gather(*(anext(stream) for stream in streams))
            latencies.append(time.perf_counter() - start)
        report(name, f"put -> {watchers} watcher(s)", latencies)
    finally:
        for context in contexts:
            await context.__aexit__(None, None, None)


async def run(name: str, store: Store, watchers: list[int]) -> None:
    async with store:
        await writes(name, store, 2000)
        for count in watchers:
            await watch_latency(name, store, count, 300 if count == 1 else 50)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--etcd", help="an etcd client URL; without it, SQLite is measured")
    args = parser.parse_args()
    if args.etcd:
        prefix = f"/teemesh/bench-{uuid.uuid4().hex[:8]}/"
        await run("etcd", await EtcdStore.open(args.etcd, prefix=prefix), [1, 100])
        return
    with tempfile.TemporaryDirectory() as tmp:
        for fsync in (False, True):
            store = await SqliteStore.open(Path(tmp) / f"fsync{fsync}.db", fsync=fsync)
            await run("sqlite+fsync" if fsync else "sqlite", store, [1, 100, 1000])


if __name__ == "__main__":
    uvloop.run(main())
