"""A rolling upgrade against a real coordinator: the policies ``teemesh rollout plan`` writes,
published the way an operator would (policy file, ``teemesh admin reload``), and replicas
rebooted with the new app-compose one at a time.

The transition policy admits the new code while the old replicas keep serving; the final one
admits only the new code, and an old app-compose is refused with COMPOSE_HASH_NOT_ALLOWED.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from meshkit import Mesh
from procs import run_teemesh

from teemesh.coordinator.client import AdmissionClient, Svid
from teemesh.coordinator.errors import AdmissionRefused
from teemesh.platform.agent_client import AgentClient
from teemesh.spec import cluster_policy, group_app_compose, parse_spec, plan_cluster
from teemesh.spec.plan import Plan
from teemesh.spec.rollout import rollout_plan

pytestmark = pytest.mark.integration


def spec_plan(version: str) -> Plan:
    return plan_cluster(parse_spec({
        "cluster": "demo", "tee": "simulated", "kms": {"count": 0},  # the agents' own keys
        "workload_groups": {"web": {"replicas": 2, "command": f"serve --{version}",
                                    "backends": {"web": {"port": 8080}}}},
    }))  # fmt: skip


class Operator:
    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh

    def publish(self, policy: dict[str, Any]) -> list[str]:
        """Write ``policy`` as the coordinator's policy file and reload it; the peers revoked."""
        (self.mesh.tmp / "cluster.yaml").write_text(yaml.safe_dump(policy))
        state = self.mesh.tmp / "coordinator"
        result = run_teemesh(["admin", "--url", self.mesh.url, "--ca", str(state / "mesh-ca.crt"),
                              "--token-file", str(state / "admin.token"), "reload", "--json"],
                             self.mesh.tmp / "reload.log")  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        return [f"{r['group']}/{r['peer_id']}" for r in json.loads(result.stdout)["revoked"]]

    @contextlib.contextmanager
    def boot(self, peer: str, compose: bytes, version: str) -> Iterator[AgentClient]:
        """``peer``'s CVM booted with ``compose``: the same instance id on every boot."""
        instance = f"{peer}-instance".encode().hex()[:40].ljust(40, "0")
        agent_cm, sock = self.mesh.agent(f"{peer}-{version}", compose, "--instance-id", instance)
        with agent_cm, AgentClient(str(sock)) as agent:
            yield agent

    def admit(self, agent: AgentClient, peer: str) -> Svid:
        return AdmissionClient(self.mesh.url, self.mesh.pinned, agent).admit("demo", "web", peer)


@pytest.fixture()
def operator(tmp_path: Path) -> Iterator[Operator]:
    mesh = Mesh(tmp_path)
    (tmp_path / "cluster.yaml").write_text(
        yaml.safe_dump(cluster_policy(spec_plan("v1"), "platform.pub"))
    )
    agent_cm, agent_sock = mesh.coordinator_agent()
    with agent_cm, mesh.start_coordinator(agent_sock, "coordinator"):
        yield Operator(mesh)


def test_the_planned_steps_move_every_replica_without_refusing_one(operator: Operator) -> None:
    old, new = spec_plan("v1"), spec_plan("v2")
    v1, v2 = group_app_compose(old.spec, "web"), group_app_compose(new.spec, "web")
    rollout = rollout_plan(old, new, "platform.pub")
    assert [(s.action, s.target) for s in rollout.steps] == [
        ("publish", "transition"), ("replace", "web-0"), ("replace", "web-1"), ("publish", "final")
    ]  # fmt: skip
    with contextlib.ExitStack() as running:
        live = {
            peer: running.enter_context(operator.boot(peer, v1, "v1"))
            for peer in ("web-0", "web-1")
        }
        for peer, agent in live.items():
            operator.admit(agent, peer)
        for step in rollout.steps:
            if step.action == "publish":
                assert step.policy is not None
                assert operator.publish(step.policy) == []
                continue
            # the replica reboots with the new code; the one not yet moved still renews
            live.pop(step.target)
            agent = running.enter_context(operator.boot(step.target, v2, "v2"))
            operator.admit(agent, step.target)
            for peer, other in live.items():
                operator.admit(other, peer)
            live[step.target] = agent


def test_the_final_policy_refuses_the_old_code(operator: Operator) -> None:
    old, new = spec_plan("v1"), spec_plan("v2")
    v1 = group_app_compose(old.spec, "web")
    rollout = rollout_plan(old, new, "platform.pub")
    final = rollout.steps[-1].policy
    assert final is not None
    with operator.boot("web-1", v1, "v1") as agent:
        operator.admit(agent, "web-1")
        assert operator.publish(final) == ["web/web-1"]  # its old certificate, at once
        with pytest.raises(AdmissionRefused, match="COMPOSE_HASH_NOT_ALLOWED"):
            operator.admit(agent, "web-1")
