"""dstack-vpc's VPC API (register, node updates, discovery), served from the catalog store.

Callers are admitted peers presenting their SVID, checked exactly as for the catalog (TLS
against the mesh CA, then a live certificate of the peer's admission); their app id is the
attested one in that SVID, never a header (dstack-vpc's ``x-dstack-app-id``). The policy in
force decides, per request, whether the API is on (its ``vpc`` section; else 404) and which
apps it allows, so a reload takes effect at once on every coordinator. Refusals keep
dstack-vpc's bodies, ``{"error": "Unauthorized"}`` (401) and ``{"error": "Forbidden"}``
(403); the reason goes to the log. Shapes and validation: ``coordinator.vpc``.

A node belongs to the app that created it: another app's update or delete gets 403 (and the
log names both). A create past ``vpc.MAX_NODES_PER_APP`` or ``vpc.MAX_NODES`` gets 429.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from starlette.exceptions import HTTPException

from teemesh.catalog.store import Store
from teemesh.coordinator import vpc
from teemesh.coordinator.catalog import Unauthenticated
from teemesh.coordinator.http_util import Log, catalog_of, coordinator_of
from teemesh.coordinator.policy import VpcPolicy
from teemesh.errors import Refused
from teemesh.platform.prpc import PEER_CERT


async def _policy(request: Request) -> VpcPolicy:
    """The ``vpc`` section in force cluster-wide; 404 when there is none (the API is off)."""
    section = (await coordinator_of(request).current()).policy.vpc
    if section is None:
        raise HTTPException(404, "the VPC API is off (the cluster policy has no vpc section)")
    return section


T = TypeVar("T")


def _parse(request: Request, parse: Callable[[vpc.Query], T]) -> T:
    """The query parsed by ``parse``; a missing parameter is dstack's bare 400 reply, any other
    malformed one our 400 naming its field (the ``InputError`` handler)."""
    try:
        return parse(request.query_params.multi_items())
    except vpc.MissingParameter as exc:
        raise HTTPException(400, exc.problem) from exc


async def _authorize(request: Request, log: Log) -> vpc.Owner:
    """The caller, if the API is on and its policy section allows the app in the SVID."""
    section = await _policy(request)
    try:
        caller = await catalog_of(request).authenticate(getattr(request.state, PEER_CERT, None))
    except Unauthenticated as exc:
        log(f"vpc: {request.url.path}: unauthorized: {exc}")
        raise HTTPException(401, "Unauthorized") from exc
    except Refused as exc:  # revoked or superseded: a known peer, refused
        log(f"vpc: {request.url.path}: forbidden: {exc}")
        raise HTTPException(403, "Forbidden") from exc
    app_id = caller.svid.app_id
    if app_id is None:
        log(f"vpc: {caller.svid.peer}: unauthorized: its certificate carries no app id")
        raise HTTPException(401, "Unauthorized")
    if not section.allows(app_id.hex()):
        log(f"vpc: {caller.svid.peer}: forbidden: app {app_id.hex()} is not in vpc.allowed_apps")
        raise HTTPException(403, "Forbidden")
    return vpc.Owner(app_id.hex(), caller.group, caller.peer_id)


async def _nodes_in(store: Store) -> list[vpc.Node]:
    snapshot = await store.range(vpc.NODES)
    return [vpc.Node.from_bytes(kv.value) for kv in snapshot.kvs]


async def _all_nodes(request: Request) -> list[vpc.Node]:
    return await _nodes_in(coordinator_of(request).store)


def _check_owner(node: vpc.Node, who: vpc.Owner, action: str, log: Log) -> None:
    if not vpc.may_change(node, who.app_id):
        log(f"vpc: {who}: forbidden: may not {action} node {node.uuid}, created by {node.owner}")
        raise HTTPException(403, "Forbidden")


async def _merge_into_store(store: Store, change: vpc.NodeUpdate, who: vpc.Owner, log: Log) -> str:
    """Compare-and-set: two coordinators merging into one node at once lose neither change,
    and the owner checked is the owner of what is replaced."""
    key = vpc.node_key(change.uuid)
    while True:
        held = await store.get(key)
        old = vpc.Node.from_bytes(held.value) if held is not None else None
        if old is None:
            try:
                vpc.check_room(await _nodes_in(store), who.app_id)
            except vpc.NodeLimit as exc:
                log(f"vpc: {who}: refused node {change.uuid}: {exc}")
                raise HTTPException(429, str(exc)) from exc
        else:
            _check_owner(old, who, "update", log)
        node = vpc.merge(old, change, who)
        if node == old or (await store.replace(key, node.to_bytes(), held)).succeeded:
            if old is not None and old.owner is None:
                log(f"vpc: {who} claimed node {change.uuid}, which had no owner")
            return "created" if old is None else "updated"


async def _delete_from_store(store: Store, uuid: str, who: vpc.Owner, log: Log) -> bool:
    """Compare-and-delete, so the owner checked is the owner of what is deleted; False: none."""
    key = vpc.node_key(uuid)
    while True:
        held = await store.get(key)
        if held is None:
            return False
        _check_owner(vpc.Node.from_bytes(held.value), who, "delete", log)
        if (await store.delete_if(key, mod_revision=held.mod_revision)).succeeded:
            return True


def add_vpc_routes(app: FastAPI, shared_key: bytes | None, log: Log) -> None:
    """``shared_key``: the nodes' shared key (``vpc.derive_shared_key``); None: registration
    answers 503, the rest works."""

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> PlainTextResponse:
        """Liveness, as dstack-vpc answers it: no authentication, says nothing else."""
        return PlainTextResponse("OK")

    @app.get("/api/ping")
    async def ping(request: Request) -> PlainTextResponse:
        await _policy(request)
        return PlainTextResponse("pong")

    @app.get("/api/register")
    async def register(request: Request) -> dict[str, Any]:
        who = await _authorize(request, log)
        wanted = _parse(request, vpc.parse_register)
        if shared_key is None:
            raise HTTPException(503, "this coordinator has no VPC shared key")
        log(f"vpc: {who.peer} registered node {wanted.node_name} ({wanted.instance_id})")
        return vpc.register_reply(shared_key, str(request.base_url).rstrip("/"))

    @app.post("/api/nodes/update")
    async def update(request: Request) -> dict[str, Any]:
        who = await _authorize(request, log)
        change = _parse(request, vpc.parse_update)
        status = await _merge_into_store(coordinator_of(request).store, change, who, log)
        log(f"vpc: {who} {status} node {change.uuid}")
        return {"status": status}

    @app.delete("/api/nodes/{uuid}")
    async def delete(uuid: str, request: Request) -> dict[str, Any]:
        who = await _authorize(request, log)
        vpc.check_token(uuid, "uuid")
        if not await _delete_from_store(coordinator_of(request).store, uuid, who, log):
            raise HTTPException(404, f"No node {uuid} found")
        log(f"vpc: {who} deleted node {uuid}")
        return {"status": "deleted"}

    @app.get("/api/discover/{node_type}")
    async def discover(node_type: str, request: Request) -> dict[str, Any]:
        await _authorize(request, log)
        vpc.check_node_type(node_type)
        reply = vpc.discover_reply(await _all_nodes(request), node_type)
        if reply is None:
            raise HTTPException(404, f"No {node_type} nodes found")
        return reply

    @app.get("/api/nodes")
    async def nodes(request: Request) -> dict[str, Any]:
        await _authorize(request, log)
        return vpc.nodes_reply(await _all_nodes(request))
