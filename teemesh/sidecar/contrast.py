"""Contrast's service-mesh sidecar settings (``EDG_*`` / ``CONTRAST_*``), parsed exactly.

So that a pod spec written for Contrast's Envoy sidecar runs under a teemesh sidecar unchanged:

    *_INGRESS_PROXY_CONFIG  <name>#<port>#<disableTLS>[##...]  or DISABLED
    *_EGRESS_PROXY_CONFIG   <name>#<listen ip:port>#<remote host:port>[##...]
    *_ADMIN_PORT            <port> (0: none)

``CONTRAST_*`` (current) wins over ``EDG_*`` (older releases) when both are in the environment;
a variable counts when present, even empty (an empty ingress still means "mTLS on every port").
Entries are split on ``##`` (empty ones skipped), fields on ``#`` (exactly three). Numbers are
read like Go's ``strconv.Atoi`` (a sign and ASCII digits) but, unlike Contrast, range-checked;
disableTLS like ``strconv.ParseBool``. Every problem is reported at once, each naming its
variable, the entry's position among the ``##`` pieces (from 1) and its text.

Pure: no sockets here (``contrast_proxy`` runs the listeners), and no pydantic until an error
is reported, since the sidecar process holds these dataclasses too.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from annotated_types import MaxLen, MinLen

from teemesh.checks import STRICT, Address, Check, Loopback, Port, split_host_port

if TYPE_CHECKING:
    from teemesh.sidecar.config import SidecarConfig

SOURCE = "environment"
PREFIXES = ("CONTRAST_", "EDG_")
"""In order of precedence."""
INGRESS, EGRESS, ADMIN = "INGRESS_PROXY_CONFIG", "EGRESS_PROXY_CONFIG", "ADMIN_PORT"
VARIABLES = tuple(p + v for v in (INGRESS, EGRESS, ADMIN) for p in PREFIXES)
DISABLED = "DISABLED"
_BOOLS = dict.fromkeys(("1", "t", "T", "TRUE", "true", "True"), True) | dict.fromkeys(
    ("0", "f", "F", "FALSE", "false", "False"), False
)
"""Go's strconv.ParseBool, exactly."""
_ATOI = re.compile(r"[+-]?[0-9]+")
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
SHOWN = 80
"""An entry's text is quoted in errors up to this many characters."""


def _name(value: str) -> str:
    if "#" in value or not value.isprintable():
        raise ValueError(f"{value!r}: a name is printable and has no '#'")
    return value


EntryName = Annotated[str, MinLen(1), MaxLen(128), Check(_name)]


@dataclass(frozen=True)
class IngressEntry:
    """A port listed in the ingress config: TLS without client certificates, or none at all."""

    __pydantic_config__ = STRICT
    name: EntryName
    """Informational only (as in Contrast)."""
    port: Port
    disable_tls: bool


@dataclass(frozen=True)
class EgressEntry:
    """A loopback listener whose connections go out over mTLS to ``remote_host:remote_port``."""

    __pydantic_config__ = STRICT
    name: EntryName
    listen_ip: Loopback
    listen_port: Port
    remote_host: Address
    remote_port: Port


@dataclass(frozen=True)
class ContrastProxy:
    """The whole setting. Backend ports no ingress entry lists require mTLS (Contrast's default)."""

    __pydantic_config__ = STRICT
    ingress: tuple[IngressEntry, ...] = ()
    ingress_disabled: bool = False
    """``DISABLED``: no ingress listener at all (an egress-only workload)."""
    egress: tuple[EgressEntry, ...] = ()
    admin_port: Port | None = None
    """Read-only metrics and readiness on ``<address>:<port>`` (Envoy's admin, minus control)."""


Mode = Literal["mtls", "tls", "plain"]
"""mtls: a mesh client certificate required; tls: the SVID, no client certificate; plain: TCP."""


@dataclass(frozen=True)
class Inbound:
    """One listener on the CVM's address, relaying to ``target:port`` (the app, on loopback)."""

    name: str
    port: int
    mode: Mode
    target: str
    backend: str | None = None
    """The backend of the sidecar config serving this port, if any (its callers apply)."""


def inbound(config: SidecarConfig) -> list[Inbound]:
    """The ingress listeners ``config`` calls for, by port: the entries first, then every
    other backend port with mTLS; the admin port's entry (its exemption) opens none."""
    proxy = config.contrast
    if proxy is None or proxy.ingress_disabled:
        return []
    by_port = {b.port: (name, b.host) for name, b in config.backends.items()}
    out: dict[int, Inbound] = {}
    for entry in proxy.ingress:
        if entry.port == proxy.admin_port and entry.disable_tls:
            continue
        backend, host = by_port.get(entry.port, (None, "127.0.0.1"))
        mode: Mode = "plain" if entry.disable_tls else "tls"
        out.setdefault(entry.port, Inbound(entry.name, entry.port, mode, host, backend))
    listed = {e.port for e in proxy.ingress}
    for port, (backend, host) in by_port.items():
        if port not in listed:
            out.setdefault(port, Inbound(backend, port, "mtls", host, backend))
    return list(out.values())


