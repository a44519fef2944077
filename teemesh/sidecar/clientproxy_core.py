"""dstack-vpc's client proxy, the decisions: which target a request names, what is forwarded,
which status a failure becomes. Pure (no I/O), so hostile input is tested without sockets.

Where dstack-vpc is lax, this is strict: a bad ``x-dstack-target-port`` is a 400 naming the
header (dstack-vpc silently falls back to 443), and an app id must be hex. The ``use-tls``
header is parsed for compatibility only: the hop between sidecars is always the mesh's mutual
TLS, with the peer's identity checked before a byte of the request is sent.

A target app that is the coordinators' (``vpc_app_ids``) names dstack-vpc's VPC server, which
in teemesh the coordinators serve: only its ``/api/`` paths and ``/health`` are passed on
(``vpc_path``).

Identity headers are never forwarded, to a backend or to a coordinator: ``X-Dstack-App-Id``,
``x-teemesh-group``, ``x-teemesh-peer``, ``x-client-verify`` and ``x-client-cert``, in any case
(``IDENTITY_HEADERS``), are dropped, as any client can write them. A backend must take the
caller's identity only from the auth service behind nginx (which overwrites them from the
verified client certificate) or from the mesh (the target sidecar's ``callers``), never from a
header a client could set.

The guest-agent fallback serves only the methods that reveal no secret and change no
measurement (``AGENT_METHODS``): dstack-vpc passes any method, so anything that reaches its
port gets the app's keys (``GetKey``, ``GetTlsKey``, ``Sign``) and extends its RTMRs
(``EmitEvent``). Those are 403 here; an app inside the CVM has the guest agent's socket.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, unquote

from teemesh.attest.dstack import default_app_id
from teemesh.encoding import parse_hex
from teemesh.identity.svid import SvidIdentity
from teemesh.sidecar.config import SidecarConfig
from teemesh.sidecar.routing import Instance, live_instances_of
from teemesh.sidecar.tunnel import Refusal

TARGET_PREFIX = "x-dstack-target-"
APP, PORT, INSTANCE, USE_TLS = (TARGET_PREFIX + n for n in ("app", "port", "instance", "use-tls"))
DEFAULT_PORT = 443
MAX_BODY = 10 * 1024 * 1024
MAX_AGENT_BODY = 1024 * 1024
ROUTED_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
_HEX_ID = re.compile(r"[0-9a-f]{2,128}")
_PORT = re.compile(r"[0-9]{1,5}")
_AGENT_METHOD = re.compile(r"[A-Za-z][A-Za-z0-9]{0,63}")
_TLS_VALUES = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_HOP_BY_HOP = frozenset(
    b"connection keep-alive proxy-connection te expect trailer transfer-encoding upgrade "
    b"content-length".split()
)
"""Request headers not forwarded: the proxy frames the one request it forwards itself."""
IDENTITY_HEADERS = frozenset(
    b"x-dstack-app-id x-teemesh-group x-teemesh-peer x-client-verify x-client-cert".split()
)
"""The caller's identity as nginx's auth service states it (``authservice``): never forwarded,
as a client could have written them."""
_DROPPED = _HOP_BY_HOP | IDENTITY_HEADERS
AGENT_METHODS = frozenset({"Info", "GetQuote", "Attest", "Verify", "Version"})
"""The guest-agent methods the fallback serves: none reveals a secret or extends an RTMR."""
VPC_PREFIX = "/api/"
VPC_HEALTH = "/health"
_VPC_DROPPED = _DROPPED | {b"host"}
"""Not passed to a coordinator besides ``x-dstack-target-*``: it names itself (``Host``)."""


class ProxyError(Exception):
    """A request the proxy answers itself: ``status`` and a message naming what went wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Target:
    """Where a request goes: instances of ``app`` (or only ``instance``) serving ``port``."""

    app: str
    port: int
    instance: str | None = None
    use_tls: bool = True


def parse_target(headers: Mapping[str, str]) -> Target | None:
    """The target the ``x-dstack-target-*`` headers name (lowercase names); None without
    ``x-dstack-target-app`` (the guest-agent fallback). ProxyError(400) names a bad header."""
    app = headers.get(APP)
    if app is None:
        return None
    port_text = headers.get(PORT, "").strip()
    port = DEFAULT_PORT
    if port_text:
        port = int(port_text) if _PORT.fullmatch(port_text) else 0
        if not 1 <= port <= 65535:
            raise ProxyError(400, f"{PORT} must be a port number (1-65535), got {port_text!r:.40}")
    instance = headers.get(INSTANCE, "").strip() or None
    tls_text = headers.get(USE_TLS, "true").strip().lower()
    if tls_text not in _TLS_VALUES:
        raise ProxyError(400, f"{USE_TLS} must be true or false, got {tls_text!r:.40}")
    return Target(
        _hex_id(app, APP),
        port,
        None if instance is None else _hex_id(instance, INSTANCE),
        _TLS_VALUES[tls_text],
    )


