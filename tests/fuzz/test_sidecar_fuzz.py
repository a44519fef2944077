"""Fuzz the sidecar's parsers: each returns a value or raises ``InputError``, never anything else.

Targets: the tunnel header (``split_head``, ``parse_request``, ``parse_reply``), catalog entries
(``Instance.from_value`` and watch events through ``InstanceTable``) and the configuration file
(``load_sidecar_config``). Whatever parses must also round-trip or satisfy its invariants.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
from pathlib import Path
from typing import Any

import fuzzkit
import pytest
import yaml
from cryptography.hazmat.primitives.serialization import Encoding
from fuzzkit import input_error_only
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from teemesh.config import ConfigError
from teemesh.encoding import DNS_LABEL
from teemesh.errors import InputError, PeerError
from teemesh.identity.certs import new_p256_key
from teemesh.identity.meshca import issue_svid, mesh_ca_cert, mesh_ca_key
from teemesh.identity.svid import read_svid
from teemesh.sidecar.config import SidecarConfig, load_sidecar_config
from teemesh.sidecar.routing import Instance, InstanceTable
from teemesh.sidecar.tunnel import (
    HEAD_END,
    MAX_HEAD,
    Refusal,
    Target,
    accepted,
    connect_request,
    parse_reply,
    parse_request,
    refused,
    split_head,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_SMALL = settings(FUZZ, max_examples=120)  # slower examples: files, or many values each


def _svid_der() -> bytes:

    ca_key = mesh_ca_key(b"\x03" * 32)
    cert = issue_svid(
        ca_key, mesh_ca_cert(ca_key, "demo"), new_p256_key().public_key(),
        spiffe="spiffe://demo/web/web-0", peer_id="web-0", app_id=b"a" * 20,
        now=dt.datetime.now(dt.UTC), ttl=dt.timedelta(hours=1),
    )  # fmt: skip
    return cert.public_bytes(Encoding.DER)


SVID_DER = _svid_der()

labels = st.from_regex(DNS_LABEL, fullmatch=True)
ports = st.integers(1, 65535)
targets = st.builds(Target, labels, ports)

# -- the tunnel header -----------------------------------------------------------------------

PIECES = (
    b"CONNECT ", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.1 200 ", b"HTTP/1.1 503 x", b"db", b":",
    b"5432", b"0", b"65536", b"\r\n", b"\r\n\r\n", b"\r", b"\n", b" ", b"Host: db:1",
    b"x-teemesh-refusal: ", b"DRAINING", b"REVOKED", b"\xff", b"\x00", b"-", b"A",
)  # fmt: skip
heads = st.lists(st.sampled_from(PIECES) | st.binary(max_size=8), max_size=12).map(b"".join)
wire = heads | st.binary(max_size=64) | st.builds(bytes.__add__, heads, st.binary(max_size=16))


@FUZZ
@given(wire)
@example(b"x" * (MAX_HEAD + 1))
@example(b"x" * MAX_HEAD + HEAD_END)
def test_split_head_parts_or_input_error(buffer: bytes) -> None:
    try:
        parts = split_head(buffer)
    except InputError as exc:
        assert exc.field == "tunnel"
        assert len(buffer) > MAX_HEAD
        return
    if parts is None:
        assert HEAD_END not in buffer
        return
    head, rest = parts
    assert head + HEAD_END + rest == buffer
    assert HEAD_END not in head
    assert len(head) <= MAX_HEAD


def verdict(buffer: bytes) -> tuple[bytes, bytes] | str | None:
    try:
        return split_head(buffer)
    except InputError:
        return "too long"


@FUZZ_SMALL
@given(
    st.integers(0, 40) | st.integers(MAX_HEAD - 6, MAX_HEAD + 6), st.binary(max_size=8), st.data()
)
def test_split_head_verdict_does_not_depend_on_the_cuts(size: int, rest: bytes, data: Any) -> None:
    """Fed a stream read by read (as the ingress and egress do), no prefix gets another answer
    than the whole stream: a head accepted whole is never refused on the way, and vice versa."""
    stream = b"h" * size + HEAD_END + rest
    whole = verdict(stream)
    near_end = st.integers(max(1, size - 2), size + len(HEAD_END))  # where the head may end
    cuts = data.draw(st.lists(st.integers(1, len(stream)) | near_end, max_size=4))
    for cut in cuts:
        answer = verdict(stream[:cut])
        if answer is None:
            continue
        if whole == "too long":
            assert answer == "too long"
        else:
            assert answer != "too long", f"a {size}-byte head refused when cut at {cut}"
            assert answer[0] == whole[0]


@FUZZ
@given(wire)
def test_parse_request_target_or_input_error(head: bytes) -> None:
    target = input_error_only(parse_request, head)
    if target is not None:
        assert DNS_LABEL.fullmatch(target.backend)
        assert 1 <= target.port <= 65535
        assert parse_request(connect_request(target)[: -len(HEAD_END)]) == target


@FUZZ_SMALL
@given(targets, st.binary(max_size=64))
def test_connect_request_round_trip(target: Target, early: bytes) -> None:
    parts = split_head(connect_request(target) + early)
    assert parts is not None
    head, rest = parts
    assert rest == early
    assert parse_request(head) == target


@FUZZ
@given(wire)
def test_parse_reply_refusal_or_input_error(head: bytes) -> None:
    try:
        reply = parse_reply(head)
    except InputError as exc:
        assert str(exc)
        return
    assert reply is None or isinstance(reply, Refusal)
    if reply is None:
        assert head.startswith(b"HTTP/1.1 200 ")


@FUZZ
@given(st.sampled_from([None, *Refusal]), st.binary(max_size=64))
def test_reply_round_trip(reason: Refusal | None, rest: bytes) -> None:
    reply = accepted() if reason is None else refused(reason)
    parts = split_head(reply + rest)
    assert parts is not None
    assert parts[1] == rest
    assert parse_reply(parts[0]) is reason


# -- catalog entries -------------------------------------------------------------------------

FIELDS = ("service", "group", "peer_id", "address", "port", "tags", "health", "instance_id")
json_values = fuzzkit.json_values()
odd_numbers = st.sampled_from([float("inf"), float("-inf"), float("nan"), 1e300, 0.5, True, -1])
field_values = (
    json_values | ports | odd_numbers | st.sampled_from(["db", "critical", "7443", " 80 ", "1_0"])
)


@st.composite
def catalog_values(draw: st.DrawFn) -> Any:
    """An instance entry with some fields left out or replaced, maybe as JSON text."""
    entry: dict[str, Any] = {
        "service": "db", "group": "db", "peer_id": "db-1", "address": "10.0.0.1", "port": 7443,
        "tags": {"role": "primary"},
    }  # fmt: skip
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        if draw(st.booleans()):
            entry.pop(name, None)
        else:
            entry[name] = draw(field_values)
    as_text = draw(st.sampled_from(["dict", "str", "bytes"]))
    if as_text == "dict":
        return entry
    text = json.dumps(entry)  # NaN and infinities as JSON's common extension, as Python writes
    return text if as_text == "str" else text.encode()


@FUZZ
@given(json_values | catalog_values() | st.binary(max_size=32))
@example({"service": "db", "group": "g", "peer_id": "p", "address": "a", "port": float("inf")})
def test_instance_from_value_never_raises(value: Any) -> None:
    instance = Instance.from_value("instances/db/db-1", value)
    if instance is not None:
        assert 1 <= instance.port <= 65535
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in instance.tags.items())


events = st.fixed_dictionaries(
    {"type": st.sampled_from(["put", "delete"]) | json_values},
    optional={"key": st.sampled_from(["instances/db/a", "instances/db/b"]) | json_values,
              "value": catalog_values() | json_values},
)  # fmt: skip


@FUZZ_SMALL
@given(
    st.dictionaries(st.text(max_size=8), catalog_values(), max_size=4),
    st.lists(events, max_size=6),
)
def test_instance_table_skips_what_it_cannot_use(snapshot: dict[str, Any], batch: Any) -> None:
    table = InstanceTable()
    table.load(snapshot)
    table.apply(batch)
    for key, instance in table.instances.items():
        assert instance.key == key
        assert 1 <= instance.port <= 65535


# -- the configuration file ------------------------------------------------------------------

PEM = "-----BEGIN PUBLIC KEY-----\nplatform\n-----END PUBLIC KEY-----\n"
GOOD: dict[str, Any] = {
    "cluster": "demo",
    "group": "web",
    "peer_id": "web-1",
    "coordinators": ["https://127.0.0.1:8443"],
    "coordinator_policy": {"tee": "simulated", "platform_key": "platform.pub"},
    "address": "10.0.0.1",
    "backends": {"db": {"port": 5432}},
    "routes": {"db": {"backend": "db", "port": 5432, "callers": ["web"]}},
}
CONFIG_FIELDS = (*(f.name for f in dataclasses.fields(SidecarConfig)), "extra")
text = st.text(st.characters(blacklist_characters="/"), max_size=12)
platform_keys = st.sampled_from([PEM, "platform.pub", "missing.pub", ".", "sub/x", "\x00", ""])
YAML_SCALARS = (
    "2001-13-01", "2001-02-30 10:00:00", "1e400", "0x10", "0o17", "!!binary AA", "!!float x",
    "!!int x", "&a x", "*a", "~", "null", "'", '"\\ud800"', "{", "[a, {b: c}]", "|\n  x", "yes",
)  # fmt: skip
YAML_LINES = (
    "%YAML 1.1\n---\n", "...\n", "? [a]\n: 1\n", "<<: 1\n", "- x\n", "\t", "routes:\n",
    "  db: {backend: db, port: 5432}\n", "coordinator_policy: {tee: simulated, platform_key: .}\n",
)  # fmt: skip
keys = st.sampled_from([*CONFIG_FIELDS, "  db", "- a"]) | text
lines = st.sampled_from(YAML_LINES) | st.builds(
    "{}: {}\n".format, keys, st.sampled_from(YAML_SCALARS) | text
)
yaml_texts = st.lists(lines, max_size=8).map("".join) | st.sampled_from(YAML_SCALARS)


@st.composite
def documents(draw: st.DrawFn) -> Any:
    """A working document with a few fields changed, dropped or added."""
    doc = copy.deepcopy(GOOD)
    for name in draw(st.lists(st.sampled_from(CONFIG_FIELDS), max_size=4, unique=True)):
        if draw(st.booleans()):
            doc.pop(name, None)
        else:
            doc[name] = draw(json_values | st.dictionaries(labels, json_values, max_size=3))
    if isinstance(doc.get("coordinator_policy"), dict) and draw(st.booleans()):
        doc["coordinator_policy"]["platform_key"] = draw(platform_keys | text)
    return doc


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sidecar-fuzz")
    (path / "platform.pub").write_text(PEM)
    return path


def load_text(folder: Path, text: str) -> SidecarConfig | None:
    path = folder / "sidecar.yaml"
    path.write_text(text, errors="surrogatepass")
    try:
        return load_sidecar_config(path)
    except ConfigError as exc:
        assert exc.problems, "a ConfigError must list its problems"
        assert all(isinstance(p, str) and p for p in exc.problems)
        return None
    except InputError as exc:
        assert str(exc)
        return None


@FUZZ_SMALL
@given(documents())
def test_load_sidecar_config_documents(folder: Path, doc: Any) -> None:
    config = load_text(folder, yaml.safe_dump(doc))
    if config is not None:
        assert config.coordinator_policy.get("platform_key") in (None, PEM)
        assert len(set(config.vips().items())) == len(config.routes)


@FUZZ_SMALL
@given(yaml_texts | st.builds(yaml.safe_dump, json_values))
@example("peer_id: 2001-13-01\n")
def test_load_sidecar_config_any_text(folder: Path, text: str) -> None:
    load_text(folder, text)


@FUZZ
@given(st.binary(max_size=600), st.integers(0, 599), st.binary(max_size=8))
def test_svid_reader_on_mangled_certificates(noise: bytes, at: int, patch: bytes) -> None:
    """Any bytes, or a real SVID with bytes overwritten: an identity or PeerError, nothing else."""
    for data in (noise, SVID_DER[:at] + patch + SVID_DER[at + len(patch) :]):
        try:
            read_svid(data, "demo")
        except PeerError as exc:
            assert str(exc)