# -- the environment -------------------------------------------------------------------------


def from_environment(environ: Mapping[str, str]) -> ContrastProxy | None:
    """The setting the variables in ``environ`` give; None when none is there. ConfigError
    (an InputError) listing every problem otherwise."""
    values: dict[str, tuple[str, str]] = {}
    for suffix in (INGRESS, EGRESS, ADMIN):
        for prefix in PREFIXES:
            if prefix + suffix in environ:
                values[suffix] = (prefix + suffix, environ[prefix + suffix])
                break
    if not values:
        return None
    problems: list[str] = []
    ingress: list[IngressEntry] = []
    disabled = False
    if INGRESS in values:
        var, text = values[INGRESS]
        disabled = text == DISABLED
        if not disabled:
            ingress = _entries(var, text, _ingress_entry, problems)
            ways = {(e.port, e.disable_tls) for e in ingress}  # the same twice is harmless
            _duplicates(var, [(str(port), f"port {port}") for port, _ in ways], problems)
    egress: list[EgressEntry] = []
    if EGRESS in values:
        var, text = values[EGRESS]
        egress = _entries(var, text, _egress_entry, problems)
        _duplicates(var, [(e.name, f"name {e.name!r}") for e in egress], problems)
        _duplicates(var, [(f"{e.listen_ip}:{e.listen_port}", f"listen address {e.listen_ip}:"
                           f"{e.listen_port}") for e in egress], problems)  # fmt: skip
    admin = None
    if ADMIN in values:
        var, text = values[ADMIN]
        try:  # empty: unset (as when Contrast's CLI copies an empty annotation)
            admin = (_port(text, allow_zero=True) or None) if text else None
        except ValueError as exc:
            problems.append(f"{var}: {exc}")
    if problems:
        from teemesh.config import ConfigError  # noqa: PLC0415 (pydantic: only on errors)

        raise ConfigError(SOURCE, problems)
    return ContrastProxy(tuple(ingress), disabled, tuple(egress), admin)


def _entries(var: str, text: str, parse: Any, problems: list[str]) -> list[Any]:
    out = []
    for index, entry in enumerate(text.split("##"), start=1):
        if not entry:
            continue
        try:
            parts = entry.split("#")
            if len(parts) != 3:
                raise ValueError(f"expected 3 fields separated by '#', got {len(parts)}")
            out.append(parse(*parts))
        except ValueError as exc:
            shown = entry if len(entry) <= SHOWN else entry[:SHOWN] + "..."
            problems.append(f"{var}: entry {index} {shown!r}: {exc}")
    return out


def _duplicates(var: str, keys: list[tuple[str, str]], problems: list[str]) -> None:
    seen: set[str] = set()
    for key, what in keys:
        if key in seen:
            problems.append(f"{var}: {what} appears in more than one entry")
        seen.add(key)


def _port(text: str, what: str = "port", *, allow_zero: bool = False) -> int:
    """Go's Atoi (a sign, ASCII digits; no spaces), then a range Contrast does not check."""
    if not _ATOI.fullmatch(text):
        raise ValueError(f"{what} {text!r} is not a number")
    port = int(text)
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"{what} {port} is out of range ({low}-65535)")
    return port


def _checked(name: str) -> str:
    if not name:
        raise ValueError("the name is empty")
    if not name.isprintable() or len(name) > 128:
        raise ValueError("the name must be printable, at most 128 characters")
    return name


def _ingress_entry(name: str, port: str, disable_tls: str) -> IngressEntry:
    if disable_tls not in _BOOLS:
        raise ValueError(f"disableTLS {disable_tls!r} is not a boolean "
                         f"({', '.join(_BOOLS)})")  # fmt: skip
    return IngressEntry(_checked(name), _port(port), _BOOLS[disable_tls])


def _egress_entry(name: str, listen: str, remote: str) -> EgressEntry:
    ip_text, sep, port_text = listen.rpartition(":")
    try:
        ip = ipaddress.IPv4Address(ip_text) if sep else None
    except ValueError:
        ip = None
    if ip is None:
        raise ValueError(f"listen address {listen!r} is not IPv4:PORT")
    if ip not in LOOPBACK:
        raise ValueError(f"listen address {ip} is not in {LOOPBACK}")
    listen_port = _port(port_text, "listen port")
    host, sep, port_text = remote.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not re.fullmatch(r"[A-Za-z0-9.:\-]{1,253}", host):
        raise ValueError(f"remote {remote!r} is not HOST:PORT")
    remote_port = _port(port_text, "remote port")
    if (host, remote_port) == (str(ip), listen_port):
        raise ValueError("the remote is the listen address itself (a loop)")
    return EgressEntry(_checked(name), str(ip), listen_port, host, remote_port)


