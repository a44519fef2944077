"""A small attested mesh of real processes: guest agents, coordinators, admitted workloads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from conftest import vector_path
from procs import Proc, free_port, started

from teemesh.attest.dstack import compose_hash
from teemesh.attest.policy import Policy
from teemesh.attest.simulated import OsImage, PlatformKey
from teemesh.coordinator.client import AdmissionClient, Svid
from teemesh.identity.certs import pem_pair
from teemesh.identity.meshca import COORDINATOR_USAGE
from teemesh.identity.ratls import PinnedPeer
from teemesh.net.attested_https import der_check
from teemesh.net.tls import DerCheck, PemPair
from teemesh.platform.agent_client import AgentClient

OS_IMAGE = "dstack-0.5.7-sim"
COORDINATOR_COMPOSE = b'{"manifest_version":2,"name":"coordinator","runner":"docker-compose"}'
WEB_COMPOSE = b'{"manifest_version":2,"name":"web","runner":"docker-compose"}'
DB_COMPOSE = b'{"manifest_version":2,"name":"db","runner":"docker-compose"}'
ROGUE_COMPOSE = b'{"manifest_version":2,"name":"rogue","runner":"docker-compose"}'


def group_yaml(name: str, compose: bytes, *extra: str) -> str:
    lines = [
        f"  {name}:",
        f"    compose_hashes: [{compose_hash(compose).hex()}]",
        f"    os_images: [{OsImage(OS_IMAGE).os_image_hash.hex()}]",
        *(f"    {line}" for line in extra),
    ]
    return "\n".join(lines) + "\n"


def svid_pem(svid: Svid) -> PemPair:
    return pem_pair(svid.certificate, svid.key)


def ready(url: str):
    def check() -> bool:
        try:
            return httpx.get(f"{url}/v1/ca", verify=False, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    return check


@dataclass
class Mesh:
    tmp: Path
    platform: PlatformKey = field(default_factory=PlatformKey.generate)
    urls: list[str] = field(default_factory=list)
    coordinators: list[Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        (self.tmp / "platform.key").write_bytes(self.platform.private_pem())
        (self.tmp / "platform.pub").write_bytes(self.platform.public_pem())
        self.pinned = PinnedPeer(
            Policy(
                tee="simulated",
                platform_key=self.platform.public_pem().decode(),
                compose_hashes=(compose_hash(COORDINATOR_COMPOSE).hex(),),
            )
        )

    @property
    def url(self) -> str:
        return self.urls[0]

    @property
    def catalog_check(self) -> DerCheck:
        """How a test's catalog client trusts coordinators: evidence and usage, per connection."""
        return der_check(self.pinned, COORDINATOR_USAGE)

    @property
    def coordinator(self) -> Proc:
        return self.coordinators[0]

    def write_policy(self, groups: str, top: str = "") -> Path:
        """``groups``: ``group_yaml`` sections; ``top``: more top-level policy lines."""
        path = self.tmp / "cluster.yaml"
        head = "cluster: demo\ntee: simulated\nplatform_key: platform.pub\n"
        path.write_text(f"{head}{top}groups:\n{groups}")
        return path

    def agent(self, name: str, compose: bytes, *extra: str):
        (self.tmp / f"{name}.json").write_bytes(compose)
        sock = self.tmp / f"{name}.sock"
        args = [
            "agent", "--socket", str(sock), "--state", str(self.tmp / name),
            "--platform-key", str(self.tmp / "platform.key"),
            "--app-compose", str(self.tmp / f"{name}.json"), "--os-image", OS_IMAGE, *extra,
        ]  # fmt: skip
        return started(args, self.tmp / f"{name}.log", sock.exists), sock

    def coordinator_agent(self, name: str = "coordinator-agent"):
        appkeys = str(vector_path("dstack/simulator/appkeys.json"))
        return self.agent(name, COORDINATOR_COMPOSE, "--app-keys", appkeys)

    @contextlib.contextmanager
    def start_coordinator(
        self, agent: Path, state: str, *extra: str, port: int | None = None
    ) -> Iterator[Proc]:
        """``port``: to start one again where it was (with a new RA-TLS certificate)."""
        port = port or free_port()
        url = f"https://127.0.0.1:{port}"
        args = [
            "coordinator", "--policy", str(self.tmp / "cluster.yaml"),
            "--listen", f"127.0.0.1:{port}", "--state", str(self.tmp / state),
            "--agent", str(agent), *extra,
        ]  # fmt: skip
        with started(args, self.tmp / f"{state}.log", ready(url)) as proc:
            self.urls.append(url)
            self.coordinators.append(proc)
            try:
                yield proc
            finally:
                self.urls.remove(url)
                self.coordinators.remove(proc)

    @contextlib.contextmanager
    def admitted(
        self, name: str, compose: bytes, group: str, peer_id: str | None = None
    ) -> Iterator[tuple[Svid, AgentClient]]:
        """A workload CVM's agent, and the SVID it was admitted with."""
        agent_cm, sock = self.agent(name, compose)
        with agent_cm, AgentClient(str(sock)) as agent:
            client = AdmissionClient(self.url, self.pinned, agent)
            yield client.admit("demo", group, peer_id or name), agent
