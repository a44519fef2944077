"""dstack-vpc's server side with a real nginx from Debian: nginx terminates TLS with an optional
client certificate, asks the sidecar's auth service (``auth_request``) who the client is, and
sets ``X-Dstack-App-Id`` for the backend from the answer, never from the client.

The clients are curl with certificates a real coordinator issued to admitted workloads; the
backend echoes the headers it received.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.server
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from etcdkit import free_ports, stop_process
from meshkit import DB_COMPOSE, ROGUE_COMPOSE, WEB_COMPOSE, Mesh
from nginxkit import auth_server, nginx_binary, nginx_conf
from serverkit import HeaderEcho, serving
from sidecarkit import mesh_policy, run_sidecar

from teemesh.coordinator.client import Svid
from teemesh.identity.certs import cert_pem, key_pem, local_web_pki
from teemesh.identity.meshca import issue_svid, mesh_ca_cert, mesh_ca_key
from teemesh.identity.svid import read_svid, spiffe_id

pytestmark = pytest.mark.integration
FORGED_APP_ID = "ab" * 20


@dataclass
class Site:
    mesh: Mesh
    home: Path
    url: str
    ca_file: Path

    def curl(self, path: str, *flags: str) -> tuple[int, str]:
        """(HTTP status, body) as curl gets them."""
        result = subprocess.run(
            ["curl", "-sS", "--max-time", "5", "--cacert", str(self.ca_file),
             "-w", "\n%{http_code}", *flags, f"{self.url}{path}"],
            capture_output=True, text=True, timeout=15, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        body, _, status = result.stdout.rpartition("\n")
        return int(status), body

    def client_files(self, name: str, svid: Svid) -> list[str]:
        cert, key = self.home / f"{name}.crt", self.home / f"{name}.key"
        cert.write_text(cert_pem(svid.certificate))
        key.touch(mode=0o600)
        key.write_text(key_pem(svid.key))
        return ["--cert", str(cert), "--key", str(key)]


@contextlib.contextmanager
def nginx(home: Path, port: int, backend: int, auth: int) -> Iterator[None]:
    conf = home / "nginx.conf"
    server = auth_server(f"127.0.0.1:{port}", home / "server.crt", home / "server.key",
                         home / "mesh-ca.crt", backend=f"127.0.0.1:{backend}",
                         auth=f"127.0.0.1:{auth}")  # fmt: skip
    conf.write_text(nginx_conf(home, [server]))
    binary = nginx_binary()
    checked = subprocess.run([binary, "-t", "-c", str(conf), "-p", str(home)],
                             capture_output=True, text=True, check=False)  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    with (home / "nginx.out").open("wb") as out:
        process = subprocess.Popen([binary, "-c", str(conf), "-p", str(home), "-g", "daemon off;"],
                                   stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not (home / "nginx.pid").exists():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"nginx did not start: {(home / 'error.log').read_text()}")
            time.sleep(0.05)
        yield
    finally:
        stop_process(process)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    home = tmp_path_factory.mktemp("nginx")
    (home / "mesh").mkdir()
    mesh = Mesh(home / "mesh")
    mesh_policy(mesh, {"web": (WEB_COMPOSE, []), "db": (DB_COMPOSE, []),
                       "ops": (ROGUE_COMPOSE, [])})  # fmt: skip
    auth, port = free_ports(2)
    ca, (cert, key) = local_web_pki(["127.0.0.1"])
    (home / "server.crt").write_text(cert)
    (home / "server.key").touch(mode=0o600)
    (home / "server.key").write_text(key)
    (home / "web-ca.crt").write_text(ca)
    with contextlib.ExitStack() as stack:
        agent_cm, agent_sock = mesh.coordinator_agent()
        stack.enter_context(agent_cm)
        stack.enter_context(mesh.start_coordinator(agent_sock, "coordinator"))
        shutil.copy(mesh.tmp / "coordinator" / "mesh-ca.crt", home / "mesh-ca.crt")
        stack.enter_context(run_sidecar(mesh, "db-0", DB_COMPOSE, "db", extra={
            "auth": {"listen": f"127.0.0.1:{auth}", "callers": ["web"]}}))  # fmt: skip
        backend = stack.enter_context(serving(http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                                              HeaderEcho)))  # fmt: skip
        stack.enter_context(nginx(home, port, backend.server_address[1], auth))
        yield Site(mesh, home, f"https://127.0.0.1:{port}", home / "web-ca.crt")


def test_the_backend_sees_the_callers_identity_and_never_a_forged_one(site: Site) -> None:
    with site.mesh.admitted("web-0", WEB_COMPOSE, "web") as (svid, _agent):
        flags = site.client_files("web-0", svid)
        forged = ["-H", f"X-Dstack-App-Id: {FORGED_APP_ID}", "-H", "X-Teemesh-Group: admin",
                  "-H", "X-Teemesh-Peer: admin-0"]  # fmt: skip
        status, body = site.curl("/orders", *flags, *forged)
    assert status == 200, body
    seen = json.loads(body)
    app_id = read_svid(svid.certificate.public_bytes(Encoding.DER), "demo").app_id
    assert app_id is not None
    assert seen["x-dstack-app-id"] == app_id.hex() != FORGED_APP_ID
    assert (seen["x-teemesh-group"], seen["x-teemesh-peer"]) == ("web", "web-0")


def test_without_a_certificate_a_forged_app_id_gets_401(site: Site) -> None:
    status, _ = site.curl("/orders", "-H", f"X-Dstack-App-Id: {FORGED_APP_ID}")
    assert status == 401
    assert site.curl("/health") == (200, "healthy\n")


def test_a_group_outside_the_callers_gets_403(site: Site) -> None:
    with site.mesh.admitted("ops-0", ROGUE_COMPOSE, "ops") as (svid, _agent):
        status, _ = site.curl("/orders", *site.client_files("ops-0", svid))
    assert status == 403


def test_a_certificate_from_another_mesh_ca_never_reaches_the_backend(site: Site) -> None:
    """nginx itself refuses a certificate its ``ssl_client_certificate`` does not verify (400,
    with dstack-vpc's ``ssl_verify_client optional``); the auth service would say 401 too, as it
    verifies the certificate itself (tests/integration/test_authservice.py)."""
    ca_key = mesh_ca_key(os.urandom(32))
    key = ec.generate_private_key(ec.SECP256R1())
    forged = issue_svid(ca_key, mesh_ca_cert(ca_key, "demo"), key.public_key(),
                        spiffe=spiffe_id("demo", "web", "web-0"), peer_id="web-0",
                        app_id=bytes.fromhex(FORGED_APP_ID), now=dt.datetime.now(dt.UTC),
                        ttl=dt.timedelta(hours=1))  # fmt: skip
    svid = Svid(key, forged, forged, "spiffe://demo/web/web-0", 0, 0)
    status, body = site.curl("/orders", *site.client_files("forged", svid))
    assert status == 400 and "SSL certificate error" in body, body
