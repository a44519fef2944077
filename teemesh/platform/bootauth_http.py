"""HTTP edge of boot authorization: dstack's auth webhook API, as auth-simple serves it.

``GET /`` gives the metadata the KMS republishes in GetMeta; ``POST /bootAuth/app`` and
``POST /bootAuth/kms`` take a camelCase BootInfo and answer ``{isAllowed, reason, gatewayAppId}``.
A body that is not a BootInfo gets HTTP 400 ``{"error": ...}`` naming the field. Any authorizer
can sit behind it; with ``ConfigAuth`` the config file is re-read on every request.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from teemesh.encoding import load_json
from teemesh.errors import InputError, MeshError
from teemesh.platform.bootauth import BootAuthorizer, BootDecision, BootInfo, BootKind
from teemesh.platform.prpc import error_response, read_body, run_app

MAX_BODY = 256 * 1024
DecisionHook = Callable[[BootKind, BootInfo, BootDecision], None]


def _decide(authorizer: BootAuthorizer, info: BootInfo, kind: BootKind) -> BootDecision:
    try:
        return authorizer.authorize(info, kind)
    except MeshError as exc:  # an authorizer that could not decide: deny, as auth-simple does
        return BootDecision.deny(str(exc))


def create_app(authorizer: BootAuthorizer, *, on_decision: DecisionHook | None = None) -> FastAPI:
    """The auth API over ``authorizer``; ``on_decision`` sees every answered request (logging)."""
    app = FastAPI(title="teemesh boot authorization", docs_url=None, redoc_url=None)

    @app.get("/")
    async def meta() -> Response:
        try:
            info = await run_in_threadpool(authorizer.info)
        except MeshError as exc:
            return JSONResponse({"status": "error", "message": str(exc)}, status_code=500)
        return JSONResponse(info.to_json())

    async def boot(kind: BootKind, request: Request) -> Response:
        try:
            info = BootInfo.from_json(load_json(await read_body(request, MAX_BODY), field="body"))
        except InputError as exc:
            return error_response(exc)
        # In a worker thread: ConfigAuth reads a file and WebhookAuth waits on the network.
        decision = await run_in_threadpool(_decide, authorizer, info, kind)
        if on_decision is not None:
            on_decision(kind, info, decision)
        return JSONResponse(decision.to_json())

    @app.post("/bootAuth/app")
    async def boot_app(request: Request) -> Response:
        return await boot("app", request)

    @app.post("/bootAuth/kms")
    async def boot_kms(request: Request) -> Response:
        return await boot("kms", request)

    return app


def run(
    authorizer: BootAuthorizer,
    sockets: Sequence[socket.socket],
    *,
    on_decision: DecisionHook | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM, which end in a normal exit (``SystemExit``)."""
    run_app(create_app(authorizer, on_decision=on_decision), sockets)