def _hex_id(value: str, header: str) -> str:
    value = value.strip().lower()
    if not _HEX_ID.fullmatch(value):
        raise ProxyError(400, f"{header} must be a hex id, got {value!r:.40}")
    return value


def forwarded_request(method: str, target: str, headers: Iterable[tuple[bytes, bytes]],
                      body: bytes) -> bytes:  # fmt: skip
    """The HTTP/1.1 request the backend receives: every header but ``x-dstack-target-*``, the
    hop-by-hop ones and the identity ones (``IDENTITY_HEADERS``), Host included; the body
    framed by Content-Length; one request only."""
    lines = [f"{method} {target} HTTP/1.1".encode()]
    lines += [name + b": " + value for name, value in headers if _kept(name, _DROPPED)]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(b"Content-Length: " + str(len(body)).encode())
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _kept(name: bytes, dropped: frozenset[bytes]) -> bool:
    # "_" read as "-": CGI and WSGI servers map both spellings to one variable (HTTP_X_...)
    lower = name.lower().replace(b"_", b"-")
    return not lower.startswith(TARGET_PREFIX.encode()) and lower not in dropped


def vpc_app_ids(coordinator_policy: Mapping[str, Any]) -> frozenset[str]:
    """The app ids that name the coordinators' VPC API: those the sidecar's coordinator policy
    pins (``app_ids``), else dstack's default app id of each compose hash it admits (its first
    20 bytes); none when it states neither. Lowercase hex."""
    pinned = coordinator_policy.get("app_ids")
    if pinned is not None:
        return frozenset(parse_hex(a, field="app_ids", size=20).hex() for a in pinned)
    hashes = coordinator_policy.get("compose_hashes") or ()
    return frozenset(
        default_app_id(parse_hex(h, field="compose_hashes", size=32)).hex() for h in hashes
    )


def vpc_path(target: str) -> str:
    """The request target as a coordinator receives it, if its path is the VPC API's (under
    ``/api/``, no dot segment even percent-encoded) or the VPC server's ``/health`` (exactly);
    else ProxyError(404) naming the path. The rest of a coordinator's API is never reached with
    this sidecar's certificate."""
    path = target.partition("?")[0]
    if path == VPC_HEALTH:
        return target
    segments = unquote(path).replace("\\", "/").split("/")
    if not path.startswith(VPC_PREFIX) or {".", ".."} & set(segments):
        raise ProxyError(404, f"the coordinators serve only the VPC API ({VPC_PREFIX}...) "
                              f"through this proxy, not {path[:80]!r}")  # fmt: skip
    return target


def vpc_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """The headers a coordinator receives: the client's but ``x-dstack-target-*``, the
    hop-by-hop ones, the identity ones and ``Host``."""
    return [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in headers
        if _kept(name, _VPC_DROPPED)
    ]


def relayed_response(status: int, headers: Iterable[tuple[str, str]], body: bytes) -> bytes:
    """A coordinator's answer as the client receives it: its status, content type and body,
    framed by the proxy (Content-Length, then close)."""
    content_type = next((v for k, v in headers if k.lower() == "content-type"), None)
    return _response(status, content_type, body)


