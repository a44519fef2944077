"""The admin API: list admissions, revoke a peer, reload the policy. Behind its own credential.

The credential is a bearer token, separate from anything a CVM holds: an SVID opens the
catalog, never this. Only the token's SHA-256 is kept in memory, compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Request
from pydantic import StringConstraints

from teemesh.checks import Label
from teemesh.config import Frozen
from teemesh.coordinator.errors import NotRegistered
from teemesh.coordinator.http_util import Log, coordinator_of, json_body
from teemesh.coordinator.policy import ClusterPolicy, parse_cluster_policy
from teemesh.coordinator.records import parse_request
from teemesh.coordinator.service import Coordinator
from teemesh.errors import InputError, MeshError
from teemesh.fsutil import write_private
from teemesh.platform.prpc import read_body

PolicySource = Callable[[], ClusterPolicy]
"""Reads the policy file again (a reload picks up what the operator changed)."""
MIN_TOKEN_LEN = 32
MAX_REASON_LEN = 1024
"""A revocation reason is stored with the admission and each revoked certificate: keep it short."""


class AdminDenied(MeshError):
    """No or a wrong admin token: HTTP 401."""


@dataclass(frozen=True)
class AdminAuth:
    digest: bytes

    @classmethod
    def from_file(cls, path: Path, *, create: bool) -> AdminAuth:
        """The token in ``path``; with ``create``, a new random one is written there first."""
        if create and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_private(path, (secrets.token_urlsafe(32) + "\n").encode())
        try:
            token = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read the admin token: {exc}", field=str(path)) from exc
        return cls.from_token(token, str(path))

    @classmethod
    def from_token(cls, token: str, source: str) -> AdminAuth:
        """``token`` itself (from ``source``, which names it in a problem): only its digest is
        kept."""
        token = token.strip()
        if len(token) < MIN_TOKEN_LEN:
            raise InputError(f"an admin token needs {MIN_TOKEN_LEN}+ characters", field=source)
        return cls(hashlib.sha256(token.encode()).digest())

    def check(self, request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = hashlib.sha256(token.strip().encode()).digest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self.digest):
            raise AdminDenied("the admin API needs 'Authorization: Bearer <admin token>'")


class RevokeRequest(Frozen):
    group: Label
    peer_id: Label
    reason: Annotated[str, StringConstraints(max_length=MAX_REASON_LEN)] = (
        "revoked by an administrator"
    )


async def reload_policy(coordinator: Coordinator, source: PolicySource, log: Log) -> dict[str, Any]:
    """Read the policy file again and publish it; what it no longer admits is revoked."""
    return await _publish(coordinator, source(), log)


async def _publish(coordinator: Coordinator, policy: ClusterPolicy, log: Log) -> dict[str, Any]:
    epoch, revoked = await coordinator.publish_policy(policy)
    for r in revoked:
        log(f"revoked {r.group}/{r.peer_id} ({len(r.serials)} certificates): {r.reason}")
    log(f"policy epoch {epoch.epoch} ({epoch.digest[:12]}) in force")
    return {"epoch": epoch.epoch, "digest": epoch.digest, "revoked": [r.to_json() for r in revoked]}


def add_admin_routes(
    app: FastAPI,
    admin: AdminAuth,
    source: PolicySource | None,
    log: Log,
    *,
    signer: str | None = None,
) -> None:
    """``signer``: the key whose signed policies ``POST /v1/admin/policy`` publishes (without
    one, the policy comes only from the coordinator's file or env, by a reload)."""

    @app.get("/v1/admin/admissions")
    async def admissions(request: Request) -> dict[str, Any]:
        admin.check(request)
        records = await coordinator_of(request).admissions()
        return {"admissions": [r.to_public() for r in records]}

    @app.post("/v1/admin/revoke")
    async def revoke(request: Request) -> dict[str, Any]:
        admin.check(request)
        ask = parse_request(RevokeRequest, await json_body(request))
        done = await coordinator_of(request).revoke_peer(ask.group, ask.peer_id, ask.reason)
        if done is None:
            raise NotRegistered(f"{ask.group}/{ask.peer_id} has no admission")
        log(f"admin revoked {done.group}/{done.peer_id} ({len(done.serials)} certificates)")
        return done.to_json()

    @app.get("/v1/admin/policy")
    async def policy(request: Request) -> dict[str, Any]:
        admin.check(request)
        epoch = await coordinator_of(request).current()
        return {
            "epoch": epoch.epoch,
            "digest": epoch.digest,
            "published_at": epoch.published_at,
            "policy": epoch.policy.model_dump(mode="json"),
        }

    @app.post("/v1/admin/policy")
    async def publish(request: Request) -> dict[str, Any]:
        admin.check(request)
        if signer is None:
            raise InputError(
                "this coordinator publishes no uploaded policy (it has no policy signer): "
                "change its policy file or env, then reload",
                field="policy",
            )
        text = (await read_body(request)).decode("utf-8", "replace")
        policy = parse_cluster_policy(text, "the uploaded policy", signer=signer)
        return await _publish(coordinator_of(request), policy, log)

    @app.post("/v1/admin/policy/reload")
    async def reload(request: Request) -> dict[str, Any]:
        admin.check(request)
        if source is None:
            raise InputError("this coordinator has no policy file to reload", field="policy")
        return await reload_policy(coordinator_of(request), source, log)