# -- with the rest of the sidecar config -----------------------------------------------------


def with_environment(config: SidecarConfig, environ: Mapping[str, str]) -> SidecarConfig:
    """``config`` with the setting from ``environ`` (if any), checked against the rest."""
    proxy = from_environment(environ)
    if proxy is not None:
        if config.contrast is not None:
            from teemesh.config import ConfigError  # noqa: PLC0415

            raise ConfigError(SOURCE, [f"{', '.join(v for v in VARIABLES if v in environ)}: "
                                       "the configuration file has a contrast section too: "
                                       "use one or the other"])  # fmt: skip
        config = dataclasses.replace(config, contrast=proxy)
        problems = proxy_problems(config)
        if problems:
            from teemesh.config import ConfigError  # noqa: PLC0415

            raise ConfigError(SOURCE, problems)
    return config


def proxy_problems(config: SidecarConfig) -> list[str]:
    """What the entries alone cannot show: listeners colliding, loops, open callers."""
    proxy = config.contrast
    if proxy is None:
        return []
    problems: list[str] = []
    listeners = inbound(config)
    wildcard = config.address in ("0.0.0.0", "::", "[::]")  # noqa: S104 (what is refused)
    if (listeners or proxy.admin_port) and wildcard:
        problems.append(f"contrast: the ingress listeners bind address {config.address}; give "
                        "the CVM's own address (the apps bind 127.0.0.1)")  # fmt: skip
    own = _sidecar_listeners(config)
    own_ports = {port: service for (_, port), service in own.items()}
    for listener in listeners:
        problems += _inbound_problems(config, proxy, listener, own_ports)
    if proxy.admin_port and proxy.admin_port == config.ingress_port:
        problems.append(f"contrast: admin port {proxy.admin_port}: is the sidecar's own "
                        "ingress port")  # fmt: skip
    taken = {(config.vips()[n], r.port): f"route {n}" for n, r in config.routes.items()}
    taken |= {(b.host, b.port): f"backend {n}" for n, b in config.backends.items()}
    taken |= own
    for entry in proxy.egress:
        what = taken.get((entry.listen_ip, entry.listen_port))
        if what is not None:
            problems.append(f"contrast: egress {entry.name} listens where {what} does "
                            f"({entry.listen_ip}:{entry.listen_port})")  # fmt: skip
    return problems


def _inbound_problems(
    config: SidecarConfig, proxy: ContrastProxy, listener: Inbound, own_ports: dict[int, str]
) -> list[str]:
    """``own_ports``: the sidecar's own loopback services by port."""
    what = f"contrast: port {listener.port} ({listener.name})"
    problems = []
    if listener.target == config.address:
        problems.append(f"{what}: a listener on {config.address} would relay to itself; "
                        "the app binds loopback, the sidecar the CVM's address")  # fmt: skip
    if listener.port == config.ingress_port:
        problems.append(f"{what}: is the sidecar's own ingress port")
    if listener.backend is None and listener.port in own_ports:
        problems.append(f"{what}: is {own_ports[listener.port]}, which stays inside the CVM "
                        "(it acts as this CVM)")  # fmt: skip
    if listener.port == proxy.admin_port and listener.mode == "mtls":
        problems.append(f"{what}: is the admin port too")
    elif listener.port == proxy.admin_port:
        problems.append(f"{what}: is the admin port (plain HTTP): list it with disableTLS "
                        "true (the exemption Contrast needs) or not at all")  # fmt: skip
    open_port = listener.mode != "mtls" and listener.backend is not None
    if open_port and config.callers_of(str(listener.backend)) is not None:
        problems.append(f"{what}: backend {listener.backend} admits only some groups (its "
                        "routes' callers), so it needs client certificates")  # fmt: skip
    return problems


def _sidecar_listeners(config: SidecarConfig) -> dict[tuple[str, int], str]:
    """The sidecar's own loopback services, by ``(host, port)``: none may be opened to the
    network, nor taken by an egress listener."""
    own = {split_host_port(config.api): "the sidecar's API"}
    if config.client_proxy is not None:
        own[split_host_port(config.client_proxy.listen)] = "the client proxy"
    if config.auth is not None:
        own[split_host_port(config.auth.listen)] = "the auth service"
    return own


def contrast_from_json(doc: dict[str, Any] | None) -> ContrastProxy | None:
    """Rebuild a checked setting from its JSON (``asdict``), for the sidecar process."""
    if doc is None:
        return None
    ingress = tuple(IngressEntry(**e) for e in doc["ingress"])
    egress = tuple(EgressEntry(**e) for e in doc["egress"])
    return ContrastProxy(ingress, doc["ingress_disabled"], egress, doc["admin_port"])
