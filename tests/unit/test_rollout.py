"""Rolling upgrades: the order of the replicas and the policy at each step (``spec.rollout``)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from teemesh.attest.dstack import compose_hash
from teemesh.cli import cli
from teemesh.errors import InputError
from teemesh.spec import cluster_policy, group_app_compose, parse_spec, plan_cluster
from teemesh.spec.plan import Plan
from teemesh.spec.rollout import rollout_plan, transition_policy

OLD: dict[str, Any] = {
    "cluster": "shop",
    "tee": "simulated",
    "workload_groups": {
        "web": {"replicas": 2, "command": "serve --v1", "backends": {"web": {"port": 8080}}},
        "db": {"command": "db", "backends": {"db": {"port": 5432}},
               "routes": {"db": {"backend": "db", "callers": ["web"]}}},
    },
}  # fmt: skip


def plan(change: dict[str, Any] | None = None, **web: Any) -> Plan:
    doc = copy.deepcopy(OLD)
    doc["workload_groups"]["web"].update(web)
    doc["workload_groups"].update(change or {})
    return plan_cluster(parse_spec(doc))


def hash_of(p: Plan, group: str) -> str:
    return compose_hash(group_app_compose(p.spec, group)).hex()


def test_new_code_moves_one_replica_at_a_time_between_two_policies() -> None:
    old, new = plan(), plan(command="serve --v2")
    rollout = rollout_plan(old, new)
    assert rollout.changed == ("web",)
    assert [(s.action, s.target) for s in rollout.steps] == [
        ("publish", "transition"), ("replace", "web-0"), ("replace", "web-1"), ("publish", "final")
    ]  # fmt: skip
    transition, final = rollout.steps[0].policy, rollout.steps[-1].policy
    assert transition is not None and final is not None
    assert transition["groups"]["web"]["compose_hashes"] == [
        hash_of(old, "web"),
        hash_of(new, "web"),
    ]
    assert final == cluster_policy(new)
    assert final["groups"]["web"]["compose_hashes"] == [hash_of(new, "web")]
    assert transition["groups"]["db"] == final["groups"]["db"]  # untouched groups as they are


def test_nothing_changed_nothing_to_do() -> None:
    assert rollout_plan(plan(), plan()).steps == ()


def test_more_or_fewer_replicas_add_or_remove_the_last_ones() -> None:
    grown = rollout_plan(plan(), plan(replicas=3))
    assert [(s.action, s.target) for s in grown.steps[1:-1]] == [("add", "web-2")]
    grown_and_new = rollout_plan(plan(), plan(replicas=3, command="serve --v2"))
    assert [(s.action, s.target) for s in grown_and_new.steps[1:-1]] == [
        ("replace", "web-0"), ("replace", "web-1"), ("add", "web-2")
    ]  # fmt: skip
    shrunk = rollout_plan(plan(replicas=3), plan())
    assert [(s.action, s.target) for s in shrunk.steps[1:-1]] == [("remove", "web-2")]
    transition = shrunk.steps[0].policy
    assert transition is not None
    assert transition["groups"]["web"]["peer_ids"] == ["web-0", "web-1", "web-2"]
    final = shrunk.steps[-1].policy
    assert final is not None and final["groups"]["web"]["peer_ids"] == ["web-0", "web-1"]


def test_a_group_that_comes_or_goes_is_admitted_only_while_it_runs() -> None:
    cache = {"cache": {"command": "cache", "backends": {"cache": {"port": 6379}}}}
    added = rollout_plan(plan(), plan(cache))
    assert [(s.action, s.target) for s in added.steps[1:-1]] == [("add", "cache-0")]
    removed = rollout_plan(plan(cache), plan())
    assert [(s.action, s.target) for s in removed.steps[1:-1]] == [("remove", "cache-0")]
    transition, final = removed.steps[0].policy, removed.steps[-1].policy
    assert transition is not None and final is not None
    assert "cache" in transition["groups"] and "cache" not in final["groups"]


def test_the_transition_unites_every_list_of_a_group() -> None:
    before = {"groups": {"g": {"compose_hashes": ["a"], "os_images": ["i"], "peer_ids": ["g-0"],
                               "services": ["s"]}}}  # fmt: skip
    after = {"cluster": "c", "groups": {"g": {"compose_hashes": ["b"], "os_images": ["i"],
                                              "peer_ids": ["g-0"], "services": ["s", "t"]}}}  # fmt: skip
    assert transition_policy(before, after) == {"cluster": "c", "groups": {"g": {
        "compose_hashes": ["a", "b"], "os_images": ["i"], "peer_ids": ["g-0"],
        "services": ["s", "t"]}}}  # fmt: skip


def test_a_rollout_stays_in_one_cluster() -> None:
    other = copy.deepcopy(OLD) | {"cluster": "elsewhere"}
    with pytest.raises(InputError, match="one cluster"):
        rollout_plan(plan(), plan_cluster(parse_spec(other)))


def test_the_command_prints_the_steps_and_with_json_the_policies(tmp_path: Path) -> None:
    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old.write_text(yaml.safe_dump(OLD))
    doc = copy.deepcopy(OLD)
    doc["workload_groups"]["web"]["command"] = "serve --v2"
    new.write_text(yaml.safe_dump(doc))
    runner = CliRunner()
    shown = runner.invoke(cli, ["rollout", "plan", str(old), str(new)])
    assert shown.exit_code == 0, shown.output
    assert "replace" in shown.output and "web-1" in shown.output
    printed = runner.invoke(cli, ["rollout", "plan", str(old), str(new), "--json"])
    assert printed.exit_code == 0, printed.output
    doc_out = json.loads(printed.output)
    assert doc_out["changed"] == ["web"]
    assert len(doc_out["steps"][0]["policy"]["groups"]["web"]["compose_hashes"]) == 2
    same = runner.invoke(cli, ["rollout", "plan", str(old), str(old)])
    assert same.exit_code == 0 and "nothing to roll out" in same.output
