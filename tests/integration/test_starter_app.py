"""The starter workload (``teemesh.examples.starter``) on loopback, without a mesh: its routes
point at other instances' ports with ``--route NAME=HOST:PORT``."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from procs import free_port

from teemesh.examples import starter

pytestmark = pytest.mark.integration


def test_hello_worker_and_all(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> dict[str, Any]:
        monkeypatch.setenv("TEEMESH_PEER_ID", "worker-3")
        monkeypatch.setenv("TEEMESH_GROUP", "worker")
        monkeypatch.setenv("TEEMESH_INDEX", "3")
        monkeypatch.setenv("TEEMESH_CLUSTER", "starter")
        worker = await starter.start("127.0.0.1", 0, {})
        worker_port = worker.sockets[0].getsockname()[1]
        monkeypatch.setenv("TEEMESH_PEER_ID", "api-0")
        monkeypatch.setenv("TEEMESH_GROUP", "api")
        monkeypatch.setenv("TEEMESH_INDEX", "0")
        routes = {"worker": ("127.0.0.1", worker_port), "down": ("127.0.0.1", free_port())}
        api = await starter.start("127.0.0.1", 0, routes)
        api_port = api.sockets[0].getsockname()[1]

        async def get(path: str) -> tuple[int, Any]:
            status, body = await starter.http_get("127.0.0.1", api_port, path)
            return status, json.loads(body)

        try:
            return {
                "hello": await get("/hello"),
                "worker": await get("/worker"),
                "all": await get("/all?route=worker&n=7"),
                "down": await get("/all?route=down&n=2"),
                "unknown": await get("/all?route=db"),
                "bad n": await get("/all?route=worker&n=0"),
                "404": await get("/nope"),
            }
        finally:
            for server in (api, worker):
                server.close()
                await server.wait_closed()

    got = asyncio.run(scenario())
    assert got["hello"] == (
        200,
        {"cluster": "starter", "group": "api", "index": "0", "peer_id": "api-0"},
    )
    status, reply = got["worker"]
    assert status == 200
    assert reply["from"] == "api-0"
    assert reply["worker"] == {
        "cluster": "starter", "group": "worker", "index": "3", "peer_id": "worker-3",
    }  # fmt: skip
    assert got["all"] == (
        200,
        {"route": "worker", "calls": 7, "counts": {"worker-3": 7}, "errors": {}},
    )
    status, down = got["down"]
    assert status == 200
    assert down["counts"] == {}
    assert sum(down["errors"].values()) == 2
    assert got["unknown"][0] == 400
    assert "unknown route 'db'" in got["unknown"][1]["error"]
    assert got["bad n"] == (400, {"error": "n must be a whole number from 1 to 1000"})
    assert got["404"][0] == 404


def test_route_arguments() -> None:
    assert starter.parse_route("worker=9090") == ("worker", ("worker", 9090))
    assert starter.parse_route("worker=127.0.0.1:1") == ("worker", ("127.0.0.1", 1))
    for bad in ("worker", "worker=x", "=1", "w=0", "w=70000"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected NAME=PORT"):
            starter.parse_route(bad)


@pytest.fixture
def worker_process() -> Iterator[int]:
    port = free_port()
    env = {**os.environ, "TEEMESH_PEER_ID": "worker-0", "TEEMESH_GROUP": "worker"}
    args = [sys.executable, "-m", "teemesh.examples.starter", "--port", str(port)]
    process = subprocess.Popen(args, env=env, stderr=subprocess.PIPE)
    try:
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)
        assert process.stderr is not None
        process.stderr.close()


def test_it_runs_as_a_module_from_the_installed_package(worker_process: int) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            url = f"http://127.0.0.1:{worker_process}/hello"
            with urllib.request.urlopen(url, timeout=2) as reply:
                assert json.loads(reply.read())["peer_id"] == "worker-0"
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
