"""Contrast's sidecar settings in real sidecars: ``EDG_*``/``CONTRAST_*`` in their environment.

Sidecar db-0 owns the address 127.79.N.1 (its "CVM address"); its apps answer on 127.0.0.1:
- ``app`` (a backend no ingress entry lists): mTLS required, a mesh client certificate;
- ``open`` (listed, disableTLS=false): TLS with db-0's SVID, no client certificate;
- ``raw`` (listed, disableTLS=true): plain TCP;
- the admin port (listed as its own exemption): read-only metrics.
Sidecar web-0 has ingress DISABLED and one egress listener: app -> egress -> mTLS -> db-0's
``app`` port -> app. There is no netfilter here: clients dial db-0's address directly.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.server
import os
import random
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from meshkit import DB_COMPOSE, WEB_COMPOSE, Mesh
from procs import free_port, run_teemesh
from serverkit import Hello, serving
from sidecarkit import Sidecar, coordinator_policy, mesh_policy, run_sidecar, wait_for

from teemesh.identity.certs import cert_pem, pem_pair
from teemesh.identity.meshca import issue_svid, mesh_ca_cert, mesh_ca_key
from teemesh.identity.svid import read_svid, spiffe_id
from teemesh.net.tls import tls_context

pytestmark = pytest.mark.integration
BLOCK = random.randrange(1, 250)
DB_ADDRESS = f"127.79.{BLOCK}.1"
EGRESS_IP = f"127.80.{BLOCK}.1"
REQUEST = b"GET /%s HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n"


@dataclass
class Setup:
    mesh: Mesh
    db: Sidecar
    web: Sidecar
    app: int
    open: int
    raw: int
    admin: int
    egress: int


class _Apps(http.server.ThreadingHTTPServer):
    daemon_threads = True


@contextlib.contextmanager
def app(port: int) -> Iterator[None]:
    with serving(_Apps(("127.0.0.1", port), Hello)):
        yield


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """``values`` in the environment the sidecar started in this block inherits."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in values.items():
            patch.setenv(name, value)
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    mesh = Mesh(tmp_path_factory.mktemp("contrast"))
    mesh_policy(mesh, {"web": (WEB_COMPOSE, []), "db": (DB_COMPOSE, ["app"])})
    ports = [free_port() for _ in range(5)]
    app_port, open_port, raw_port, admin, egress = ports
    with contextlib.ExitStack() as stack:
        for port in (app_port, open_port, raw_port):
            stack.enter_context(app(port))
        agent_cm, agent_sock = mesh.coordinator_agent()
        stack.enter_context(agent_cm)
        stack.enter_context(mesh.start_coordinator(agent_sock, "coordinator"))
        ingress = f"open#{open_port}#false##raw#{raw_port}#true##admin#{admin}#true"
        with environment(EDG_INGRESS_PROXY_CONFIG=ingress, EDG_ADMIN_PORT=str(admin)):
            db = stack.enter_context(run_sidecar(mesh, "db-0", DB_COMPOSE, "db",
                                                 backends={"app": {"port": app_port}},
                                                 extra={"address": DB_ADDRESS}))  # fmt: skip
        out = f"db#{EGRESS_IP}:{egress}#{DB_ADDRESS}:{app_port}"
        with environment(CONTRAST_INGRESS_PROXY_CONFIG="DISABLED", EDG_EGRESS_PROXY_CONFIG=out):
            web = stack.enter_context(run_sidecar(mesh, "web-0", WEB_COMPOSE, "web"))
        yield Setup(mesh, db, web, app_port, open_port, raw_port, admin, egress)


def get(sock: socket.socket, path: str) -> bytes:
    sock.sendall(REQUEST % path.encode())
    reply = b""
    while chunk := sock.recv(65536):
        reply += chunk
    return reply


def tls_get(port: int, path: str, context: ssl.SSLContext) -> tuple[bytes, bytes | None]:
    """The reply, and the server's certificate (DER)."""
    with (
        socket.create_connection((DB_ADDRESS, port), timeout=10) as raw,
        context.wrap_socket(raw) as sock,
    ):
        der = sock.getpeercert(binary_form=True)
        return get(sock, path), der


def refused(port: int, context: ssl.SSLContext) -> bool:
    """True when the connection ends before any reply (an alert, a reset, or nothing)."""
    try:
        reply, _ = tls_get(port, "nope", context)
    except (ssl.SSLError, OSError, ValueError):  # ValueError: the handshake never completed
        return True
    return b"hello" not in reply


def test_a_mesh_client_reaches_an_mtls_port(setup: Setup) -> None:
    with setup.mesh.admitted("web-1", WEB_COMPOSE, "web") as (svid, _agent):
        ca = cert_pem(svid.ca_certificate)
        context = tls_context(server=False, identity=pem_pair(svid.certificate, svid.key),
                              verify=ca)  # fmt: skip
        reply, der = tls_get(setup.app, "mtls", context)
    assert reply.endswith(b"hello from 127.0.0.1 /mtls\n"), reply
    assert der is not None
    assert read_svid(der, "demo").peer == "db/db-0"
    labels = {"direction": "ingress", "name": "contrast-app"}
    wait_for(
        "the tunnel in the metrics", lambda: setup.db.metric("teemesh_connections_total", **labels)
    )


