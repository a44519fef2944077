"""dstack-vpc's VPC API (register, node updates, discovery), served from the catalog store.

Callers are admitted peers presenting their SVID, checked exactly as for the catalog (TLS
against the mesh CA, then a live certificate of the peer's admission); their app id is the
attested one in that SVID, never a header (dstack-vpc's ``x-dstack-app-id``). The policy in
force decides, per request, whether the API is on (its ``vpc`` section; else 404) and which
apps it allows, so a reload takes effect at once on every coordinator. Refusals keep
dstack-vpc's bodies, ``{"error": "Unauthorized"}`` (401) and ``{"error": "Forbidden"}``
(403); the reason goes to the log. Shapes and validation: ``coordinator.vpc``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from starlette.exceptions import HTTPException

from teemesh.catalog.store import Store
from teemesh.coordinator import vpc
from teemesh.coordinator.catalog import Caller, Unauthenticated
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


def _params(request: Request) -> vpc.Query:
    return request.query_params.multi_items()


async def _authorize(request: Request, log: Log) -> Caller:
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
    return caller


async def _all_nodes(request: Request) -> list[vpc.Node]:
    snapshot = await coordinator_of(request).store.range(vpc.NODES)
    return [vpc.Node.from_bytes(kv.value) for kv in snapshot.kvs]


async def _merge_into_store(store: Store, change: vpc.NodeUpdate) -> str:
    """Compare-and-set: two coordinators merging into one node at once lose neither change."""
    key = vpc.node_key(change.uuid)
    while True:
        held = await store.get(key)
        old = vpc.Node.from_bytes(held.value) if held is not None else None
        node = vpc.merge(old, change)
        if node == old or (await store.replace(key, node.to_bytes(), held)).succeeded:
            return "created" if old is None else "updated"


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
        caller = await _authorize(request, log)
        try:
            wanted = vpc.parse_register(_params(request))
        except vpc.MissingParameter as exc:
            raise HTTPException(400, exc.problem) from exc
        if shared_key is None:
            raise HTTPException(503, "this coordinator has no VPC shared key")
        log(f"vpc: {caller.svid.peer} registered node {wanted.node_name} ({wanted.instance_id})")
        return vpc.register_reply(shared_key, str(request.base_url).rstrip("/"))

    @app.post("/api/nodes/update")
    async def update(request: Request) -> dict[str, Any]:
        caller = await _authorize(request, log)
        try:
            change = vpc.parse_update(_params(request))
        except vpc.MissingParameter as exc:
            raise HTTPException(400, exc.problem) from exc
        status = await _merge_into_store(coordinator_of(request).store, change)
        log(f"vpc: {caller.svid.peer} {status} node {change.uuid}")
        return {"status": status}

    @app.delete("/api/nodes/{uuid}")
    async def delete(uuid: str, request: Request) -> dict[str, Any]:
        caller = await _authorize(request, log)
        key = vpc.node_key(vpc.check_token(uuid, "uuid"))
        if await coordinator_of(request).store.delete(key) is None:
            raise HTTPException(404, f"No node {uuid} found")
        log(f"vpc: {caller.svid.peer} deleted node {uuid}")
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
