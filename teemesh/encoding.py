"""Hex and JSON helpers shared by every parser of untrusted input."""

from __future__ import annotations

import binascii
import json
import re
from collections.abc import Mapping
from typing import Any

from teemesh.errors import InputError

_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
"""Cluster, group, peer and service names: DNS labels, so they fit SPIFFE ids, hostnames and
etcd key prefixes alike."""


def parse_hex(
    value: object,
    *,
    field: str,
    size: int | None = None,
    max_size: int | None = None,
    error: type[InputError] = InputError,
) -> bytes:
    """Decode hex that may carry a ``0x`` prefix; ``size`` demands an exact byte length."""
    if not isinstance(value, str):
        raise error(f"expected a hex string, got {type(value).__name__}", field=field)
    text = value[2:] if value[:2] in ("0x", "0X") else value
    if len(text) % 2:
        raise error(f"hex has an odd number of digits ({len(text)})", field=field)
    if not _HEX_DIGITS.issuperset(text):
        bad = next(c for c in text if c not in _HEX_DIGITS)
        raise error(f"not hex: unexpected character {bad!r}", field=field)
    data = binascii.unhexlify(text)
    if size is not None and len(data) != size:
        raise error(f"expected {size} bytes, got {len(data)}", field=field)
    if max_size is not None and len(data) > max_size:
        raise error(f"at most {max_size} bytes allowed, got {len(data)}", field=field)
    return data


def string_field(doc: Mapping[str, Any], name: str, *, field: str) -> str:
    """``doc[name]`` as a string; missing or another type names ``field.name``."""
    value = doc.get(name)
    if not isinstance(value, str):
        raise InputError("missing or not a string", field=f"{field}.{name}")
    return value


def is_hex_text(data: bytes) -> bool:
    """True when ``data`` is ASCII hex (optionally ``0x``-prefixed), ignoring outer space."""
    text = data.strip()
    if text[:2] in (b"0x", b"0X"):
        text = text[2:]
    return bool(text) and len(text) % 2 == 0 and all(chr(c) in _HEX_DIGITS for c in text)


def load_json(text: str | bytes, *, field: str, error: type[InputError] = InputError) -> Any:
    """Parse JSON, naming the field and position of a syntax error.

    Lone surrogates (``"\\ud800"``) are refused here, once for every caller: Python's json
    accepts them, and the first ``.encode()`` downstream would crash on them.
    """
    try:
        doc = json.loads(text)
    except UnicodeDecodeError as exc:
        raise error(f"not UTF-8 text: {exc.reason}", field=field) from exc
    except json.JSONDecodeError as exc:
        raise error(
            f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}", field=field
        ) from exc
    except RecursionError as exc:
        raise error("JSON nested too deeply", field=field) from exc
    except ValueError as exc:  # json's limit on integer digits (4300) is a bare ValueError
        raise error(f"invalid JSON: {exc}", field=field) from exc
    if _MAYBE_SURROGATE.search(text if isinstance(text, str) else text.decode(errors="replace")):
        check_unicode(doc, field=field, error=error)
    return doc


_MAYBE_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]|[\ud800-\udfff]")


def check_unicode(doc: Any, *, field: str, error: type[InputError] = InputError) -> None:
    """Refuse a lone surrogate anywhere in decoded JSON, naming the path of the bad string."""
    stack: list[tuple[Any, str]] = [(doc, field)]
    while stack:
        value, where = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                stack.append((key, where))
                stack.append((item, f"{where}.{key}"))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(value))
        elif isinstance(value, str):
            try:
                value.encode()
            except UnicodeEncodeError as exc:
                raise error("not valid Unicode (lone surrogate)", field=where) from exc
