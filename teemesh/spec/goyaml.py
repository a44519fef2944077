"""Compose's YAML: plain scalars read as go-yaml v3 reads them into ``interface{}``.

Docker Compose v2 (compose-go) loads a file with go-yaml v3 into untyped maps, so that is what
a compose file means on dstack. PyYAML reads YAML 1.1, which differs (``on`` is true there and a
string for compose; ``1:30`` is 90 there and a string for compose). ``teemesh render`` reads a
user's compose file and writes it into a measured document, so it reads with compose's rules
(``ComposeLoader``) and writes text that both compose and PyYAML read back the same
(``ComposeDumper`` quotes every string either would take for something else).

go-yaml v3's rules, for an untagged plain scalar: null, true/false (three spellings each),
.inf/.nan are looked up; text starting with a sign or digit is an int by Go's ``ParseInt(s, 0,
64)`` (``0x``, ``0o``, ``0b``, and a leading ``0`` for octal: ``0755`` is 493) after dropping
``_``, else an unsigned int, else a float if it looks like one (``08`` is 8.0); text starting
with ``.`` is a float if Go parses it; anything else, timestamps included, is a string.
"""

from __future__ import annotations

import math
import re
from typing import Any

import yaml
from yaml.constructor import ConstructorError

PLAIN = "tag:teemesh.dev,2026:compose-plain"
"""The one tag every plain scalar resolves to: its meaning is ``go_scalar`` of its text."""
STR = "tag:yaml.org,2002:str"
_NULL = frozenset({"", "~", "null", "Null", "NULL"})
_BOOL = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
_SPECIAL = {
    **dict.fromkeys((".nan", ".NaN", ".NAN"), math.nan),
    **dict.fromkeys((".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF"), math.inf),
    **dict.fromkeys(("-.inf", "-.Inf", "-.INF"), -math.inf),
}
_LOOKUP: dict[str, Any] = {**dict.fromkeys(_NULL, None), **_BOOL, **_SPECIAL}
_FLOAT = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?")
"""go-yaml's ``yamlStyleFloat``."""
_DIGITS = {2: re.compile("[01]+"), 8: re.compile("[0-7]+"), 10: re.compile("[0-9]+"),
           16: re.compile("[0-9a-fA-F]+")}  # fmt: skip
_PREFIX = {"0x": 16, "0o": 8, "0b": 2}


def go_scalar(text: str) -> Any:
    """What go-yaml v3 makes of the plain scalar ``text`` in an untyped map."""
    if text in _LOOKUP:
        return _LOOKUP[text]
    if text[0] == ".":  # Go's ParseFloat of the text as it is
        return _float(text) if _FLOAT.fullmatch(text) else text
    if text[0] not in "+-0123456789":
        return text
    plain = text.replace("_", "")
    number = _go_int(plain)
    if number is None and _FLOAT.fullmatch(plain):
        return _float(plain)
    return text if number is None else number


def _float(text: str) -> Any:
    """Go's ParseFloat, which refuses what overflows (the text then stays text)."""
    value = float(text)
    return text if math.isinf(value) else value


def _go_int(plain: str) -> int | None:
    """Go's ``ParseInt(plain, 0, 64)``, then ``ParseUint(plain, 0, 64)``; None if neither."""
    sign, body = (plain[0], plain[1:]) if plain[:1] in ("+", "-") else ("", plain)
    base = _PREFIX.get(body[:2].lower())
    if base is not None:
        digits = body[2:]
    elif len(body) > 1 and body[0] == "0":
        base, digits = 8, body[1:]
    else:
        base, digits = 10, body
    if not _DIGITS[base].fullmatch(digits):
        return None
    value = int(digits, base) * (-1 if sign == "-" else 1)
    if -(2**63) <= value < 2**63 or (not sign and value < 2**64):
        return value
    return None


def _plain(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    return go_scalar(loader.construct_scalar(node))  # type: ignore[arg-type]


def _typed(kind: type | tuple[type, ...], what: str) -> Any:
    """An explicitly tagged scalar (``!!int 7``): read as compose reads it, and of that kind."""

    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        value = go_scalar(loader.construct_scalar(node))  # type: ignore[arg-type]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConstructorError(None, None, f"cannot read {node.value!r} as {what}",
                                   node.start_mark)  # fmt: skip
        return value

    return construct


class ComposeLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading plain scalars as compose does (``go_scalar``); merge keys
    work; tags other than str, seq, map, int, float, bool and null are refused."""

    yaml_implicit_resolvers = {}  # noqa: RUF012 (PyYAML's registry: ours, not SafeLoader's)
    yaml_constructors = {  # noqa: RUF012
        tag: constructor
        for tag, constructor in yaml.SafeLoader.yaml_constructors.items()
        if tag in ("tag:yaml.org,2002:str", "tag:yaml.org,2002:seq", "tag:yaml.org,2002:map")
    }


ComposeLoader.add_implicit_resolver("tag:yaml.org,2002:merge", re.compile(r"^<<$"), ["<"])
ComposeLoader.add_implicit_resolver(PLAIN, re.compile(r"(?s)^.*$"), None)
ComposeLoader.add_constructor(PLAIN, _plain)
ComposeLoader.add_constructor("tag:yaml.org,2002:int", _typed(int, "an integer"))
ComposeLoader.add_constructor("tag:yaml.org,2002:float", _typed((float, int), "a float"))
ComposeLoader.add_constructor("tag:yaml.org,2002:bool", _typed(bool, "a boolean"))
ComposeLoader.add_constructor("tag:yaml.org,2002:null", _typed(type(None), "null"))


class ComposeDumper(yaml.SafeDumper):
    """PyYAML's safe writer, quoting a string that compose (``go_scalar``) or PyYAML would read
    as anything but that string; numbers, booleans and null it writes in forms both read
    alike."""

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        tag = super().resolve(kind, value, implicit)  # type: ignore[no-untyped-call]
        if (
            kind is yaml.ScalarNode
            and implicit[0]
            and tag == STR
            and not isinstance(go_scalar(value), str)
        ):
            return PLAIN  # not str's tag: a string with this text is written quoted
        return tag


def load_compose_yaml(text: str) -> Any:
    """One compose document (``yaml.YAMLError`` or ``RecursionError`` if not)."""
    return yaml.load(text, Loader=ComposeLoader)  # noqa: S506 (a SafeLoader)


def dump_compose_yaml(doc: Any) -> str:
    """Block style, keys in the order given, no line folding: one text per document."""
    return yaml.dump(
        doc,
        Dumper=ComposeDumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        width=1 << 30,
    )
