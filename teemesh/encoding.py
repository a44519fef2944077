"""Hex and JSON helpers shared by every parser of untrusted input."""

from __future__ import annotations

import binascii
import json
from typing import Any

from teemesh.errors import InputError

_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


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


def utf8_text(value: str, *, field: str, error: type[InputError] = InputError) -> str:
    """Refuse strings that cannot be UTF-8 encoded (JSON can smuggle in lone surrogates)."""
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        raise error("not valid Unicode (lone surrogate)", field=field) from exc
    return value


def is_hex_text(data: bytes) -> bool:
    """True when ``data`` is ASCII hex (optionally ``0x``-prefixed), ignoring outer space."""
    text = data.strip()
    if text[:2] in (b"0x", b"0X"):
        text = text[2:]
    return bool(text) and len(text) % 2 == 0 and all(chr(c) in _HEX_DIGITS for c in text)


def load_json(text: str | bytes, *, field: str, error: type[InputError] = InputError) -> Any:
    """Parse JSON, naming the field and position of a syntax error."""
    try:
        return json.loads(text)
    except UnicodeDecodeError as exc:
        raise error(f"not UTF-8 text: {exc.reason}", field=field) from exc
    except json.JSONDecodeError as exc:
        raise error(
            f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}", field=field
        ) from exc
    except RecursionError as exc:
        raise error("JSON nested too deeply", field=field) from exc
