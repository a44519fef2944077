"""The coordinators' etcd under mutual TLS with a CA only the coordinator app derives: real etcd
members started by ``teemesh store-member``, real guest agents, real TLS clients.

Two coordinator agents (one app) run a two-member catalog cluster; a workload's agent, another
app, derives "the same" CA and is refused on the client and the peer port, as are plain HTTP,
TLS without a certificate and the DCS's CA.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
import pytest
from cryptography import x509
from etcdkit import etcd_binary, free_ports, stop_process
from meshkit import Mesh
from procs import run_teemesh, teemesh_exe

from teemesh.catalog.etcd import EtcdStore
from teemesh.catalog.store import StoreError
from teemesh.identity.certs import cert_pem
from teemesh.identity.ratls import spki_der
from teemesh.identity.storeca import StoreCa
from teemesh.net.tls import tls_context
from teemesh.platform.agent_client import AgentClient

CLUSTER = "demo"
WORKLOAD_COMPOSE = b'{"manifest_version": 2, "name": "web", "runner": "docker-compose"}'


@dataclass
class Member:
    client: str
    peer: int
    metrics: str
    tls: Path


@dataclass
class Catalog:
    members: list[Member]
    coordinator: Path
    """A coordinator agent's socket."""
    workload: Path
    """A workload agent's socket: another app."""

    @property
    def endpoints(self) -> list[str]:
        return [m.client for m in self.members]


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1, trust_env=False).json()["health"] == "true"
    except (httpx.HTTPError, ValueError, KeyError):
        return False


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Catalog]:
    tmp = tmp_path_factory.mktemp("storetls")
    mesh = Mesh(tmp)
    etcd = etcd_binary()
    with contextlib.ExitStack() as stack:
        socks = []
        for name in ("coordinator-a", "coordinator-b"):
            agent, sock = mesh.coordinator_agent(name)
            stack.enter_context(agent)
            socks.append(sock)
        workload, workload_sock = mesh.agent("web-0", WORKLOAD_COMPOSE)
        stack.enter_context(workload)
        ports = free_ports(6)
        members = [
            Member(
                f"https://127.0.0.1:{ports[i]}",
                ports[2 + i],
                f"http://127.0.0.1:{ports[4 + i]}",
                tmp / f"m{i}-tls",
            )
            for i in range(2)
        ]
        initial = ",".join(f"m{i}=https://127.0.0.1:{m.peer}" for i, m in enumerate(members))
        processes = []
        for i, (member, sock) in enumerate(zip(members, socks, strict=True)):
            peer = f"https://127.0.0.1:{member.peer}"
            argv = [
                teemesh_exe(), "store-member", "--cluster", CLUSTER, "--store", "etcd",
                "--tls-dir", str(member.tls), "--agent", str(sock), "--name", "127.0.0.1",
                "--client-tls", "--",
                etcd, "--name", f"m{i}", "--data-dir", str(tmp / f"m{i}"),
                "--listen-client-urls", member.client, "--advertise-client-urls", member.client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", initial, "--initial-cluster-token", "storetls",
                "--listen-metrics-urls", member.metrics, "--log-level", "warn",
            ]  # fmt: skip
            with (tmp / f"m{i}.log").open("wb") as out:
                processes.append(stack.enter_context(_process(argv, out)))
        deadline = time.monotonic() + 30
        while not all(healthy(m.metrics) for m in members):
            logs = "\n".join((tmp / f"m{i}.log").read_text() for i in range(2))
            if any(p.poll() is not None for p in processes) or time.monotonic() > deadline:
                pytest.fail(f"the TLS etcd cluster did not become healthy:\n{logs}")
            time.sleep(0.1)
        yield Catalog(members, socks[0], workload_sock)


