"""Debian's nginx in the tests: dstack-vpc's server side, as the README configures it.

TLS with an optional client certificate of the mesh, ``auth_request`` to the sidecar's auth
service, and the backend's identity headers set from its answer (so never from the client).
nginx missing fails the test (it never skips).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest

AUTH_SERVER = """
    server {{
        listen {listen} ssl;
        ssl_protocols TLSv1.2 TLSv1.3;  # mesh clients speak 1.3 only (nginx 1.22: not default)
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_client_certificate {mesh_ca};
        ssl_verify_client optional;
        ssl_verify_depth 3;
        location = /health {{ return 200 "healthy\\n"; }}
        location / {{
            auth_request /auth;
            auth_request_set $app_id $upstream_http_x_dstack_app_id;
            auth_request_set $group $upstream_http_x_teemesh_group;
            auth_request_set $peer $upstream_http_x_teemesh_peer;
            proxy_set_header X-Dstack-App-Id $app_id;
            proxy_set_header X-Teemesh-Group $group;
            proxy_set_header X-Teemesh-Peer $peer;
            proxy_pass http://{backend};
        }}
        location = /auth {{
            internal;
            proxy_pass http://{auth}/auth;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Client-Cert $ssl_client_escaped_cert;
            proxy_set_header X-Client-Verify $ssl_client_verify;
        }}
    }}
"""
CONF = """
worker_processes 1;
error_log {run}/error.log info;
pid {run}/nginx.pid;
{user}
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {run}/body;
    proxy_temp_path {run}/proxy;
    fastcgi_temp_path {run}/fastcgi;
    uwsgi_temp_path {run}/uwsgi;
    scgi_temp_path {run}/scgi;
{servers}
}}
"""


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if found is None:
        pytest.fail(
            "nginx is not installed (Debian: apt-get install nginx-light; scripts/test does)"
        )
    return found


def auth_server(
    listen: str, cert: Path, key: Path, mesh_ca: Path, *, backend: str, auth: str
) -> str:
    """A server block: TLS on ``listen``, ``backend`` and the auth service ``auth`` as
    ``HOST:PORT``."""
    return AUTH_SERVER.format(listen=listen, cert=cert, key=key, mesh_ca=mesh_ca,
                              backend=backend, auth=auth)  # fmt: skip


def nginx_conf(run: Path, servers: Sequence[str]) -> str:
    """A whole configuration whose pid, logs and temporary files stay in ``run``."""
    user = "user root root;" if os.geteuid() == 0 else ""
    return CONF.format(run=run, user=user, servers="".join(servers))