def test_an_mtls_port_refuses_no_certificate_and_a_foreign_one(setup: Setup) -> None:
    with setup.mesh.admitted("web-2", WEB_COMPOSE, "web") as (svid, _agent):
        ca = cert_pem(svid.ca_certificate)
    assert refused(setup.app, tls_context(server=False, verify=ca))
    # the same names, signed by another mesh CA
    ca_key = mesh_ca_key(os.urandom(32))
    key = ec.generate_private_key(ec.SECP256R1())
    forged = issue_svid(ca_key, mesh_ca_cert(ca_key, "demo"), key.public_key(),
                        spiffe=spiffe_id("demo", "web", "web-2"), peer_id="web-2", app_id=b"\xab" * 20,
                        now=dt.datetime.now(dt.UTC), ttl=dt.timedelta(hours=1))  # fmt: skip
    assert refused(setup.app, tls_context(server=False, identity=pem_pair(forged, key), verify=ca))


def test_a_revoked_client_is_refused(setup: Setup) -> None:
    mesh = setup.mesh
    with mesh.admitted("web-3", WEB_COMPOSE, "web") as (svid, _agent):
        context = tls_context(server=False, identity=pem_pair(svid.certificate, svid.key),
                              verify=cert_pem(svid.ca_certificate))  # fmt: skip
        assert tls_get(setup.app, "before", context)[0].endswith(b"/before\n")
        state = mesh.tmp / "coordinator"
        result = run_teemesh(["admin", "--url", mesh.url, "--ca", str(state / "mesh-ca.crt"),
                              "--token-file", str(state / "admin.token"), "revoke", "web",
                              "web-3"], mesh.tmp / "revoke.log")  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        wait_for("the revocation", lambda: refused(setup.app, context), timeout=10)


def test_a_tls_port_needs_no_client_certificate_and_follows_renewals(setup: Setup) -> None:
    context = tls_context(server=False, verify=_mesh_ca(setup))
    reply, der = tls_get(setup.open, "tls", context)
    assert reply.endswith(b"hello from 127.0.0.1 /tls\n"), reply
    assert der is not None
    before = read_svid(der, "demo")
    assert before.peer == "db/db-0"
    assert f"{before.serial:x}" == setup.db.status()["admission"]["serial"]
    assert setup.db.post("/v1/admission/renew", {})[0] == 202
    wait_for("db-0 to renew", lambda: setup.db.status()["admission"]["serial"]
             not in (None, f"{before.serial:x}"))  # fmt: skip
    _, der = tls_get(setup.open, "tls", context)
    assert der is not None
    assert f"{read_svid(der, 'demo').serial:x}" == setup.db.status()["admission"]["serial"]


def _mesh_ca(setup: Setup) -> str:
    return (setup.mesh.tmp / "coordinator" / "mesh-ca.crt").read_text()


def test_a_bypass_port_takes_plain_tcp(setup: Setup) -> None:
    with socket.create_connection((DB_ADDRESS, setup.raw), timeout=10) as sock:
        assert get(sock, "plain").endswith(b"hello from 127.0.0.1 /plain\n")


def test_egress_reaches_an_mtls_port_end_to_end(setup: Setup) -> None:
    with socket.create_connection((EGRESS_IP, setup.egress), timeout=10) as sock:
        assert get(sock, "egress").endswith(b"hello from 127.0.0.1 /egress\n")
    assert (
        setup.web.metric("teemesh_connections_total", direction="egress", name="contrast-db") >= 1
    )


def test_the_admin_port_serves_metrics_read_only(setup: Setup) -> None:
    base = f"http://{DB_ADDRESS}:{setup.admin}"
    with urllib.request.urlopen(f"{base}/stats/prometheus", timeout=5) as reply:
        assert b"teemesh_connections" in reply.read()
    with urllib.request.urlopen(f"{base}/ready", timeout=5) as reply:
        assert reply.status == 200
    request = urllib.request.Request(f"{base}/v1/admission/renew", b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=5)
    info.value.close()
    assert info.value.code == 405


def test_a_malformed_variable_stops_the_sidecar(setup: Setup) -> None:
    mesh = setup.mesh
    config = {"cluster": "demo", "group": "web", "peer_id": "web-9",
              "coordinators": list(mesh.urls), "coordinator_policy": coordinator_policy(),
              "address": "127.0.0.1"}  # fmt: skip
    path = mesh.tmp / "bad-sidecar.yaml"
    path.write_text(yaml.safe_dump(config))
    args = ["sidecar", "run", "--config", str(path), "--state", str(mesh.tmp / "bad")]
    with environment(EDG_INGRESS_PROXY_CONFIG="ok#80#true##web#80#maybe",
                     EDG_EGRESS_PROXY_CONFIG="db#10.0.0.1:5432#db:5432"):  # fmt: skip
        result = run_teemesh(args, mesh.tmp / "bad-sidecar.log")
    assert result.returncode != 0
    out = " ".join((result.stdout + result.stderr).split())
    assert "EDG_INGRESS_PROXY_CONFIG: entry 2 'web#80#maybe': disableTLS 'maybe'" in out, out
    assert "EDG_EGRESS_PROXY_CONFIG: entry 1 'db#10.0.0.1:5432#db:5432': listen address" in out