@contextlib.contextmanager
def _process(argv: list[str], out: IO[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        stop_process(process)


def derived(agent: Path, store: str = "etcd") -> StoreCa:
    with AgentClient(str(agent)) as client:
        return StoreCa.from_agent(client, CLUSTER, store)  # type: ignore[arg-type]


async def roundtrip(endpoints: list[str], context: ssl.SSLContext) -> bytes | None:
    store = await EtcdStore.open(endpoints, prefix="/teemesh/storetls/", tls=context, timeout=3)
    async with store:
        await store.put("k", b"v")
        kv = await store.get("k")
        return kv.value if kv else None


def test_a_coordinator_uses_the_catalog_with_the_derived_client_certificate(
    catalog: Catalog,
) -> None:
    context = derived(catalog.coordinator).client_context("coordinator")
    assert asyncio.run(roundtrip(catalog.endpoints, context)) == b"v"


def test_every_coordinator_cvm_derives_the_same_ca(catalog: Catalog) -> None:
    def same(cert: x509.Certificate) -> tuple[object, ...]:  # ECDSA signatures differ
        return cert.subject, cert.serial_number, spki_der(cert.public_key())

    on_disk = [
        x509.load_pem_x509_certificate((m.tls / "ca.crt").read_bytes()) for m in catalog.members
    ]
    assert same(on_disk[0]) == same(on_disk[1]) == same(derived(catalog.coordinator).cert)
    for member in catalog.members:
        assert all(f.stat().st_mode & 0o077 == 0 for f in member.tls.iterdir())


def presenting(ca: StoreCa, trusted: StoreCa) -> ssl.SSLContext:
    """A client presenting a certificate of ``ca`` that trusts the real members (``trusted``),
    so only the members' own check can refuse it."""
    return tls_context(server=False, identity=ca.issue_leaf("coordinator"),
                       verify=cert_pem(trusted.cert))  # fmt: skip


def test_another_apps_derived_ca_is_refused(catalog: Catalog) -> None:
    impostor, real = derived(catalog.workload), derived(catalog.coordinator)
    assert impostor.cert != real.cert
    assert asyncio.run(roundtrip(catalog.endpoints, presenting(real, real))) == b"v"  # control
    with pytest.raises(StoreError):
        asyncio.run(roundtrip(catalog.endpoints, presenting(impostor, real)))


def test_the_dcs_ca_does_not_open_the_catalog(catalog: Catalog) -> None:
    real = derived(catalog.coordinator)
    with pytest.raises(StoreError):
        asyncio.run(
            roundtrip(catalog.endpoints, presenting(derived(catalog.coordinator, "dcs"), real))
        )


def test_tls_without_a_client_certificate_is_refused(catalog: Catalog) -> None:
    context = tls_context(server=False, verify=cert_pem(derived(catalog.coordinator).cert))
    with pytest.raises(StoreError):
        asyncio.run(roundtrip(catalog.endpoints, context))


def test_plain_http_reads_nothing(catalog: Catalog) -> None:
    url = catalog.members[0].client.replace("https://", "http://")
    with httpx.Client(trust_env=False, timeout=3) as http:
        try:
            reply = http.post(f"{url}/v3/kv/range", json={"key": "AA==", "range_end": "AA=="})
        except httpx.HTTPError:
            return
    assert reply.status_code != 200 and b"kvs" not in reply.content


@pytest.mark.parametrize("who", ["nobody", "another app"])
def test_the_peer_port_demands_a_member_certificate(catalog: Catalog, who: str) -> None:
    identity = None
    if who == "another app":
        identity = derived(catalog.workload).issue_leaf("m9", names=("127.0.0.1",))
    context = tls_context(server=False, identity=identity)  # no server check: we attack
    port = catalog.members[0].peer
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=3) as raw,
            context.wrap_socket(raw) as tls,
        ):
            tls.sendall(b"GET /members HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = tls.recv(1024)
    except (ssl.SSLError, ConnectionError):
        answer = b""
    assert answer == b"", "the peer port answered a stranger"


def test_store_member_names_what_stops_it(catalog: Catalog, tmp_path: Path) -> None:
    base = ["store-member", "--cluster", CLUSTER, "--store", "etcd", "--name", "127.0.0.1",
            "--tls-dir", str(tmp_path / "tls")]  # fmt: skip
    no_agent = run_teemesh([*base, "--agent", str(tmp_path / "none.sock"), "--", "etcd"],
                           tmp_path / "a.log")  # fmt: skip
    assert no_agent.returncode != 0 and "none.sock" in no_agent.stderr, no_agent.stderr
    no_etcd = run_teemesh([*base, "--agent", str(catalog.coordinator), "--", "/nonexistent/etcd"],
                          tmp_path / "b.log")  # fmt: skip
    assert no_etcd.returncode != 0 and "cannot run /nonexistent/etcd" in no_etcd.stderr
