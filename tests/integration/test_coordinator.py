"""`teemesh coordinator` end to end: real coordinator and guest-agent processes on loopback.

The coordinator derives its mesh CA through its own agent and serves an RA-TLS certificate; a
workload CVM's agent quotes the admission binding; the client checks the coordinator first.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import vector_path
from cryptography import x509
from procs import Proc, free_port, started

from teemesh.attest.dstack import compose_hash
from teemesh.attest.policy import Policy
from teemesh.attest.simulated import OsImage, PlatformKey
from teemesh.coordinator.client import AdmissionClient
from teemesh.coordinator.service import AdmissionRefused
from teemesh.errors import PeerError
from teemesh.identity.ratls import PinnedPeer
from teemesh.platform.agent_client import AgentClient

pytestmark = pytest.mark.integration

OS_IMAGE = "dstack-0.5.7-sim"
COORDINATOR_COMPOSE = b'{"manifest_version":2,"name":"coordinator","runner":"docker-compose"}'
WEB_COMPOSE = b'{"manifest_version":2,"name":"web","runner":"docker-compose"}'
ROGUE_COMPOSE = b'{"manifest_version":2,"name":"rogue","runner":"docker-compose"}'


@dataclass
class Mesh:
    tmp: Path
    platform: PlatformKey
    url: str
    coordinator: Proc
    pinned: PinnedPeer

    def agent(self, name: str, compose: bytes, *extra: str):
        (self.tmp / f"{name}.json").write_bytes(compose)
        sock = self.tmp / f"{name}.sock"
        args = [
            "agent", "--socket", str(sock), "--state", str(self.tmp / name),
            "--platform-key", str(self.tmp / "platform.key"),
            "--app-compose", str(self.tmp / f"{name}.json"), "--os-image", OS_IMAGE, *extra,
        ]  # fmt: skip
        return started(args, self.tmp / f"{name}.log", sock.exists), sock


def _ready(url: str):
    def ready() -> bool:
        try:
            return httpx.get(f"{url}/v1/ca", verify=False, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    return ready


def _coordinator_args(tmp: Path, port: int, agent: Path, state: str) -> list[str]:
    return [
        "coordinator", "--policy", str(tmp / "cluster.yaml"), "--listen", f"127.0.0.1:{port}",
        "--state", str(tmp / state), "--agent", str(agent),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def mesh(tmp_path_factory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("coordinator")
    platform = PlatformKey.generate()
    (tmp / "platform.key").write_bytes(platform.private_pem())
    (tmp / "platform.pub").write_bytes(platform.public_pem())
    (tmp / "cluster.yaml").write_text(
        "cluster: demo\ntee: simulated\nplatform_key: platform.pub\ngroups:\n"
        f"  web:\n    compose_hashes: [{compose_hash(WEB_COMPOSE).hex()}]\n"
        f"    os_images: [{OsImage(OS_IMAGE).os_image_hash.hex()}]\n"
        "    peer_ids: [web-1, web-2]\n"
    )
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    base = Mesh(tmp, platform, url, None, None)  # type: ignore[arg-type]
    appkeys = str(vector_path("dstack/simulator/appkeys.json"))
    agent_cm, agent_sock = base.agent(
        "coordinator-agent", COORDINATOR_COMPOSE, "--app-keys", appkeys
    )
    with agent_cm:
        args = _coordinator_args(tmp, port, agent_sock, "coordinator")
        with started(args, tmp / "coordinator.log", _ready(url)) as proc:
            base.coordinator = proc
            base.pinned = PinnedPeer(
                Policy(
                    tee="simulated",
                    platform_key=platform.public_pem().decode(),
                    compose_hashes=(compose_hash(COORDINATOR_COMPOSE).hex(),),
                )
            )
            yield base


def test_an_attested_workload_is_admitted(mesh: Mesh) -> None:
    agent_cm, sock = mesh.agent("web-1", WEB_COMPOSE)
    with agent_cm, AgentClient(str(sock)) as agent:
        svid = AdmissionClient(mesh.url, mesh.pinned, agent).admit("demo", "web", "web-1")
        app_id = agent.info()["app_id"]
    assert svid.spiffe_id == "spiffe://demo/web/web-1"
    assert svid.renew_after < svid.expires_at
    assert app_id == compose_hash(WEB_COMPOSE)[:20].hex()
    assert "admitted web/web-1 as spiffe://demo/web/web-1" in mesh.coordinator.output()


def test_a_refusal_names_its_reason_and_the_peer_in_the_log(mesh: Mesh) -> None:
    agent_cm, sock = mesh.agent("rogue", ROGUE_COMPOSE)
    with agent_cm, AgentClient(str(sock)) as agent:
        client = AdmissionClient(mesh.url, mesh.pinned, agent)
        with pytest.raises(AdmissionRefused) as info:
            client.admit("demo", "web", "web-2")
        assert [r.code for r in info.value.refusals] == ["COMPOSE_HASH_NOT_ALLOWED"]
        with pytest.raises(AdmissionRefused, match="PEER_ID_NOT_ALLOWED"):
            client.admit("demo", "web", "web-9")
    assert "admission refused for web/web-2: COMPOSE_HASH_NOT_ALLOWED" in mesh.coordinator.output()


def test_a_sidecar_refuses_a_coordinator_that_fails_its_pinned_policy(mesh: Mesh) -> None:
    wrong = PinnedPeer(mesh.pinned.policy.model_copy(update={"compose_hashes": ("00" * 32,)}))
    agent_cm, sock = mesh.agent("web-2", WEB_COMPOSE)
    with agent_cm, AgentClient(str(sock)) as agent:
        with pytest.raises(PeerError, match="COMPOSE_HASH_NOT_ALLOWED"):
            AdmissionClient(mesh.url, wrong, agent).admit("demo", "web", "web-2")
        # the check failed before any request was sent; the right pin then admits
        svid = AdmissionClient(mesh.url, mesh.pinned, agent).admit("demo", "web", "web-2")
    assert svid.spiffe_id.endswith("/web/web-2")


def test_replicas_with_the_same_app_keys_derive_the_same_mesh_ca(mesh: Mesh) -> None:
    appkeys = str(vector_path("dstack/simulator/appkeys.json"))
    agent_cm, sock = mesh.agent("coordinator-agent-2", COORDINATOR_COMPOSE, "--app-keys", appkeys)
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    with agent_cm:
        args = _coordinator_args(mesh.tmp, port, sock, "coordinator-2")
        with started(args, mesh.tmp / "coordinator-2.log", _ready(url)):
            first = httpx.get(f"{mesh.url}/v1/ca", verify=False).json()["ca_certificate"]
            second = httpx.get(f"{url}/v1/ca", verify=False).json()["ca_certificate"]
    a, b = (x509.load_pem_x509_certificate(p.encode()) for p in (first, second))
    assert a.public_key() == b.public_key() and a.subject == b.subject


def test_malformed_requests_get_400_naming_the_field(mesh: Mesh) -> None:
    with httpx.Client(verify=False, base_url=mesh.url) as client:
        reply = client.post("/v1/admission/attest", content=b"{not json")
        assert reply.status_code == 400 and reply.json()["field"] == "body"
        reply = client.post("/v1/admission/attest", json={"group": "web", "peer_id": "web-1"})
        assert reply.status_code == 400 and reply.json()["field"] == "nonce"
        reply = client.post("/v1/admission/attest", json=[1, 2])
        assert reply.status_code == 400
