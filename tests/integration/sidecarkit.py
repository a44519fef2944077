"""Sidecars as real processes on loopback: each with its own guest agent, ingress port and VIPs.

Every sidecar of a test gets its own 127.x.y.z range for its route VIPs, so several of them on
one machine never collide (on the local platform each CVM has its own loopback instead).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from meshkit import COORDINATOR_COMPOSE, Mesh, group_yaml
from procs import Proc, free_port, started

from teemesh.attest.dstack import compose_hash

_vip_blocks = itertools.count(1)
WAIT = 20.0


@dataclass
class Sidecar:
    name: str
    proc: Proc
    api: str
    ingress_port: int
    vips: dict[str, str]

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://{self.api}/v1/status", timeout=5) as reply:
            return json.loads(reply.read())

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://{self.api}/metrics", timeout=5) as reply:
            return reply.read().decode()

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        request = urllib.request.Request(
            f"http://{self.api}{path}", json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=5) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def connect(self, route: str, port: int, timeout: float = 10) -> socket.socket:
        return socket.create_connection((self.vips[route], port), timeout=timeout)

    def metric(self, name: str, /, **labels: str) -> float:
        """The value of one sample (0 when absent)."""
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in self.metrics().splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            base, _, rest = key.partition("{")
            got = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
            if base == name and got == want:
                return float(value)
        return 0.0

    def terminate(self) -> None:
        self.proc.process.send_signal(signal.SIGTERM)


def coordinator_policy() -> dict[str, Any]:
    return {
        "tee": "simulated",
        "platform_key": "platform.pub",
        "compose_hashes": [compose_hash(COORDINATOR_COMPOSE).hex()],
    }


def wait_for(what: str, check: Callable[[], Any], timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@contextlib.contextmanager
def run_sidecar(
    mesh: Mesh,
    name: str,
    compose: bytes,
    group: str,
    *,
    backends: dict[str, Any] | None = None,
    routes: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    peer_id: str | None = None,
    wait_ready: bool = True,
    agent_args: tuple[str, ...] = (),
) -> Iterator[Sidecar]:
    """A sidecar for CVM ``name`` (its own agent, started with ``agent_args``), serving until
    the block ends. ``wait_ready=False`` returns once its local API answers, admitted or not."""
    block = next(_vip_blocks)
    routes = dict(routes or {})
    vips = {}
    for index, (route, spec) in enumerate(routes.items()):
        vips[route] = f"127.78.{block}.{10 + index}"
        routes[route] = {"vip": vips[route], **spec}
    ingress, api = free_port(), free_port()
    config = {
        "cluster": "demo",
        "group": group,
        "peer_id": peer_id or name,
        "coordinators": list(mesh.urls),
        "coordinator_policy": coordinator_policy(),
        "address": "127.0.0.1",
        "ingress": f"127.0.0.1:{ingress}",
        "api": f"127.0.0.1:{api}",
        "backends": backends or {},
        "routes": routes,
        "eject_seconds": 2,
        "drain_seconds": 2,
        **(extra or {}),
    }
    path = mesh.tmp / f"{name}-sidecar.yaml"
    path.write_text(yaml.safe_dump(config))
    agent_cm, sock = mesh.agent(name, compose, *agent_args)
    with agent_cm:
        api_url = f"127.0.0.1:{api}"

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://{api_url}/health", timeout=1) as reply:
                    return reply.status == 200
            except urllib.error.HTTPError:
                return not wait_ready
            except OSError:
                return False

        args = ["sidecar", "run", "--config", str(path), "--agent", str(sock),
                "--state", str(mesh.tmp / f"{name}-sidecar")]  # fmt: skip
        with started(args, mesh.tmp / f"{name}-sidecar.log", ready, timeout=WAIT) as proc:
            yield Sidecar(name, proc, api_url, ingress, vips)


def mesh_policy(mesh: Mesh, groups: dict[str, tuple[bytes, list[str]]], top: str = "") -> Path:
    """A cluster policy admitting each group's compose, owning its services."""
    sections = "".join(
        group_yaml(group, compose, f"services: [{', '.join(services)}]")
        for group, (compose, services) in groups.items()
    )
    return mesh.write_policy(sections, top)
