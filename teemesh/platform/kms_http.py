"""HTTP edge of the KMS: dstack's pRPC paths over TLS with an RA-TLS server certificate.

The caller's attestation arrives as its TLS client certificate (issued with the temp CA, as
dstack's guests do), so it is bound to this very connection and cannot be replayed by anyone who
merely saw it. Service calls run in a worker thread: they sign, verify and may call a webhook.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from cryptography import x509
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from teemesh.errors import InputError, MeshError, PeerError
from teemesh.platform.kms import KmsService
from teemesh.platform.prpc import PEER_CERT, error_response, request_arguments

Call = Callable[[KmsService, x509.Certificate | None, dict[str, Any]], Any]
_METHODS: dict[str, Call] = {
    "GetMeta": lambda kms, cert, args: kms.get_meta(),
    "GetTempCaCert": lambda kms, cert, args: kms.get_temp_ca_cert(),
    "GetAppKey": lambda kms, cert, args: kms.get_app_key(cert),
    "GetAppEnvEncryptPubKey": lambda kms, cert, args: kms.get_app_env_encrypt_pub_key(args),
    "GetKmsKey": lambda kms, cert, args: kms.get_kms_key(cert),
}


def _log(message: str) -> None:
    print(f"kms: {message}", file=sys.stderr, flush=True)


def create_app(kms: KmsService, log: Callable[[str], None] = _log) -> FastAPI:
    app = FastAPI(title="teemesh KMS", docs_url=None, redoc_url=None)

    @app.api_route("/prpc/{method}", methods=["GET", "POST"])
    async def prpc(method: str, request: Request) -> Response:
        name = method.removeprefix("KMS.")
        call = _METHODS.get(name)
        if call is None:
            return error_response(InputError(f"no such method {method!r}", field="method"))
        der = getattr(request.state, PEER_CERT, None)
        try:
            cert = x509.load_der_x509_certificate(der) if der else None
        except ValueError as exc:  # an undecodable client certificate
            return error_response(InputError(str(exc), field="client certificate"))
        try:
            args = await request_arguments(request)
            reply = await run_in_threadpool(call, kms, cert, args)
        except PeerError as exc:  # a webhook we depend on failed: not the caller's fault
            log(f"{name}: refused, boot authorization unavailable: {exc}")
            return error_response(f"boot authorization unavailable: {exc}", status=503)
        except MeshError as exc:
            log(f"{name}: refused: {exc}")
            return error_response(exc)
        return JSONResponse(reply)

    return app