def _response(status: int, content_type: str | None, body: bytes) -> bytes:
    """A whole HTTP/1.1 response framed by the proxy: Content-Length, then close."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    lines = [f"HTTP/1.1 {status} {phrase}"]
    if content_type is not None:
        lines.append(f"Content-Type: {_no_newline(content_type)}")
    lines += [f"Content-Length: {len(body)}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _no_newline(value: str) -> str:
    return value.replace("\r", " ").replace("\n", " ")


def backends_by_port(config: SidecarConfig) -> dict[int, frozenset[str]]:
    """The backends this sidecar knows to serve on each port: its routes' and its own (the
    catalog names backends, not their ports). Built once: the configuration never changes."""
    named: dict[int, set[str]] = {}
    for route in config.routes.values():
        named.setdefault(route.port, set()).add(route.backend)
    for name, backend in config.backends.items():
        named.setdefault(backend.port, set()).add(name)
    return {port: frozenset(names) for port, names in named.items()}


def candidates(
    instances: Iterable[Instance], target: Target, backends: frozenset[str]
) -> list[Instance]:
    """The instances a request for ``target`` may go to; ProxyError(404) says what is missing."""
    if target.instance is not None:
        found, by_instance = live_instances_of(instances, target.instance)
        if not by_instance:
            raise ProxyError(404, f"no live instance {target.instance}")
        found = [i for i in found if i.app_id == target.app]
        if not found:
            raise ProxyError(404, f"instance {target.instance} is not of app {target.app}")
    else:
        found, by_instance = live_instances_of(instances, target.app)
        if not found or by_instance:
            raise ProxyError(404, f"no live instance of app {target.app}")
    if not backends:
        raise ProxyError(404, f"no route of this sidecar serves port {target.port}")
    serving = [i for i in found if i.service in backends]
    if not serving:
        raise ProxyError(404, f"app {target.app} serves nothing on port {target.port}")
    return serving


def identity_problem(peer: SvidIdentity, instance: Instance, app: str,
                     revoked: Iterable[int]) -> str | None:  # fmt: skip
    """Why the peer a handshake authenticated (its chain to the mesh CA checked by OpenSSL)
    is not the target; None when it is. Run before any byte of the request is sent."""
    if peer.serial in set(revoked):
        return f"{peer.peer}: certificate {peer.serial:x} is revoked"
    if (peer.group, peer.peer_id) != (instance.group, instance.peer_id):
        return f"{instance.key} answered as {peer.peer}"
    if peer.app_id is None or peer.app_id.hex() != app:
        got = "no app id" if peer.app_id is None else f"app {peer.app_id.hex()}"
        return f"{instance.key} ({peer.peer}) has {got}, not app {app}"
    return None


def refusal_error(refusal: Refusal, instance: Instance) -> ProxyError:
    """A target sidecar's refusal as the client's status: 403 for its ``callers``."""
    status = 502 if refusal is Refusal.BAD_REQUEST else refusal.status
    return ProxyError(status, f"{instance.key} refused the tunnel: {refusal.value}")


def agent_method(path: str) -> str | None:
    """The guest-agent method a fallback path names: its last segment PascalCased
    (``/get_quote`` -> ``GetQuote``); None for ``/gateway``; ProxyError(404) if none,
    ProxyError(403) naming it if it is not one of ``AGENT_METHODS``."""
    path = path.partition("?")[0]
    if path.strip("/").lower() == "gateway":
        return None
    segment = path.rstrip("/").rpartition("/")[2]
    name = "".join(part[:1].upper() + part[1:] for part in re.split(r"[_-]", segment))
    if not _AGENT_METHOD.fullmatch(name):
        raise ProxyError(404, f"no guest-agent method in {path[:80]!r}")
    if name not in AGENT_METHODS:
        raise ProxyError(403, f"the guest-agent method {name} is not served through this proxy "
                              f"(only {', '.join(sorted(AGENT_METHODS))}); an app inside the CVM "
                              "calls the guest agent's socket for it")  # fmt: skip
    return name


def agent_args(method: str, target: str, body: bytes) -> dict[str, Any]:
    """A fallback call's arguments: the query string (GET) or a JSON object body (POST)."""
    if method == "GET":
        return dict(parse_qsl(target.partition("?")[2]))
    if method != "POST":
        raise ProxyError(405, "the guest-agent fallback takes GET or POST")
    if len(body) > MAX_AGENT_BODY:
        raise ProxyError(413, f"a guest-agent call's body is limited to {MAX_AGENT_BODY} bytes")
    try:
        doc = json.loads(body) if body.strip() else {}
    except ValueError as exc:
        raise ProxyError(400, f"the body is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ProxyError(400, "the body must be a JSON object")
    return doc


def json_response(status: int, doc: Any) -> bytes:
    """A whole HTTP/1.1 response the proxy gives itself, closing the connection."""
    return _response(status, "application/json", json.dumps(doc, indent=1).encode() + b"\n")


def error_response(error: ProxyError) -> bytes:
    return json_response(error.status, {"error": str(error)})


def gateway_domain(config: SidecarConfig) -> str:
    """What ``/gateway`` answers: the base domain of the gateway this sidecar knows, if any."""
    if config.via_gateway is not None:
        return config.via_gateway.base_domain
    return "" if config.gateway is None else config.gateway.base_domain
