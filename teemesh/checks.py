"""Field types with their checks, usable in pydantic models and in plain frozen dataclasses.

A ``Check`` is annotation metadata that pydantic runs after its own type check, yet importing
this module costs nothing: the sidecar's data plane keeps its configuration as dataclasses and
never loads pydantic (about 12 MB of resident memory), while the CLI validates the very same
classes with pydantic, every problem reported with its path.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from annotated_types import Ge, Le

from teemesh.encoding import DNS_LABEL

STRICT: Any = {"extra": "forbid", "frozen": True}
"""``__pydantic_config__`` for a configuration dataclass: unknown keys are errors (typos)."""


@dataclass(frozen=True)
class Check:
    """Run ``check`` on the value once its type is right; it raises ValueError to refuse."""

    check: Callable[[Any], Any]

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema  # noqa: PLC0415 (validation happens in the CLI)

        return core_schema.no_info_after_validator_function(self.check, handler(source))


def _label(value: str) -> str:
    if not DNS_LABEL.fullmatch(value):
        raise ValueError(f"{value!r} is not a DNS label (a-z, 0-9 and '-', at most 63)")
    return value


def _address(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9.:\-\[\]]{1,253}", value):
        raise ValueError(f"{value!r} is not a host name or IP address")
    return value


def split_host_port(value: str) -> tuple[str, int]:
    """``HOST:PORT`` as (host, port); ValueError when it is not one."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def _host_port(value: str) -> str:
    split_host_port(value)
    return value


def _loopback(value: str) -> str:
    try:
        loopback = ipaddress.ip_address(value) in ipaddress.ip_network("127.0.0.0/8")
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"{value} is not a loopback address (127.0.0.0/8)")
    return value


def _loopback_host_port(value: str) -> str:
    _loopback(split_host_port(value)[0])
    return value


_DOMAIN = re.compile(r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9-]{1,63}")


def _domain(value: str) -> str:
    if not _DOMAIN.fullmatch(value):
        raise ValueError(f"{value!r} is not a lower-case domain name")
    return value


Label = Annotated[str, Check(_label)]
Domain = Annotated[str, Check(_domain)]
Address = Annotated[str, Check(_address)]
HostPort = Annotated[str, Check(_host_port)]
Loopback = Annotated[str, Check(_loopback)]
LoopbackHostPort = Annotated[str, Check(_loopback_host_port)]
"""``HOST:PORT`` on loopback: for listeners that act as this CVM and so must stay inside it."""
Port = Annotated[int, Ge(1), Le(65535)]
Health = Literal["passing", "warning", "critical"]
"""A catalog instance's health, as Consul names it."""
