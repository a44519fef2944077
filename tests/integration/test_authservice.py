"""dstack-vpc's auth service in a real sidecar: nginx's ``auth_request`` headers, judged against
the mesh CA the sidecar was admitted under and the revocations its catalog watch delivers.

The requests carry what nginx sends (``x-client-verify``, ``x-client-cert`` URL-escaped) for
certificates a real coordinator issued to admitted workloads.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import os
import time
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from meshkit import DB_COMPOSE, ROGUE_COMPOSE, WEB_COMPOSE, Mesh
from procs import free_port, run_teemesh
from sidecarkit import mesh_policy, run_sidecar, wait_for

from teemesh.identity.certs import cert_pem
from teemesh.identity.meshca import issue_svid, mesh_ca_cert, mesh_ca_key
from teemesh.identity.svid import read_svid, spiffe_id

pytestmark = pytest.mark.integration


def ask(port: int, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers=headers)
        reply = conn.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read().decode()
    finally:
        conn.close()


def nginx_headers(certificate: x509.Certificate, verify: str = "SUCCESS") -> dict[str, str]:
    """What nginx sends: $ssl_client_verify, and $ssl_client_escaped_cert (URL-escaped PEM)."""
    return {"x-client-verify": verify, "x-client-cert": quote(cert_pem(certificate), safe="")}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mesh, int, int]]:
    mesh = Mesh(tmp_path_factory.mktemp("auth"))
    mesh_policy(mesh, {"web": (WEB_COMPOSE, []), "db": (DB_COMPOSE, []),
                       "ops": (ROGUE_COMPOSE, [])})  # fmt: skip
    open_port, web_only = free_port(), free_port()
    with contextlib.ExitStack() as stack:
        agent_cm, agent_sock = mesh.coordinator_agent()
        stack.enter_context(agent_cm)
        stack.enter_context(mesh.start_coordinator(agent_sock, "coordinator"))
        stack.enter_context(run_sidecar(mesh, "db-0", DB_COMPOSE, "db",
                                        extra={"auth": {"listen": f"127.0.0.1:{open_port}"}}))  # fmt: skip
        stack.enter_context(run_sidecar(mesh, "db-1", DB_COMPOSE, "db", extra={
            "auth": {"listen": f"127.0.0.1:{web_only}", "callers": ["web"]}}))  # fmt: skip
        yield mesh, open_port, web_only


def test_an_admitted_workload_is_named_by_its_app_id(mesh: tuple[Mesh, int, int]) -> None:
    mesh_, port, _ = mesh
    with mesh_.admitted("web-0", WEB_COMPOSE, "web") as (svid, _agent):
        status, headers, _ = ask(port, "/auth", nginx_headers(svid.certificate))
    assert status == 200
    app_id = read_svid(svid.certificate.public_bytes(Encoding.DER), "demo").app_id
    assert app_id is not None
    assert headers["x-dstack-app-id"] == app_id.hex()
    assert (headers["x-teemesh-group"], headers["x-teemesh-peer"]) == ("web", "web-0")


def test_refusals(mesh: tuple[Mesh, int, int]) -> None:
    mesh_, port, web_only = mesh
    assert ask(port, "/health", {})[0] == 200
    with mesh_.admitted("ops-0", ROGUE_COMPOSE, "ops") as (svid, _agent):
        assert ask(port, "/auth", nginx_headers(svid.certificate, "NONE"))[0] == 401
        assert ask(port, "/auth", {"x-client-verify": "SUCCESS"})[0] == 401
        assert ask(port, "/auth", nginx_headers(svid.certificate))[0] == 200
        status, headers, reason = ask(web_only, "/auth", nginx_headers(svid.certificate))
        assert (status, reason.strip()) == (403, "group ops is not allowed here")
        assert "x-dstack-app-id" not in headers
    # the same names and app id, signed by another mesh CA: no one here
    ca_key = mesh_ca_key(os.urandom(32))
    ca = mesh_ca_cert(ca_key, "demo")
    key = ec.generate_private_key(ec.SECP256R1())
    forged = issue_svid(ca_key, ca, key.public_key(), spiffe=spiffe_id("demo", "web", "web-0"),
                        peer_id="web-0", app_id=b"\xab" * 20,
                        now=dt.datetime.now(dt.UTC), ttl=dt.timedelta(hours=1))  # fmt: skip
    status, _, reason = ask(port, "/auth", nginx_headers(forged))
    assert status == 401, reason


def test_a_revoked_workload_is_refused_once_the_sidecar_hears_of_it(
    mesh: tuple[Mesh, int, int],
) -> None:
    mesh_, port, _ = mesh
    with mesh_.admitted("web-1", WEB_COMPOSE, "web") as (svid, _agent):
        assert ask(port, "/auth", nginx_headers(svid.certificate))[0] == 200
        state = mesh_.tmp / "coordinator"
        result = run_teemesh(["admin", "--url", mesh_.url, "--ca", str(state / "mesh-ca.crt"),
                              "--token-file", str(state / "admin.token"), "revoke", "web",
                              "web-1"], mesh_.tmp / "revoke.log")  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        started = time.monotonic()
        wait_for("the revocation", lambda: ask(port, "/auth", nginx_headers(svid.certificate))[0]
                 == 401, timeout=10)  # fmt: skip
        print(f"refused {time.monotonic() - started:.2f} s after the revoke command returned")
