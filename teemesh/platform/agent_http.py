"""HTTP edge of the guest agent: dstack's pRPC conventions on Unix sockets and TCP.

``/<Method>`` is the DstackGuest service and ``/prpc/[Tappd.]<Method>`` the legacy Tappd one.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from teemesh.errors import InputError
from teemesh.platform.agent import GuestAgent
from teemesh.platform.prpc import error_response, request_arguments


def create_app(agent: GuestAgent) -> FastAPI:
    app = FastAPI(title="teemesh guest agent", docs_url=None, redoc_url=None)

    async def dispatch(service: str, method: str, request: Request) -> Response:
        try:
            reply = agent.call(service, method, await request_arguments(request))
        except InputError as exc:
            return error_response(exc)
        return JSONResponse(reply)

    @app.api_route("/prpc/{method}", methods=["GET", "POST"])
    async def tappd(method: str, request: Request) -> Response:
        return await dispatch("tappd", method.removeprefix("Tappd."), request)

    @app.api_route("/{method}", methods=["GET", "POST"])
    async def dstack(method: str, request: Request) -> Response:
        return await dispatch("dstack", method, request)

    return app
