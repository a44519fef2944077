"""What ``teemesh render`` writes for a dstack deployment: per app its docker compose, its
app-compose.json and compose hash, and the admission policy that pins them.

Pure: a plan in, file names and bytes out, the same bytes every time. The app-compose bytes are
the ones the local platform boots its CVMs with (``group_app_compose``, ``system_app_compose``),
so the policy written here admits exactly what the CVMs measure, here and on dstack. Apps are
the workload groups, the coordinators, and the gateway when the spec has one; the KMS is
dstack's own on dstack (the policy pins which one, by its key).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from teemesh.attest.dstack import compose_hash, default_app_id
from teemesh.attest.simulated import load_platform_public_key
from teemesh.config import ConfigError
from teemesh.errors import InputError
from teemesh.sidecar.dstack import ENV_INDEX, ENV_PEER_ID
from teemesh.spec.compose import unpinned_images
from teemesh.spec.plan import Plan
from teemesh.spec.render import AppComposes, cluster_policy, system_apps

POLICY_FILE = "cluster-policy.json"
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class RenderedApp:
    """One dstack app: its CVMs share the compose hash (and app id, unless the KMS assigns)."""

    name: str
    app_compose: bytes
    peer_ids: tuple[str, ...]
    compose_hash: str
    docker_compose: str
    allowed_envs: tuple[str, ...]

    @classmethod
    def of(cls, name: str, app_compose: bytes, peer_ids: tuple[str, ...]) -> RenderedApp:
        """The app and what its app-compose says (read once)."""
        doc = json.loads(app_compose)
        digest = compose_hash(app_compose).hex()
        return cls(name, app_compose, peer_ids, digest, doc["docker_compose_file"],
                   tuple(doc["allowed_envs"]))  # fmt: skip


@dataclass(frozen=True)
class Rendered:
    cluster: str
    apps: tuple[RenderedApp, ...]
    """Every app of the cluster: the policy and the manifest are always the whole cluster's."""
    policy: dict[str, Any]
    chosen: tuple[str, ...]
    """The apps whose folders are written."""

    def files(self) -> dict[str, bytes]:
        """Relative path -> bytes: ``<app>/docker-compose.yaml``, ``<app>/app-compose.json``,
        ``<app>/compose-hash`` of the chosen apps, the policy and a manifest."""
        out: dict[str, bytes] = {}
        for app in self.apps:
            if app.name not in self.chosen:
                continue
            out[f"{app.name}/docker-compose.yaml"] = app.docker_compose.encode()
            out[f"{app.name}/app-compose.json"] = app.app_compose
            out[f"{app.name}/compose-hash"] = f"{app.compose_hash}\n".encode()
        out[POLICY_FILE] = _json(self.policy)
        out[MANIFEST_FILE] = _json(self.manifest())
        return out

    def manifest(self) -> dict[str, Any]:
        """What to deploy: per app its hash, default app id, env names and replicas' peer ids."""
        return {
            "cluster": self.cluster,
            "policy": POLICY_FILE,
            "apps": {
                app.name: {
                    "compose_hash": app.compose_hash,
                    "app_id": default_app_id(bytes.fromhex(app.compose_hash)).hex(),
                    "allowed_envs": list(app.allowed_envs),
                    "replicas": [
                        {ENV_PEER_ID: peer, ENV_INDEX: peer.rpartition("-")[2]}
                        for peer in app.peer_ids
                    ],
                }
                for app in self.apps
            },
        }


def render(
    plan: Plan,
    *,
    groups: tuple[str, ...] = (),
    allow_unpinned: bool = False,
    platform_key: str | None = None,
    source: str | None = None,
) -> Rendered:
    """Every app of the plan (or only ``groups``: app names), with the policy for all of them.

    Refuses (every problem at once) an unknown app name, an image without a digest unless
    ``allow_unpinned``, and a TDX cluster whose KMS is not pinned. ``platform_key`` (PEM) pins a
    simulated platform in the policy, which then loads as is. ``source`` (the spec's file) names
    the problems."""
    spec = plan.spec
    composes = AppComposes(plan)
    apps = [
        RenderedApp.of(name, composes.group(name), tuple(c.name for c in plan.replicas(name)))
        for name in spec.workload_groups
    ]
    apps += [
        RenderedApp.of(role, composes.system(role), tuple(c.name for c in plan.of_role(role)))
        for role in system_apps(spec)
    ]
    known = [a.name for a in apps]
    problems = [
        f"--group {name}: no such app; the apps: {', '.join(known)}"
        for name in groups
        if name not in known
    ]
    chosen = [a for a in apps if not groups or a.name in groups]
    if platform_key is not None:
        problems += _platform_key_problems(spec.tee, platform_key)
    if not allow_unpinned:
        unpinned = [(app.name, service, image) for app in chosen
                    for service, image in unpinned_images(app.docker_compose)]  # fmt: skip
        why = "is not pinned by digest (name@sha256:<digest>): a tag can move to other code"
        if any(image == spec.image for _, _, image in unpinned):
            problems.append(f"image: the teemesh image {spec.image!r} {why}")
        problems += [
            f"{app}: services.{service}: image {image!r} {why}"
            for app, service, image in unpinned
            if image != spec.image
        ]
        if unpinned:
            problems.append("pin them, or render with --allow-unpinned-images")
    if spec.kms.count == 0:
        problems.append(
            "kms.count: 0, but on dstack an app's encrypted env (each replica's peer id) and the "
            "coordinators' one CA key come from a KMS: give the cluster one"
        )
    if spec.tee == "tdx" and spec.kms.key_provider_id is None:
        problems.append(
            "kms.key_provider_id: required with tee: tdx, to pin the KMS the CVMs take their "
            "keys from (its root CA's SubjectPublicKeyInfo, DER in hex)"
        )
    if spec.tee == "tdx" and spec.coordinators.policy_signer is None:
        problems.append(
            "coordinators.policy_signer: required with tee: tdx: the coordinators take their "
            "policy from the env, which the host can replace, so only a policy signed by this "
            "key is loaded (teemesh policy keygen)"
        )
    if problems:
        raise ConfigError(source or spec.cluster, problems)
    names = tuple(a.name for a in chosen)
    policy = cluster_policy(plan, platform_key, composes=composes)
    return Rendered(spec.cluster, tuple(apps), policy, names)


def _platform_key_problems(tee: str, pem: str) -> list[str]:
    if tee != "simulated":
        return ["--platform-key: only a tee: simulated cluster has a platform key"]
    try:
        load_platform_public_key(pem.encode())
    except InputError as exc:
        return [f"--platform-key: {exc}"]
    return []


def _json(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode()
