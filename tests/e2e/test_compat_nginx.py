"""dstack-vpc's server side and Contrast's listeners on the local platform, driven from inside
the CVMs with curl: Debian's nginx in api-0 asks api-0's sidecar (``compat.auth``) who a client
certificate is, and web-0 and ops-0 reach nginx through their sidecars' Contrast egress
listeners (``compat.contrast.egress``), which originate mutual TLS with their SVIDs.

nginx serves a certificate of the mesh (an SVID api-0's app gets by attesting through its own
guest agent, as the sidecar does): an egress listener accepts only a server whose chain leads
to the mesh CA, which a second nginx port, with a certificate of a CA made here, shows.

Needs root and nginx (``nginx-light``); the cluster comes up once for the module and is always
taken down.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from localkit import teemesh
from nginxkit import auth_server, nginx_binary, nginx_conf

from teemesh.identity.certs import local_web_pki
from teemesh.spec import parse_spec, plan_cluster

pytestmark = pytest.mark.e2e
FORGED_APP_ID = "ab" * 20
FORGED = ("-H", f"X-Dstack-App-Id: {FORGED_APP_ID}", "-H", "X-Teemesh-Group: admin",
          "-H", "X-Teemesh-Peer: admin-0")  # fmt: skip
SPEC = """
cluster: nginx
tee: simulated
network: 10.83.0.0/24
kms: {{count: 0}}
workload_groups:
  api:
    command: [python, api.py, "{home}", "{nginx}"]
    backends:
      echo: {{port: 8080, health: {{http: /health}}}}
    compat:
      auth: {{callers: [web]}}
      contrast: {{ingress: "open#9090#false"}}
  web:
    command: sleep 100000
    compat:
      contrast:
        egress: "api#127.0.0.10:8443#{api}:8443##echo#127.0.0.11:8080#{api}:8080\\
          ##foreign#127.0.0.12:8444#{api}:8444"
  ops:
    command: sleep 100000
    compat: {{contrast: {{egress: "api#127.0.0.10:8443#{api}:8443"}}}}
"""
ECHO = """
import http.server, json, sys, threading

class Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        seen = {k.lower(): v for k, v in self.headers.items()}
        body = json.dumps(seen | {"_port": self.server.server_address[1]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

servers = [http.server.ThreadingHTTPServer(("127.0.0.1", int(p)), Echo) for p in sys.argv[1:]]
for server in servers[1:]:
    threading.Thread(target=server.serve_forever, daemon=True).start()
servers[0].serve_forever()
"""
API = """
# api's command: the header echo on 127.0.0.1:8080 and :9090, then nginx on the CVM's address,
# with a certificate of the mesh this CVM attests for (through its agent, like its sidecar)
import os, pathlib, subprocess, sys, time
from teemesh.sidecar.admit import admit
from teemesh.sidecar.launch import Launch

home, nginx = pathlib.Path(sys.argv[1]), sys.argv[2]
peer, address = os.environ["TEEMESH_PEER_ID"], os.environ["TEEMESH_ADDRESS"]
run = home / f"nginx-{peer}"
run.mkdir(exist_ok=True)
subprocess.Popen([sys.executable, str(home / "echo.py"), "8080", "9090"])
launch = home / "state" / "cvms" / peer / "sidecar" / "sidecar-run.json"
mesh_ca = home / "state" / "cvms" / "coordinator-0" / "coordinator" / "mesh-ca.crt"
deadline, result = time.monotonic() + 60, {}
while not result.get("ok"):
    if time.monotonic() > deadline:
        sys.exit(f"nginx got no certificate of the mesh: {result}")
    time.sleep(0.5)
    try:
        if launch.exists() and mesh_ca.exists():
            result = admit(Launch.read(launch), first=0, vet_only=False)
    except Exception as exc:
        result = {"error": repr(exc)}
(run / "server.crt").write_text(result["certificate"])
(run / "server.key").touch(mode=0o600)
(run / "server.key").write_text(result["key"])
sys.stdout.flush()
os.execv(nginx, [nginx, "-c", str(home / "nginx.conf"), "-p", str(run), "-g", "daemon off;"])
"""
FOREIGN_SERVER = """
    server {{
        listen {address}:8444 ssl;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_certificate {home}/foreign.crt;
        ssl_certificate_key {home}/foreign.key;
        location = /health {{ return 200 "foreign\\n"; }}
    }}
"""


@dataclass
class Curl:
    returncode: int
    status: int
    body: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Cluster:
    state: Path
    app_ids: dict[str, str]
    api: str
    """api-0's address."""

    def curl(self, cvm: str, url: str, *flags: str) -> Curl:
        result = teemesh("exec", cvm, "--state", self.state, "--", "curl", "-sS", "--max-time",
                         "10", "-w", "\n%{http_code}", *flags, url)  # fmt: skip
        body, _, status = result.stdout.rpartition("\n")
        return Curl(result.returncode, int(status or 0), body, result.stderr)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.fail("the e2e tests make network namespaces: run them as root")
    nginx = nginx_binary()
    home = tmp_path_factory.mktemp("nginx")
    (home / "echo.py").write_text(ECHO)
    (home / "api.py").write_text(API)
    _, (cert, key) = local_web_pki(["teemesh-foreign"])
    (home / "foreign.crt").write_text(cert)
    (home / "foreign.key").touch(mode=0o600)
    (home / "foreign.key").write_text(key)
    draft = plan_cluster(parse_spec(yaml.safe_load(SPEC.format(home=home, nginx=nginx,
                                                               api="127.0.0.1"))))  # fmt: skip
    api = draft.cvm("api-0").address  # where the replicas are does not depend on compat
    run, mesh_ca = home / "nginx-api-0", home / "state/cvms/coordinator-0/coordinator/mesh-ca.crt"
    servers = [auth_server(f"{api}:8443", run / "server.crt", run / "server.key", mesh_ca,
                           backend="127.0.0.1:8080", auth="127.0.0.1:8092"),
               FOREIGN_SERVER.format(address=api, home=home)]  # fmt: skip
    (home / "nginx.conf").write_text(nginx_conf(run, servers))
    spec = home / "cluster.yaml"
    spec.write_text(textwrap.dedent(SPEC.format(home=home, nginx=nginx, api=api)))
    plan = teemesh("plan", spec, "--json")
    assert plan.returncode == 0, plan.stderr
    planned = {c["name"]: c["address"] for c in json.loads(plan.stdout)["cvms"]}
    assert planned["api-0"] == api
    state = home / "state"
    try:
        result = teemesh("up", spec, "--state", state, timeout=150)
        assert result.returncode == 0, result.stdout + result.stderr
        found = Cluster(state, json.loads(plan.stdout)["app_ids"], api)
        deadline = time.monotonic() + 60
        while (health := found.curl("web-0", f"https://{api}:8443/health", "-k")).status != 200:
            if time.monotonic() > deadline:
                logs = teemesh("logs", "api-0", "--state", state, "--process", "app")
                errors = home / "nginx-api-0" / "error.log"
                pytest.fail(f"nginx is not serving: {health}\n{logs.stdout}{logs.stderr}\n"
                            f"{errors.read_text() if errors.exists() else ''}")  # fmt: skip
            time.sleep(1)
        yield found
    finally:
        down = teemesh("down", "--state", state, timeout=120)
        print(down.stdout, down.stderr, file=sys.stderr)


def test_the_backend_sees_the_callers_identity_never_a_forged_one(cluster: Cluster) -> None:
    """web-0's egress listener presents web-0's SVID to nginx; the auth service names it."""
    reply = cluster.curl("web-0", "http://127.0.0.10:8443/orders", *FORGED)
    assert (reply.returncode, reply.status) == (0, 200), reply
    seen = reply.json()
    assert seen["x-dstack-app-id"] == cluster.app_ids["web"] != FORGED_APP_ID
    assert (seen["x-teemesh-group"], seen["x-teemesh-peer"]) == ("web", "web-0")
    assert seen["_port"] == 8080


def test_a_group_outside_the_auth_services_callers_gets_403(cluster: Cluster) -> None:
    reply = cluster.curl("ops-0", "http://127.0.0.10:8443/orders", *FORGED)
    assert (reply.returncode, reply.status) == (0, 403), reply


def test_without_a_client_certificate_nginx_answers_401(cluster: Cluster) -> None:
    reply = cluster.curl("web-0", f"https://{cluster.api}:8443/orders", "-k", *FORGED)
    assert (reply.returncode, reply.status) == (0, 401), reply
    health = cluster.curl("web-0", f"https://{cluster.api}:8443/health", "-k")
    assert (health.status, health.body) == (200, "healthy\n")


def test_contrast_ingress_requires_a_mesh_certificate_except_on_listed_ports(
    cluster: Cluster,
) -> None:
    """api's backend port 8080 is served on api-0's address with mTLS; ``open#9090#false``
    serves TLS with api-0's SVID and no client certificate."""
    refused = cluster.curl("web-0", f"https://{cluster.api}:8080/x", "-k")
    assert refused.returncode != 0 and refused.status == 0, refused
    open_port = cluster.curl("web-0", f"https://{cluster.api}:9090/x", "-k")
    assert (open_port.returncode, open_port.status) == (0, 200), open_port
    assert open_port.json()["_port"] == 9090
    # the same mTLS port, from web-0's egress listener with its SVID
    mtls = cluster.curl("web-0", "http://127.0.0.11:8080/x")
    assert (mtls.returncode, mtls.status) == (0, 200), mtls
    assert mtls.json()["_port"] == 8080


def test_an_egress_listener_refuses_a_server_outside_the_mesh(cluster: Cluster) -> None:
    served = cluster.curl("web-0", f"https://{cluster.api}:8444/health", "-k")
    assert (served.status, served.body) == (200, "foreign\n"), served
    refused = cluster.curl("web-0", "http://127.0.0.12:8444/health")
    assert refused.returncode != 0 and refused.status == 0, refused
    logs = teemesh("logs", "web-0", "--state", cluster.state, "--process", "sidecar").stdout
    failed = [json.loads(line) for line in logs.splitlines() if "contrast-foreign" in line]
    assert any(e["event"] == "contrast_connect_failed" and "certificate verify failed"
               in e["error"] for e in failed), failed  # fmt: skip
