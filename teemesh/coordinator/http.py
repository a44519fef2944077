"""HTTP edge of the coordinator: the admission API (JSON over TLS with an RA-TLS certificate).

400 ``{"error", "field"}`` for malformed input, 403 ``{"error": "refused", "reasons": [{code,
message}]}`` for a refusal (logged with the peer it concerns), never a 500 for anything a
client sends.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from teemesh.coordinator.admission import AdmissionRequest
from teemesh.coordinator.service import AdmissionRefused, Coordinator
from teemesh.encoding import load_json
from teemesh.errors import InputError, MeshError
from teemesh.identity.certs import cert_pem
from teemesh.platform.prpc import read_body


def _log(message: str) -> None:
    print(f"coordinator: {message}", file=sys.stderr, flush=True)


def _bad(exc: InputError) -> JSONResponse:
    return JSONResponse({"error": str(exc), "field": exc.field}, status_code=400)


async def _json_body(request: Request) -> Any:
    return load_json(await read_body(request), field="body")


Factory = Callable[[], Awaitable[Coordinator]]


def create_app(make: Factory, log: Callable[[str], None] = _log) -> FastAPI:
    """``make`` runs on the serving event loop, where the async store must be opened."""
    holder: list[Coordinator] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        holder.append(await make())
        try:
            yield
        finally:
            await holder[0].store.aclose()

    app = FastAPI(title="teemesh coordinator", docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.post("/v1/admission/challenge")
    async def challenge() -> dict[str, Any]:
        return await holder[0].challenge()

    @app.post("/v1/admission/attest")
    async def attest(request: Request) -> Response:
        try:
            # parsing and verifying a quote is CPU work: keep the event loop free meanwhile
            doc = await _json_body(request)
            admission = await run_in_threadpool(AdmissionRequest.from_json, doc)
        except InputError as exc:
            log(f"admission: malformed request: {exc}")
            return _bad(exc)
        peer = f"{admission.group}/{admission.peer_id}"
        try:
            reply = await holder[0].attest(admission)
        except AdmissionRefused as exc:
            codes = ",".join(r.code for r in exc.refusals)
            log(f"admission refused for {peer}: {codes}: {exc}")
            reasons = [r.to_json() for r in exc.refusals]
            return JSONResponse({"error": "refused", "reasons": reasons}, status_code=403)
        except MeshError as exc:
            log(f"admission failed for {peer}: {exc}")
            return JSONResponse({"error": str(exc)}, status_code=503)
        log(f"admitted {peer} as {reply['spiffe_id']} until {reply['expires_at']}")
        return JSONResponse(reply)

    @app.get("/v1/ca")
    async def ca() -> dict[str, str]:
        return {"ca_certificate": cert_pem(holder[0].ca_cert)}

    return app
