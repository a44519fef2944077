"""What the fuzz tests share: the "value or InputError" wrapper, JSON values, hex-like strings.

Each test module passes its own text strategy (label-like for the coordinator, surrogate-heavy for
the evidence parsers, ...) where its inputs differ; the shapes are the same everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st

from teemesh.errors import EvidenceError, InputError

NEAR_HEX = (
    *("", "0x", "0X", "0X00", "abc", "zz", "0xg0"),
    *("ab" * 20, "ab" * 32, "ab" * 48, "AB" * 20, "AB" * 48),
)
"""Hex that is almost right: empty, a bare prefix, odd length, not hex, 20/32/48 bytes."""

TEXT = st.text(max_size=16) | st.sampled_from(("", "\ud800", "a\udfffb", "0x", "é", "\x00"))
"""Short text, lone surrogates included (JSON can carry them as escapes, UTF-8 cannot)."""


def input_error_only(parse: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The parser's value, or None when it raised InputError; anything else fails the test.

    An InputError must say what is wrong, and an EvidenceError also name its field.
    """
    try:
        return parse(*args, **kwargs)
    except InputError as exc:
        assert str(exc), "an InputError must say what is wrong"
        if isinstance(exc, EvidenceError):
            assert exc.field, "an EvidenceError must name a field"
        return None


def hexish(max_bytes: int = 40) -> st.SearchStrategy[str]:
    """Strings a hex field may be given: hex (lower, or upper with 0x), near misses, any text."""
    return (
        st.binary(max_size=max_bytes).map(bytes.hex)
        | st.binary(max_size=max_bytes).map(lambda b: "0x" + b.hex().upper())
        | st.sampled_from(NEAR_HEX)
        | st.text(max_size=20)
    )


def json_scalars(text: st.SearchStrategy[str] = TEXT) -> st.SearchStrategy[Any]:
    """null, booleans, integers, floats (NaN and infinities too), ``text`` and hex-like strings."""
    return st.none() | st.booleans() | st.integers() | st.floats() | text | hexish()


def json_values(
    text: st.SearchStrategy[str] = TEXT, scalars: st.SearchStrategy[Any] | None = None
) -> st.SearchStrategy[Any]:
    """Any JSON value: lists and objects (keys from ``text``) over ``scalars`` (json_scalars)."""
    return st.recursive(
        json_scalars(text) if scalars is None else scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
        max_leaves=12,
    )
