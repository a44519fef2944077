"""Which app a custom domain names: TXT records ``"<app_id>:<port>"``, as in dstack.

For an SNI outside every base domain the gateway tries ``_dstack-app-address.<sni>``, then the
legacy ``_tapp-address.<sni>``, then ``_dstack-app-address-wildcard.<parent of sni>``; the first
name with a record wins. ``candidate_names`` is that order, and both resolvers follow it: the
static one (a YAML file, for tests and air-gapped setups) and the DNS one.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.resolver
import yaml

from teemesh.encoding import DNS_LABEL
from teemesh.errors import InputError, InternalError, PeerError

DEFAULT_PREFIX = "_dstack-app-address"
LEGACY_PREFIX = "_tapp-address"
_PORT = re.compile(r"[0-9]{1,5}")


@dataclass(frozen=True)
class AppAddress:
    app_id: str
    port: int


def parse_app_address(text: str, *, field: str = "app_address") -> AppAddress:
    """``"<app_id>:<port>"`` (surrounding spaces ignored); InputError says what is wrong."""
    app_id, colon, port_text = text.strip().rpartition(":")
    if not colon:
        raise InputError(f"expected '<app_id>:<port>', got {text[:80]!r}", field=field)
    if not DNS_LABEL.fullmatch(app_id):
        raise InputError(
            f"app id {app_id[:80]!r} must be 1 to 63 lower-case letters, digits or inner '-'",
            field=field,
        )
    port = int(port_text) if _PORT.fullmatch(port_text) else 0
    if not 1 <= port <= 65535:
        raise InputError(f"port {port_text[:80]!r} is not a number from 1 to 65535", field=field)
    return AppAddress(app_id, port)


def candidate_names(sni: str, prefix: str = DEFAULT_PREFIX, compat: bool = True) -> list[str]:
    """The TXT names to try for ``sni``, in order (the wildcard needs a parent domain)."""
    name = sni.lower().removesuffix(".")
    names = [f"{prefix}.{name}"]
    if compat:
        names.append(f"{LEGACY_PREFIX}.{name}")
    _, dot, parent = name.partition(".")
    if dot:
        names.append(f"{prefix}-wildcard.{parent}")
    return names


class Resolver(Protocol):
    async def lookup(self, sni: str) -> AppAddress | None:
        """The app ``sni`` names; None without a record.

        InputError for a malformed record, PeerError when DNS itself fails or times out.
        """
        ...


def _canonical(name: str) -> str:
    return name.lower().removesuffix(".")


class StaticResolver:
    """TXT records from a mapping of name to value, the names ``candidate_names`` gives."""

    def __init__(
        self, records: Mapping[str, str], prefix: str = DEFAULT_PREFIX, compat: bool = True
    ) -> None:
        self.records = {_canonical(name): value for name, value in records.items()}
        self.prefix, self.compat = prefix, compat

    @classmethod
    def from_file(
        cls, path: str | Path, prefix: str = DEFAULT_PREFIX, compat: bool = True
    ) -> StaticResolver:
        """A YAML mapping ``name: "<app_id>:<port>"``; every value is checked here, at load."""
        where = str(path)
        try:
            doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read the TXT records file: {exc}", field=where) from exc
        except yaml.YAMLError as exc:
            raise InputError(f"not YAML: {exc}", field=where) from exc
        if doc is None:
            doc = {}
        if not isinstance(doc, dict):
            raise InputError(
                f"expected a mapping of TXT name to value, got {type(doc).__name__}", field=where
            )
        records: dict[str, str] = {}
        for name, value in doc.items():
            if not isinstance(name, str) or not name:
                raise InputError(f"TXT name {name!r} is not a non-empty string", field=where)
            key = f"{where}: {name}"
            if not isinstance(value, str):
                # unquoted 123:45 is a YAML 1.1 base-60 integer
                raise InputError(
                    f"expected a quoted string '<app_id>:<port>', got {type(value).__name__}",
                    field=key,
                )
            parse_app_address(value, field=key)
            if _canonical(name) in records:
                raise InputError("the same TXT name twice (names ignore case)", field=key)
            records[_canonical(name)] = value
        return cls(records, prefix, compat)

    async def lookup(self, sni: str) -> AppAddress | None:
        for name in candidate_names(sni, self.prefix, self.compat):
            value = self.records.get(name)
            if value is not None:
                return parse_app_address(value, field=name)
        return None


class DnsResolver:
    """TXT lookups through DNS: the first string of the first name that has a record.

    ``timeout`` bounds a whole lookup, every candidate name included. Without
    ``nameservers`` the system's (``/etc/resolv.conf``) are used.
    """

    def __init__(
        self,
        nameservers: Sequence[tuple[str, int]] | None = None,
        timeout: float = 2.0,
        prefix: str = DEFAULT_PREFIX,
        compat: bool = True,
    ) -> None:
        try:
            self._resolver = dns.asyncresolver.Resolver(configure=nameservers is None)
        except dns.exception.DNSException as exc:
            raise InternalError(f"no DNS configuration to resolve custom domains: {exc}") from exc
        if nameservers is not None:
            if not nameservers:
                raise InputError("an empty list of nameservers", field="nameservers")
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(host, port) for host, port in nameservers
            ]
        self._resolver.timeout = timeout
        self.timeout, self.prefix, self.compat = timeout, prefix, compat

    async def lookup(self, sni: str) -> AppAddress | None:
        deadline = time.monotonic() + self.timeout
        for name in candidate_names(sni, self.prefix, self.compat):
            try:
                qname = dns.name.from_text(name)
            except dns.exception.DNSException:
                continue  # too long for DNS, so no record can exist there
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PeerError(f"DNS lookup for {sni!r} timed out after {self.timeout} s")
            try:
                answer = await self._resolver.resolve(
                    qname, "TXT", lifetime=remaining, search=False
                )
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except dns.exception.Timeout as exc:
                raise PeerError(
                    f"DNS lookup of TXT {name} timed out after {self.timeout} s"
                ) from exc
            except dns.exception.DNSException as exc:
                raise PeerError(f"DNS lookup of TXT {name} failed: {exc}") from exc
            return _first_string(answer, name)
        return None


def _first_string(answer: dns.resolver.Answer, name: str) -> AppAddress:
    strings: tuple[bytes, ...] = ()
    for rdata in answer:
        strings = tuple(getattr(rdata, "strings", ()))
        break
    first = strings[0] if strings else b""
    try:
        text = first.decode("ascii")
    except UnicodeDecodeError:
        raise InputError(f"TXT value {first[:80]!r} is not ASCII", field=name) from None
    return parse_app_address(text, field=name)
