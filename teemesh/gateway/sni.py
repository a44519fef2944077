"""Where an SNI routes: an app behind a base domain, or a custom domain found through DNS.

Under a served base domain the first label is ``<id>[-<port>][s|g]``, exactly dstack's rule:
split on ``-`` (a third part is an error), then strip a trailing ``g`` (HTTP/2) and then a
trailing ``s`` (passthrough) from the part after the dash; both is an error. The port defaults
to 443 with ``s`` and to 80 otherwise, so ``myapp-s`` is port 443 passthrough while ``myapps``
is the app ``myapps`` on port 80. Any other name is a custom domain, routed by TXT records
(``resolve``). Pure: strings in, values out.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Collection
from dataclasses import dataclass

from teemesh.encoding import DNS_LABEL
from teemesh.errors import InputError

RESERVED_IDS = frozenset({"health", "gateway"})
HEALTH_PORT = 80
MAX_HOST_NAME = 253
_ID = re.compile(r"[a-z0-9]{1,63}")  # a DNS label without '-', which the rule splits on
_PORT = re.compile(r"[0-9]{1,5}")
_RULE = "<id>[-<port>][s|g]"


class Mode(enum.Enum):
    """What the gateway does with the connection's bytes."""

    TERMINATE = "terminate"  # terminate TLS with the wildcard certificate, forward as is
    H2 = "h2"  # terminate TLS offering ALPN h2, forward HTTP/2
    PASSTHROUGH = "passthrough"  # forward the raw bytes, ClientHello included


@dataclass(frozen=True)
class Destination:
    """An app (or instance) id under a base domain, the port to reach on it, and how."""

    id: str
    port: int
    mode: Mode

    @property
    def reserved(self) -> bool:
        """The gateway answers itself (``health``, ``gateway``): no app has these ids."""
        return self.id in RESERVED_IDS


@dataclass(frozen=True)
class CustomDomain:
    """An SNI outside every base domain: its app is named by TXT records."""

    name: str


def host_name(text: str, *, field: str = "sni") -> str:
    """``text`` as a canonical host name (lower-case, no trailing dot), else InputError.

    ASCII letters, digits and inner hyphens only (IDNs arrive as ``xn--`` labels); a numeric
    last label would make it an IP address, which SNI may not carry (RFC 6066).
    """
    if not text.isascii():
        raise InputError(f"host name {text[:80]!r} is not ASCII", field=field)
    name = text.lower().removesuffix(".")
    if not name or len(name) > MAX_HOST_NAME:
        raise InputError(f"host name must be 1 to {MAX_HOST_NAME} characters", field=field)
    labels = name.split(".")
    for label in labels:
        if not DNS_LABEL.fullmatch(label):
            raise InputError(
                f"host name {name[:80]!r} has an invalid label {label[:80]!r} "
                "(1 to 63 letters, digits or inner '-')",
                field=field,
            )
    if labels[-1].isdigit():
        raise InputError(f"{name!r} is an IP address, not a host name", field=field)
    return name


def parse_subdomain(subdomain: str) -> Destination:
    """The destination that the first label of an SNI under a base domain names.

    Beyond dstack: ids are DNS labels, ports 1 to 65535 in digits only, an empty part after
    the dash (``myapp-``) is an error, and ``health`` is served on port 80 only, terminated
    (plain or h2): the gateway answers it itself, so there is nothing to pass through to.
    """
    parts = subdomain.split("-")
    if len(parts) > 2:
        raise InputError(f"{subdomain[:80]!r}: more than one '-' (expected {_RULE})", field="sni")
    ident = parts[0]
    if not _ID.fullmatch(ident):
        raise InputError(
            f"{subdomain[:80]!r}: the id must be 1 to 63 lower-case letters or digits "
            f"(expected {_RULE})",
            field="sni",
        )
    mode, port = Mode.TERMINATE, None
    if len(parts) == 2:
        port_text = parts[1]
        h2 = port_text.endswith("g")
        port_text = port_text.removesuffix("g")
        passthrough = port_text.endswith("s")
        port_text = port_text.removesuffix("s")
        if h2 and passthrough:
            raise InputError(f"{subdomain!r}: 's' and 'g' together are not allowed", field="sni")
        mode = Mode.H2 if h2 else Mode.PASSTHROUGH if passthrough else Mode.TERMINATE
        if port_text:
            port = _port(port_text, subdomain)
        elif mode is Mode.TERMINATE:
            raise InputError(f"{subdomain!r}: nothing after '-' (expected {_RULE})", field="sni")
    if port is None:
        port = 443 if mode is Mode.PASSTHROUGH else 80
    if ident == "health" and (port != HEALTH_PORT or mode is Mode.PASSTHROUGH):
        raise InputError(
            f"{subdomain!r}: 'health' is answered by the gateway on port {HEALTH_PORT}, "
            "terminated, only",
            field="sni",
        )
    return Destination(ident, port, mode)


def _port(text: str, subdomain: str) -> int:
    port = int(text) if _PORT.fullmatch(text) else 0
    if not 1 <= port <= 65535:
        raise InputError(
            f"{subdomain[:80]!r}: port {text[:80]!r} is not a number from 1 to 65535 "
            f"(expected {_RULE})",
            field="sni",
        )
    return port


def route_sni(server_name: str, base_domains: Collection[str]) -> Destination | CustomDomain:
    """Route an SNI: split at the first dot; under a base domain it names an app.

    ``base_domains`` are canonical host names (see ``host_name``); deeper names under a base
    domain (``a.b.<base>``) are custom domains, as in dstack.
    """
    name = host_name(server_name)
    if name in base_domains:
        raise InputError(f"{name!r} is a base domain itself; apps are {_RULE}.{name}", field="sni")
    subdomain, dot, base = name.partition(".")
    if not dot:
        raise InputError(f"{name!r} has a single label: neither an app nor a domain", field="sni")
    if base in base_domains:
        return parse_subdomain(subdomain)
    return CustomDomain(name)
