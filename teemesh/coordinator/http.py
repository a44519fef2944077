"""HTTP edge of the coordinator: admission, the catalog for sidecars, and the admin API.

One TLS port with an RA-TLS certificate. Admission needs no client certificate; the catalog
needs the peer's SVID (verified by TLS against the mesh CA, then by ``Catalog.authenticate``);
the admin API needs the admin bearer token; dstack-vpc's VPC API (``http_vpc``) needs an SVID
of an app its policy section allows. Errors map from the exception class, once, here:
400 ``{"error", "field"}`` malformed, 401 no SVID, 403 refused, 404/410 not registered, 503
store trouble. Nothing a client sends yields a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from teemesh.coordinator.admission import AdmissionRequest
from teemesh.coordinator.catalog import Catalog, Unauthenticated
from teemesh.coordinator.errors import AdmissionRefused, NotRegistered
from teemesh.coordinator.http_admin import (
    AdminAuth,
    AdminDenied,
    PolicySource,
    add_admin_routes,
    reload_policy,
)
from teemesh.coordinator.http_catalog import add_catalog_routes
from teemesh.coordinator.http_util import Log, coordinator_of, json_body
from teemesh.coordinator.http_vpc import add_vpc_routes
from teemesh.coordinator.records import PolicyEpoch
from teemesh.coordinator.service import Coordinator
from teemesh.errors import InputError, MeshError, Refused
from teemesh.identity.certs import cert_pem
from teemesh.net.sse import WATCH_KEEPALIVE

Factory = Callable[[], Awaitable[Coordinator]]


def _log(message: str) -> None:
    print(f"coordinator: {message}", file=sys.stderr, flush=True)


def error_reply(exc: MeshError) -> JSONResponse:
    """The one mapping from our exceptions to HTTP statuses."""
    if isinstance(exc, AdmissionRefused):
        reasons = [r.to_json() for r in exc.refusals]
        return JSONResponse({"error": "refused", "reasons": reasons}, status_code=403)
    if isinstance(exc, InputError):
        return JSONResponse({"error": str(exc), "field": exc.field}, status_code=400)
    status = 503
    if isinstance(exc, Unauthenticated | AdminDenied):
        status = 401
    elif isinstance(exc, Refused):
        status = 403
    elif isinstance(exc, NotRegistered):
        status = exc.status
    return JSONResponse({"error": str(exc)}, status_code=status)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own replies (404, 405) in our shape: ``{"error"}``, not ``{"detail"}``."""
    return JSONResponse({"error": str(exc.detail)}, exc.status_code, headers=exc.headers)


async def start(coordinator: Coordinator, log: Log) -> None:
    own = PolicyEpoch.digest_of(coordinator.policy)
    epoch, revoked = await coordinator.start()
    log(f"policy epoch {epoch.epoch} ({epoch.digest[:12]}) in force, {len(revoked)} revoked")
    if epoch.digest != own:
        in_force, mine = epoch.policy.serial, coordinator.policy.serial
        if in_force is not None and (mine is None or mine <= in_force):  # never published
            log(f"this coordinator's policy ({own[:12]}) is no later than the signed one in "
                "force, which stays")  # fmt: skip
        else:
            log(f"this coordinator's policy ({own[:12]}) differs from the one in force; reload "
                "(SIGHUP or teemesh admin reload) to publish it")  # fmt: skip


def create_app(
    make: Factory,
    *,
    admin: AdminAuth | None = None,
    policy_source: PolicySource | None = None,
    reload_on_sighup: bool = False,
    watch_keepalive: float = WATCH_KEEPALIVE,
    vpc_shared_key: bytes | None = None,
    policy_signer: str | None = None,
    log: Log = _log,
) -> FastAPI:
    """``make`` runs on the serving event loop, where the async store must be opened.

    ``vpc_shared_key``: what the VPC API hands registering nodes (``vpc.derive_shared_key``).
    ``policy_signer``: the admin API publishes policies this key signed (``policy_signing``).

    With ``reload_on_sighup``, SIGHUP reloads the policy from ``policy_source`` (as the admin
    API does); a policy file with errors is reported and the policy in force stays.
    """
    reloads: set[asyncio.Task[None]] = set()

    async def reload(coordinator: Coordinator) -> None:
        assert policy_source is not None
        try:
            await reload_policy(coordinator, policy_source, log)
        except MeshError as exc:
            log(f"policy reload failed, the policy in force stays: {exc}")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        coordinator = await make()
        try:
            await start(coordinator, log)
            app.state.coordinator = coordinator
            app.state.catalog = Catalog(coordinator)
            if reload_on_sighup and policy_source is not None:
                loop = asyncio.get_running_loop()

                def on_sighup() -> None:
                    task = loop.create_task(reload(coordinator))
                    reloads.add(task)
                    task.add_done_callback(reloads.discard)

                loop.add_signal_handler(signal.SIGHUP, on_sighup)
            yield
        finally:
            await coordinator.store.aclose()

    app = FastAPI(title="teemesh coordinator", docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.exception_handler(MeshError)
    async def mesh_error(request: Request, exc: MeshError) -> Response:
        return error_reply(exc)

    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]

    @app.post("/v1/admission/challenge")
    async def challenge(request: Request) -> dict[str, Any]:
        return await coordinator_of(request).challenge()

    @app.post("/v1/admission/attest")
    async def attest(request: Request) -> Response:
        try:
            # parsing and verifying a quote is CPU work: keep the event loop free meanwhile
            doc = await json_body(request)
            admission = await run_in_threadpool(AdmissionRequest.from_json, doc)
        except InputError as exc:
            log(f"admission: malformed request: {exc}")
            return error_reply(exc)
        peer = f"{admission.group}/{admission.peer_id}"
        try:
            reply = await coordinator_of(request).attest(admission)
        except AdmissionRefused as exc:
            codes = ",".join(r.code for r in exc.refusals)
            log(f"admission refused for {peer}: {codes}: {exc}")
            return error_reply(exc)
        except MeshError as exc:
            log(f"admission failed for {peer}: {exc}")
            return error_reply(exc)
        log(f"admitted {peer} as {reply['spiffe_id']} until {reply['expires_at']}")
        return JSONResponse(reply)

    @app.get("/v1/ca")
    async def ca(request: Request) -> dict[str, str]:
        return {"ca_certificate": cert_pem(coordinator_of(request).ca_cert)}

    add_catalog_routes(app, log, watch_keepalive)
    add_vpc_routes(app, vpc_shared_key, log)
    if admin is not None:
        add_admin_routes(app, admin, policy_source, log, signer=policy_signer)
    return app
