"""A rolling upgrade from one spec to the next: the order of the replicas and the admission
policy in force at each step.

Pure: two plans in, the steps out. While a group's replicas move from the old app-compose to the
new one, the policy admits both compose hashes (and both sets of peer ids and services), so the
replicas not yet replaced keep their certificates and serve; once every replica runs the new
code, the final policy admits only the new hash, and publishing it revokes whatever still holds
an old one (the coordinator revokes what a policy no longer admits). Replicas move one at a
time, each only once the one before is admitted and healthy again, so a group never loses more
than one replica's capacity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from teemesh.errors import InputError
from teemesh.spec.plan import Plan
from teemesh.spec.render import cluster_policy

Action = Literal["publish", "replace", "add", "remove"]


@dataclass(frozen=True)
class Step:
    action: Action
    """publish: make ``policy`` the coordinators' policy (write it, ``teemesh admin reload``);
    replace/add/remove: boot a replica with the new app-compose, boot a new one, stop one."""
    target: str
    """The CVM (``<group>-<index>``), or ``transition`` / ``final`` for a policy."""
    wait: str
    """What must hold before the next step."""
    policy: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"action": self.action, "target": self.target, "wait": self.wait}
        return doc | ({"policy": self.policy} if self.policy is not None else {})


@dataclass(frozen=True)
class Rollout:
    changed: tuple[str, ...]
    """Groups whose replicas change: a new compose hash, or another replica count."""
    steps: tuple[Step, ...]

    def to_json(self) -> dict[str, Any]:
        return {"changed": list(self.changed), "steps": [s.to_json() for s in self.steps]}


def rollout_plan(old: Plan, new: Plan, platform_key: str | None = None) -> Rollout:
    """The steps from ``old`` to ``new`` (the same cluster); none when nothing changes."""
    if old.cluster != new.cluster:
        raise InputError(
            f"a rollout stays in one cluster ({old.cluster} → {new.cluster})", field="cluster"
        )
    before, after = cluster_policy(old, platform_key), cluster_policy(new, platform_key)
    was, now = _workloads(old, before), _workloads(new, after)
    changed = tuple(name for name in sorted(set(was) | set(now)) if was.get(name) != now.get(name))
    if not changed and before == after:
        return Rollout((), ())
    wait = "every coordinator has published it"
    steps = [Step("publish", "transition", wait, transition_policy(before, after))]
    for group in changed:
        (old_hash, old_count), (new_hash, new_count) = was.get(group, _NONE), now.get(group, _NONE)
        new_code = None not in (old_hash, new_hash) and old_hash != new_hash
        steps += _replica_steps(group, old_count, new_count, new_code)
    steps.append(Step("publish", "final", "the old hashes' certificates are revoked", after))
    return Rollout(changed, tuple(steps))


def transition_policy(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """``after``, with every group still admitting what ``before`` admitted: the union of their
    compose hashes, OS images, peer ids and services (a group only one side has, as it is)."""
    groups: dict[str, Any] = {}
    for name in [*after["groups"], *(g for g in before["groups"] if g not in after["groups"])]:
        old, new = before["groups"].get(name), after["groups"].get(name)
        if old is None or new is None:
            groups[name] = new or old
            continue
        groups[name] = {key: _union(old.get(key, []), new.get(key, [])) for key in new}
    return after | {"groups": groups}


def _replica_steps(group: str, old: int, new: int, new_code: bool) -> list[Step]:
    """Replicas beyond the old count are added, beyond the new one removed; the others are
    replaced only when their code (compose hash) changes."""
    steps = []
    for index in range(max(old, new)):
        cvm = f"{group}-{index}"
        if index >= old:
            steps.append(Step("add", cvm, "admitted, backends passing"))
        elif index >= new:
            steps.append(Step("remove", cvm, "gone from the catalog"))
        elif new_code:
            steps.append(Step("replace", cvm, "admitted again, backends passing"))
    return steps


_NONE: tuple[str | None, int] = (None, 0)


def _workloads(plan: Plan, policy: dict[str, Any]) -> dict[str, tuple[str | None, int]]:
    """Each workload group's compose hash and replica count, as its policy admits them."""
    return {
        name: (policy["groups"][name]["compose_hashes"][0], len(policy["groups"][name]["peer_ids"]))
        for name in plan.spec.workload_groups
    }


def _union(first: list[Any], second: list[Any]) -> list[Any]:
    return [*first, *(item for item in second if item not in first)]
