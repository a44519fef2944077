"""Policy epochs: a reloaded policy revokes what it no longer admits, at once and visibly.

A real coordinator, real agents; the policy file is edited and reloaded the two ways an operator
would: ``teemesh admin reload`` and SIGHUP. Revoked peers lose the catalog, cannot renew, and
their certificate serials appear on the published revocation list; everyone else carries on.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from meshkit import DB_COMPOSE, ROGUE_COMPOSE, WEB_COMPOSE, Mesh, group_yaml, svid_pem
from procs import run_teemesh

from teemesh.attest.dstack import compose_hash
from teemesh.coordinator.catalog_client import CatalogClient
from teemesh.coordinator.client import AdmissionClient, Svid
from teemesh.coordinator.errors import AdmissionRefused
from teemesh.errors import Refused
from teemesh.platform.agent_client import AgentClient

pytestmark = pytest.mark.integration

WEB = group_yaml("web", WEB_COMPOSE, "services: [web]", "peer_ids: [web-0, web-1]")
DB = group_yaml("db", DB_COMPOSE, "services: [db]")


class World:
    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.svids: dict[str, Svid] = {}
        self.agents: dict[str, AgentClient] = {}

    def catalog(self, peer: str) -> CatalogClient:
        svid = self.svids[peer]
        return CatalogClient(self.mesh.urls, self.mesh.catalog_check, svid_pem(svid))

    def renew(self, peer: str, group: str) -> Svid:
        return AdmissionClient(self.mesh.url, self.mesh.pinned, self.agents[peer]).admit(
            "demo", group, peer
        )

    def admin(self, *args: str, token: Path | None = None) -> tuple[int, str]:
        state = self.mesh.tmp / "coordinator"
        token = token or state / "admin.token"
        where = ["--url", self.mesh.url, "--ca", str(state / "mesh-ca.crt")]
        result = run_teemesh(
            ["admin", *where, "--token-file", str(token), *args], self.mesh.tmp / "admin.log"
        )
        return result.returncode, result.stdout + result.stderr

    def wait_for_log(self, text: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.mesh.coordinator.output():
            if time.monotonic() > deadline:
                pytest.fail(f"{text!r} not logged: {self.mesh.coordinator.output()[-2000:]}")
            time.sleep(0.05)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    mesh = Mesh(tmp_path_factory.mktemp("epochs"))
    mesh.write_policy(WEB + DB)
    world = World(mesh)
    agent_cm, agent_sock = mesh.coordinator_agent()
    with agent_cm, mesh.start_coordinator(agent_sock, "coordinator"), ExitStack() as stack:
        for peer, compose, group in (
            ("web-0", WEB_COMPOSE, "web"),
            ("web-1", WEB_COMPOSE, "web"),
            ("db-0", DB_COMPOSE, "db"),
        ):
            svid, agent = stack.enter_context(mesh.admitted(peer, compose, group))
            world.svids[peer], world.agents[peer] = svid, agent
        asyncio.run(world.catalog("web-0").register("web", "10.0.0.1", 8080))
        yield world


def test_admin_reload_revokes_a_removed_peer_and_publishes_it(world: World) -> None:
    code, out = world.admin("admissions", "--json")
    assert code == 0, out
    assert {a["peer_id"] for a in json.loads(out)["admissions"]} == {"web-0", "web-1", "db-0"}
    code, out = world.admin("admissions")
    assert code == 0 and "web/web-1" in out and "db/db-0" in out, out

    world.mesh.write_policy(WEB.replace("[web-0, web-1]", "[web-0]") + DB)
    code, out = world.admin("reload", "--json")
    assert code == 0, out
    reply = json.loads(out)
    serial = f"{world.svids['web-1'].certificate.serial_number:x}"
    assert reply["epoch"] == 2
    assert [(r["peer_id"], r["serials"]) for r in reply["revoked"]] == [("web-1", [serial])]

    async def check() -> None:
        with pytest.raises(Refused, match="revoked or superseded"):
            await world.catalog("web-1").read()
        published = await world.catalog("web-0").read("revocations/")
        assert [i["value"]["serial"] for i in published["items"]] == [serial]
        assert "PEER_ID_NOT_ALLOWED" in published["items"][0]["value"]["reason"]
        instances = await world.catalog("db-0").read("instances/")  # others carry on
        assert [i["key"] for i in instances["items"]] == ["instances/web/web-0"]

    asyncio.run(check())
    with pytest.raises(AdmissionRefused, match="PEER_ID_NOT_ALLOWED"):
        world.renew("web-1", "web")
    assert world.renew("web-0", "web").spiffe_id.endswith("/web/web-0")

    code, out = world.admin("revoke", "web", "web-1")
    said = " ".join(out.split())  # rich wraps long lines
    assert code != 0 and "HTTP 404: web/web-1 has no admission" in said, said  # forgotten
    code, out = world.admin("reload", "--json")  # the same policy again: no new epoch
    assert json.loads(out) == {"epoch": 2, "digest": reply["digest"], "revoked": []}


def test_sighup_reload_revokes_a_removed_compose_hash(world: World) -> None:
    rogue = compose_hash(ROGUE_COMPOSE).hex()
    world.mesh.write_policy(
        WEB.replace("[web-0, web-1]", "[web-0]") + DB.replace(compose_hash(DB_COMPOSE).hex(), rogue)
    )
    world.mesh.coordinator.process.send_signal(signal.SIGHUP)
    world.wait_for_log("revoked db/db-0")
    assert "COMPOSE_HASH_NOT_ALLOWED" in world.mesh.coordinator.output()

    async def check() -> None:
        with pytest.raises(Refused):
            await world.catalog("db-0").read()
        await world.catalog("web-0").read()

    asyncio.run(check())
    with pytest.raises(AdmissionRefused, match="COMPOSE_HASH_NOT_ALLOWED"):
        world.renew("db-0", "db")


def test_a_broken_policy_file_keeps_the_policy_in_force(world: World) -> None:
    (world.mesh.tmp / "cluster.yaml").write_text("cluster: demo\ntee: simulated\ngroups: [\n")
    world.mesh.coordinator.process.send_signal(signal.SIGHUP)
    world.wait_for_log("policy reload failed, the policy in force stays")
    code, out = world.admin("reload")
    assert code != 0 and "invalid YAML" in out
    assert world.renew("web-0", "web").spiffe_id.endswith("/web/web-0")


def test_the_admin_api_refuses_a_wrong_token(world: World) -> None:
    wrong = world.mesh.tmp / "wrong.token"
    wrong.write_text("x" * 43)
    code, out = world.admin("revoke", "web", "web-0", token=wrong)
    assert code != 0 and "HTTP 401" in out
    asyncio.run(world.catalog("web-0").read())  # web-0 was not revoked
    code, out = world.admin("revoke", "web", "web-0", "--reason", "compromised")
    assert code == 0 and "compromised" in out, out
    with pytest.raises(Refused):
        asyncio.run(world.catalog("web-0").read())
