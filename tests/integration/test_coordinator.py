"""`teemesh coordinator` end to end: real coordinator and guest-agent processes on loopback.

The coordinator derives its mesh CA through its own agent and serves an RA-TLS certificate; a
workload CVM's agent quotes the admission binding; the client checks the coordinator first.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from cryptography import x509
from meshkit import ROGUE_COMPOSE, WEB_COMPOSE, Mesh, group_yaml

from teemesh.attest.dstack import compose_hash
from teemesh.coordinator.client import AdmissionClient
from teemesh.coordinator.errors import AdmissionRefused
from teemesh.errors import PeerError
from teemesh.identity.ratls import PinnedPeer
from teemesh.platform.agent_client import AgentClient

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mesh(tmp_path_factory) -> Iterator[Mesh]:
    mesh = Mesh(tmp_path_factory.mktemp("coordinator"))
    mesh.write_policy(group_yaml("web", WEB_COMPOSE, "peer_ids: [web-1, web-2]"))
    agent_cm, agent_sock = mesh.coordinator_agent()
    with agent_cm, mesh.start_coordinator(agent_sock, "coordinator"):
        yield mesh


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
    agent_cm, sock = mesh.coordinator_agent("coordinator-agent-2")
    with agent_cm, mesh.start_coordinator(sock, "coordinator-2"):
        first, second = (
            httpx.get(f"{url}/v1/ca", verify=False).json()["ca_certificate"] for url in mesh.urls
        )
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
