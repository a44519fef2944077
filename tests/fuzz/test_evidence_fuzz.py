"""Fuzz the evidence parsers: each returns a value or raises ``InputError``, never anything else.

Random bytes rarely get past a quote header, so most strategies start from the real vectors
(conftest's ``vector_path``: ../shared/vectors or $TEEMESH_VECTORS) and a few valid inputs built
from them, and mutate them: truncate, flip, replace, insert, delete, splice two seeds, append
garbage, or overwrite a length field with an "interesting" integer.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fuzzkit
import pytest
from conftest import vector_path
from cryptography.hazmat.primitives.asymmetric import ec
from fuzzkit import input_error_only
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from teemesh.attest.dcap import CollateralStore
from teemesh.attest.dstack import KeyProvider, identity_from_events
from teemesh.attest.eventlog import RUNTIME_EVENT_TYPE, Event, parse_event_log, replay
from teemesh.attest.evidence import analyze, load_evidence
from teemesh.attest.policy import Policy
from teemesh.attest.quote import Quote, parse_quote
from teemesh.attest.scale import (
    AttestationV0,
    decode_attestation_v0,
    encode_attestation_v0,
    stripped,
)
from teemesh.attest.simulated import OsImage, PlatformKey, SimulatedCvm
from teemesh.attest.verify import verify_evidence
from teemesh.config import ConfigError, parse_model
from teemesh.errors import EvidenceError, InputError

SIM_QUOTE = "dstack/simulator/attestation.quote.bin"
SIM_ATTESTATION = "dstack/simulator/attestation.bin"
SIM_EVENT_LOG = "dstack/simulator/attestation.event_log.json"
QUOTE_REPORT = "dstack/verifier/quote-report.json"
DCAP_QUOTE = "dcap-qvl/tdx_quote"
DCAP_DIR = "dcap-qvl"
DCAP_COLLATERAL = "dcap-qvl/tdx_quote_collateral.json"
NEEDED = (SIM_QUOTE, SIM_ATTESTATION, SIM_EVENT_LOG, QUOTE_REPORT, DCAP_QUOTE, DCAP_COLLATERAL)

FUZZ = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ_SMALL = settings(FUZZ, max_examples=150)
FUZZ_MUTATE = settings(FUZZ, max_examples=800)  # cheap per example: mutations of real vectors


def _vector(relative: str) -> bytes:
    """A vector's bytes; conftest's ``vector_path`` fails (never skips) when it is missing."""
    return vector_path(relative).read_bytes()


@pytest.fixture(autouse=True, scope="module")
def _vectors_present() -> None:
    """Fail (never skip) every test here when a vector is missing."""
    for relative in NEEDED:
        _vector(relative)


# --------------------------------------------------------------------------- seeds


@dataclass(frozen=True)
class Seed:
    data: bytes
    hot: tuple[int, ...] = ()
    """Offsets of length and type fields, where a mutation is most likely to matter."""


@dataclass(frozen=True)
class Seeds:
    quotes: tuple[Seed, ...]
    real_quotes: dict[str, bytes]
    attestations: tuple[Seed, ...]
    event_logs: tuple[Seed, ...]
    json_docs: tuple[dict[str, Any], ...]
    platform_pem: str
    """Public key of the platform that signed the simulated seeds."""


def _quote_hot_offsets(data: bytes) -> tuple[int, ...]:
    """Header fields, the v5 body descriptor, and every length/type field of the signature."""
    quote = parse_quote(data)
    hot = [0, 2, 4, 8, 10, 12, 28, 48, 50, quote.signed_len]
    sig = quote.signed_len + 4
    cert_type = sig + 128
    hot += [sig, sig + 64, cert_type, cert_type + 2, cert_type + 6, len(quote.raw)]
    if quote.signature.cert_data_type == 6:
        auth = cert_type + 6 + 384 + 64
        auth_len = int.from_bytes(data[auth : auth + 2], "little")
        pck = auth + 2 + auth_len
        hot += [auth, auth + 2, pck, pck + 2, pck + 6]
    return tuple(hot)


def _as_v5(v4: bytes, body_type: int) -> bytes:
    """The same quote as a v5 quote with a TD 1.0 (2) or TD 1.5 (3) body descriptor."""
    quote = parse_quote(v4)
    header = bytearray(quote.raw[:48])
    header[0:2] = (5).to_bytes(2, "little")
    body = quote.raw[48 : quote.signed_len]
    if body_type == 3:
        body += bytes(range(64))  # tee_tcb_svn2 and mr_service_td
    rest = quote.raw[quote.signed_len :]
    descriptor = body_type.to_bytes(2, "little") + len(body).to_bytes(4, "little")
    return bytes(header) + descriptor + body + rest


def _simulated_cvm() -> SimulatedCvm:
    return SimulatedCvm(
        platform=PlatformKey(ec.derive_private_key(0x7EE5EED, ec.SECP256R1())),  # reproducible
        os_image=OsImage("fuzz-os"),
        app_compose=b'{"services": {"web": {"image": "nginx"}}}',
        key_provider=KeyProvider("kms", "ab" * 32),
        instance_id=bytes(range(20)),
    )


@functools.cache
def seeds() -> Seeds:
    sim_quote = _vector(SIM_QUOTE)
    dcap_quote = _vector(DCAP_QUOTE)
    report_doc = json.loads(_vector(QUOTE_REPORT))
    report_quote = bytes.fromhex(report_doc["quote"])
    real_quotes = {SIM_QUOTE: sim_quote, DCAP_QUOTE: dcap_quote, QUOTE_REPORT: report_quote}

    cvm = _simulated_cvm()
    cvm.emit("app-event", b"payload")
    simulated_quote = cvm.quote(b"fuzz")
    quotes = [*real_quotes.values(), simulated_quote]
    quotes += [_as_v5(dcap_quote, 2), _as_v5(dcap_quote, 3), _as_v5(simulated_quote, 3)]

    attestation = _vector(SIM_ATTESTATION)
    att = decode_attestation_v0(attestation)
    rebuilt = AttestationV0(  # RTMR3 only in runtime_events: the loader rebuilds it
        att.quote,
        tuple(e for e in att.event_log if not e.is_runtime),
        att.runtime_events,
        att.report_data,
        att.config,
    )
    sim_att = AttestationV0(
        simulated_quote,
        tuple(cvm.events),
        (),
        parse_quote(simulated_quote).report.report_data,
        json.dumps({"vm_config": json.dumps(cvm.vm_config())}),
    )
    attestations = [attestation] + [
        encode_attestation_v0(a) for a in (stripped(att), rebuilt, sim_att)
    ]

    v2_events = [  # runtime events as v2 (JCS preimage, empty digest); boot events unchanged
        Event(3, e.event_type, b"", e.event, e.payload, version=2).to_json()
        if e.is_runtime
        else e.to_json()
        for e in cvm.events
    ]
    event_logs = [
        _vector(SIM_EVENT_LOG),
        report_doc["event_log"].encode(),
        json.dumps(cvm.event_log_json()).encode(),
        json.dumps(v2_events).encode(),
    ]

    json_docs = (
        report_doc,
        cvm.get_quote_reply(b"fuzz"),
        {"attestation": attestation.hex()},
        {"attestation": "0x" + encode_attestation_v0(sim_att).hex()},
    )
    return Seeds(
        quotes=tuple(Seed(q, _quote_hot_offsets(q)) for q in quotes),
        real_quotes=real_quotes,
        attestations=tuple(Seed(a, (0, 1, 2, 3, 4, 5)) for a in attestations),
        event_logs=tuple(Seed(log) for log in event_logs),
        json_docs=json_docs,
        platform_pem=cvm.platform.public_pem().decode(),
    )


# --------------------------------------------------------------------------- strategies

INTERESTING = (0, 1, 2, 3, 4, 5, 6, 0x3F, 0x40, 0x7F, 0x80, 0xFF, 0x100, 0x3FFF, 0xFFFF)
INTERESTING += (0x10000, 0x3FFFFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 584, 648, 4304, 0x81)
# A valid v4 / v5 header (Intel QE vendor id left zero) and the two v5 body descriptors.
V4_HEADER = bytes.fromhex("040002008100000000000000") + bytes(36)
V5_HEADER = bytes.fromhex("050002008100000000000000") + bytes(36)
V5_TD10 = (2).to_bytes(2, "little") + (584).to_bytes(4, "little")
V5_TD15 = (3).to_bytes(2, "little") + (648).to_bytes(4, "little")
OPS = ("truncate", "flip", "replace", "insert", "delete", "splice", "append", "int")


@st.composite
def mutated(
    draw: st.DrawFn, pool: str, max_ops: int = 4, ops: tuple[str, ...] = OPS, hot: bool = True
) -> bytes:
    """A seed from ``seeds().<pool>`` with 1..max_ops mutations applied."""
    choices: tuple[Seed, ...] = getattr(seeds(), pool)
    seed = draw(st.sampled_from(choices))
    data = bytearray(seed.data)
    for _ in range(draw(st.integers(1, max_ops))):
        n = len(data)
        if hot and seed.hot and draw(st.booleans()):
            pos = min(draw(st.sampled_from(seed.hot)), n)
        else:
            pos = draw(st.integers(0, n))
        op = draw(st.sampled_from(ops))
        if op == "truncate":
            del data[pos:]
        elif op == "flip" and n:
            data[min(pos, n - 1)] ^= 1 << draw(st.integers(0, 7))
        elif op == "replace":
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[pos : pos + len(chunk)] = chunk
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == "splice":
            other = draw(st.sampled_from(choices)).data
            data[pos:] = other[draw(st.integers(0, len(other))) :]
        elif op == "append":
            data += draw(st.binary(min_size=1, max_size=64))
        elif op == "int":
            width = draw(st.sampled_from((1, 2, 4)))
            value = draw(st.sampled_from(INTERESTING)) & ((1 << (8 * width)) - 1)
            data[pos : pos + width] = value.to_bytes(width, "little")
    return bytes(data)


@st.composite
def as_hex_text(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` as hex, in the variants a user may paste: case, 0x prefix, outer whitespace."""
    text = data.hex()
    if draw(st.booleans()):
        text = text.upper()
    if draw(st.booleans()):
        text = draw(st.sampled_from(("0x", "0X"))) + text
    pad = st.text(alphabet=" \t\r\n", max_size=3)
    return (draw(pad) + text + draw(pad)).encode()


# Text as JSON can carry it: lone surrogates ("\ud800" escapes) cannot be UTF-8 encoded.
any_text = (
    st.text(max_size=24)
    | st.text(alphabet="abc-_", max_size=8)
    | st.text(max_size=4)
    | st.sampled_from(("\ud800", "a\udfffb", "\udbff\udc00", "[/]"))
)
json_scalars = fuzzkit.json_scalars(any_text)
json_values = fuzzkit.json_values(any_text)
hexish = fuzzkit.hexish(max_bytes=80)
EVENT_NAMES = (
    "system-preparing",
    "app-id",
    "compose-hash",
    "instance-id",
    "boot-mr-done",
    "os-image-hash",
    "key-provider",
    "system-ready",
    "app-event",
    "",
)


@st.composite
def key_provider_payload(draw: st.DrawFn) -> bytes:
    doc = draw(
        st.fixed_dictionaries(
            {}, optional={"name": json_values, "id": json_values, "extra": json_values}
        )
        | json_values
    )
    text = json.dumps(doc)
    deep = draw(st.sampled_from(("[", '{"a":'))) * draw(st.sampled_from((100, 3000, 20_000)))
    forms = (text.encode(), text.encode("utf-16"), text.encode()[:-1])
    return draw(st.sampled_from(forms) | st.just(deep.encode()))


def _payload_for(name: str) -> st.SearchStrategy[bytes]:
    if name == "key-provider":
        return st.binary(max_size=64) | key_provider_payload()
    return st.binary(max_size=100)


@st.composite
def runtime_event_dicts(draw: st.DrawFn) -> dict[str, Any]:
    """Well-formed runtime events (digest left for the parser to compute), so that replay and
    dstack's identity rules get to read fuzzed names and payloads."""
    name = draw(st.just("key-provider") | st.sampled_from(EVENT_NAMES) | any_text)
    return {
        "imr": 3,
        "event_type": RUNTIME_EVENT_TYPE,
        "digest": "",
        "event": name,
        "event_payload": draw(_payload_for(name)).hex(),
    }


@st.composite
def event_dicts(draw: st.DrawFn) -> dict[str, Any]:
    """Plausible dstack events with fields replaced by arbitrary JSON values."""
    name = draw(st.sampled_from(EVENT_NAMES) | any_text)
    event: dict[str, Any] = {
        "imr": draw(st.integers(0, 3) | st.integers(-2, 2**33)),
        "event_type": draw(
            st.sampled_from((RUNTIME_EVENT_TYPE, 0x80000008, 0xD, 1)) | st.integers()
        ),
        "digest": draw(st.sampled_from(("", "ab" * 48)) | hexish),
        "event": name,
        "event_payload": draw(_payload_for(name)).hex(),
    }
    if draw(st.booleans()):
        event["version"] = draw(st.sampled_from((0, 1, 2, 3, True)))
        if draw(st.booleans()):
            event["preimage"] = draw(hexish)
    for key in draw(st.sets(st.sampled_from((*event, "preimage", "version")), max_size=2)):
        event[key] = draw(json_values)
    if draw(st.booleans()):
        del event[draw(st.sampled_from(sorted(event)))]
    return event


event_lists = st.lists(runtime_event_dicts(), max_size=10) | st.lists(
    runtime_event_dicts() | event_dicts(), max_size=10
)


# --------------------------------------------------------------------------- property helpers


def _load_then_analyze(data: bytes) -> None:
    """load_evidence, then analyze and to_json (what ``attest inspect`` runs): InputError only."""
    evidence = input_error_only(load_evidence, data)
    if evidence is None:
        return
    analysis = input_error_only(analyze, evidence)
    if analysis is None:
        return
    doc = analysis.to_json()
    json.dumps(doc, ensure_ascii=False).encode()  # printable as UTF-8: no lone surrogates
    assert doc["replay"] is None or isinstance(doc["replay"]["matches_quote"], bool)


def _check_quote(quote: Quote, data: bytes) -> None:
    """A parsed quote is a prefix of its input followed only by zero padding, and re-parses."""
    assert data.startswith(quote.raw)
    assert not data[len(quote.raw) :].strip(b"\0")
    assert quote.signed_len in (632, 638, 702)
    assert parse_quote(quote.raw) == quote


# --------------------------------------------------------------------------- seeds are valid


def test_seeds_are_valid_inputs() -> None:
    """Mutations start from valid inputs, so every seed parses and (real ones) replays."""
    s = seeds()
    assert len(s.quotes) == 7
    for seed in s.quotes:
        _check_quote(parse_quote(seed.data), seed.data)
    for seed in s.attestations:
        assert analyze(load_evidence(seed.data)).replay_matches is True
    for seed in s.event_logs:
        assert parse_event_log(seed.data)
    for doc in s.json_docs:
        assert analyze(load_evidence(json.dumps(doc).encode())).replay_matches is True


# --------------------------------------------------------------------------- parse_quote


@FUZZ_MUTATE
@given(
    st.binary(max_size=1200)
    | st.builds(
        lambda header, descriptor, tail: header + descriptor + tail,
        st.sampled_from((V4_HEADER, V5_HEADER)),
        st.sampled_from((b"", V5_TD10, V5_TD15)),
        st.binary(max_size=1000),
    )
)
def test_parse_quote_random_bytes(data: bytes) -> None:
    quote = input_error_only(parse_quote, data)
    if quote is not None:
        _check_quote(quote, data)


@FUZZ_MUTATE
@given(mutated("quotes"))
def test_parse_quote_mutated_vectors(data: bytes) -> None:
    quote = input_error_only(parse_quote, data)
    if quote is not None:
        _check_quote(quote, data)


@pytest.mark.parametrize("name", [SIM_QUOTE, DCAP_QUOTE, QUOTE_REPORT])
def test_parse_quote_truncated_at_every_length(name: str) -> None:
    """Every proper prefix of a real quote fails with field and offset.

    The vectors carry 70 zero bytes of padding, which the parser tolerates: cutting inside the
    padding still parses, so the prefixes are taken of the quote's own bytes.
    """
    padded = seeds().real_quotes[name]
    raw = parse_quote(padded).raw
    assert len(raw) == len(padded) - 70
    for length in range(len(raw), len(padded)):
        assert parse_quote(padded[:length]).raw == raw
    pattern = re.compile(
        r"^quote\.[a-z0-9_.]+ at offset (\d+): truncated: needs (\d+) bytes, only (\d+) left$"
    )
    for length in range(len(raw)):
        try:
            parse_quote(raw[:length])
        except EvidenceError as exc:
            message = str(exc)
            assert "offset" in message and exc.field and exc.field.startswith("quote."), message
            match = pattern.match(message)
            assert match, f"length {length}: {message}"
            offset, needs, left = (int(g) for g in match.groups())
            assert exc.offset == offset
            assert offset + left == length, f"length {length}: {message}"
            assert needs > left
        else:
            pytest.fail(f"{name} truncated to {length} of {len(raw)} bytes parsed without error")


# --------------------------------------------------------------------------- parse_event_log


@FUZZ
@given(st.text() | st.binary())
def test_parse_event_log_random_text(text: str | bytes) -> None:
    input_error_only(parse_event_log, text)


@FUZZ
@given(json_values | st.lists(json_values))
def test_parse_event_log_arbitrary_json_values(value: Any) -> None:
    input_error_only(parse_event_log, json.dumps(value))
    if isinstance(value, list):
        input_error_only(parse_event_log, value)


@FUZZ
@given(event_lists, st.booleans())
def test_parse_event_log_event_lists(events: list[dict[str, Any]], as_text: bool) -> None:
    parsed = input_error_only(parse_event_log, json.dumps(events) if as_text else events)
    if parsed is None:
        return
    assert len(parsed) == len(events)
    for event in parsed:
        assert 0 <= event.imr <= 3
        assert len(event.digest) == 48 or (event.is_runtime and not event.digest)
    # What analyze does with a parsed log: replay it and read dstack's identity from it.
    input_error_only(replay, parsed)
    input_error_only(identity_from_events, parsed)


@FUZZ_MUTATE
@given(mutated("event_logs"))
def test_parse_event_log_mutated_vectors(data: bytes) -> None:
    parsed = input_error_only(parse_event_log, data)
    if parsed is not None:
        input_error_only(replay, parsed)
        input_error_only(identity_from_events, parsed)


# --------------------------------------------------------------------------- decode_attestation_v0


@FUZZ
@given(st.binary(max_size=600) | st.binary(max_size=600).map(lambda b: b"\x00\x00" + b))
def test_decode_attestation_random_bytes(data: bytes) -> None:
    input_error_only(decode_attestation_v0, data)


@FUZZ_MUTATE
@given(mutated("attestations"))
def test_decode_attestation_mutated_vectors(data: bytes) -> None:
    input_error_only(decode_attestation_v0, data)
    _load_then_analyze(data)


@st.composite
def attestations(draw: st.DrawFn) -> AttestationV0:
    """Well-formed SCALE around fuzzed contents: bad digests, imr > 3, odd runtime events."""
    base = decode_attestation_v0(seeds().attestations[draw(st.integers(0, 3))].data)
    events = list(base.event_log)
    for _ in range(draw(st.integers(0, 3))):
        if not events:
            break
        i = draw(st.integers(0, len(events) - 1))
        e = events[i]
        events[i] = Event(
            draw(st.just(e.imr) | st.integers(0, 3) | st.sampled_from((4, 2**32 - 1))),
            draw(st.just(e.event_type) | st.sampled_from((RUNTIME_EVENT_TYPE, 0))),
            draw(
                st.just(e.digest)
                | st.just(b"")
                | st.binary(min_size=48, max_size=48)
                | st.binary(max_size=50)
            ),
            draw(st.just(e.event) | st.sampled_from(EVENT_NAMES) | st.text(max_size=12)),
            draw(st.just(e.payload) | st.binary(max_size=40) | key_provider_payload()),
        )
    if events and draw(st.booleans()):
        del events[draw(st.integers(0, len(events) - 1)) :]
    runtime = draw(
        st.just(base.runtime_events)
        | st.lists(st.tuples(st.sampled_from(EVENT_NAMES), st.binary(max_size=20)), max_size=4).map(
            tuple
        )
    )
    quote = draw(st.just(base.quote) | mutated("quotes", max_ops=1) | st.binary(max_size=64))
    report_data = draw(st.just(base.report_data) | st.binary(min_size=64, max_size=64))
    config = draw(st.just(base.config) | json_values.map(json.dumps) | st.text(max_size=30))
    return AttestationV0(quote, tuple(events), runtime, report_data, config)


@FUZZ_SMALL
@given(attestations())
def test_decode_attestation_structured(att: AttestationV0) -> None:
    data = encode_attestation_v0(att)
    decoded = input_error_only(decode_attestation_v0, data)
    if decoded is not None:
        assert decoded == att
    _load_then_analyze(data)


# --------------------------------------------------------------------------- load_evidence


@FUZZ
@given(
    st.binary(max_size=600)
    | st.text(alphabet='0123456789abcdefABCDEFxX \t\n{}[]":,', max_size=200).map(str.encode)
    | st.binary(max_size=300).map(lambda b: b.hex().encode())
)
def test_load_evidence_random_bytes(data: bytes) -> None:
    _load_then_analyze(data)


@FUZZ_MUTATE
@given(st.data(), mutated("quotes") | mutated("attestations"), st.booleans())
def test_load_evidence_mutated_binary(data: st.DataObject, blob: bytes, hex_encode: bool) -> None:
    _load_then_analyze(data.draw(as_hex_text(blob)) if hex_encode else blob)


@st.composite
def json_doc_texts(draw: st.DrawFn) -> bytes:
    doc = draw(st.sampled_from(seeds().json_docs))
    return json.dumps(doc, indent=draw(st.sampled_from((None, 1)))).encode()


@FUZZ_MUTATE
@given(st.data())
def test_load_evidence_mutated_json_text(data: st.DataObject) -> None:
    text = data.draw(json_doc_texts())
    _load_then_analyze(data.draw(mutated_from(Seed(text))))


@st.composite
def mutated_from(draw: st.DrawFn, seed: Seed) -> bytes:
    """Like ``mutated`` but from one given seed (used for text whose formatting varies)."""
    data = bytearray(seed.data)
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(("truncate", "flip", "replace", "insert", "delete", "append")))
        if op == "truncate":
            del data[pos:]
        elif op == "flip" and data:
            data[min(pos, len(data) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif op == "replace":
            chunk = draw(st.binary(min_size=1, max_size=4) | st.sampled_from((b'"', b"\\", b"0")))
            data[pos : pos + len(chunk)] = chunk
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8) | st.sampled_from((b"[", b"{")))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 32))]
        else:
            data += draw(st.binary(min_size=1, max_size=32))
    return bytes(data)


EVIDENCE_KEYS = ("quote", "event_log", "vm_config", "attestation", "report_data")


@st.composite
def evidence_objects(draw: st.DrawFn) -> dict[str, Any]:
    """A GetQuote / attestation JSON object whose keys hold values of arbitrary types."""
    s = seeds()
    doc = dict(draw(st.sampled_from((*s.json_docs, {}))))
    plausible: dict[str, st.SearchStrategy[Any]] = {
        "quote": st.sampled_from([q.data.hex() for q in s.quotes])
        | mutated("quotes", max_ops=2).map(bytes.hex),
        "event_log": event_lists
        | event_lists.map(json.dumps)
        | mutated("event_logs", max_ops=2).map(lambda b: b.decode("utf-8", "replace")),
        "vm_config": json_values.map(json.dumps)
        | st.dictionaries(st.sampled_from(("os_image_hash", "vm_config")), json_values),
        "attestation": mutated("attestations", max_ops=2).map(bytes.hex),
        "report_data": hexish,
    }
    for key in draw(st.sets(st.sampled_from(EVIDENCE_KEYS), min_size=1, max_size=3)):
        doc[key] = draw(json_values | plausible[key])
    if doc and draw(st.booleans()):
        del doc[draw(st.sampled_from(sorted(doc)))]
    return doc


@FUZZ
@given(evidence_objects())
def test_load_evidence_json_objects(doc: dict[str, Any]) -> None:
    _load_then_analyze(json.dumps(doc).encode())


# --------------------------------------------------------------------------- verify_evidence

DCAP_NOW = 1_751_000_000  # inside the dcap-qvl collateral's validity window


@functools.cache
def _collateral() -> CollateralStore:
    _vector(DCAP_COLLATERAL)
    return CollateralStore.open(vector_path(DCAP_DIR))


@FUZZ_SMALL
@given(mutated("quotes", max_ops=2, ops=("flip", "replace", "int"), hot=False))
def test_verify_evidence_mutated_quotes(data: bytes) -> None:
    """dcap-qvl and the simulated verifier see mutated quotes: a verdict or InputError only."""
    evidence = input_error_only(load_evidence, data)
    if evidence is None:
        return
    simulated = Policy(tee="simulated", platform_key=seeds().platform_pem)
    for policy in (Policy(), simulated):
        verdict = input_error_only(
            verify_evidence, evidence, policy, collateral=_collateral(), now=DCAP_NOW
        )
        if verdict is not None:
            assert verdict.ok == (not verdict.reasons)
            json.dumps(verdict.to_json())


def test_verify_evidence_accepts_the_unmutated_seeds() -> None:
    """Control for the test above: its seeds verify, so mutations start from accepted input."""
    dcap = load_evidence(seeds().real_quotes[DCAP_QUOTE])
    assert verify_evidence(dcap, Policy(), collateral=_collateral(), now=DCAP_NOW).ok
    simulated = Policy(tee="simulated", platform_key=seeds().platform_pem)
    for seed in seeds().quotes[3:]:  # the simulated quote, and v5 forms (signature broken)
        verdict = verify_evidence(load_evidence(seed.data), simulated, now=DCAP_NOW)
        assert verdict.ok == (seed is seeds().quotes[3]), verdict.to_json()


# --------------------------------------------------------------------------- Policy

POLICY_FIELDS = tuple(Policy.model_fields)
python_values = st.recursive(
    json_scalars | st.binary(max_size=40) | st.floats(allow_nan=True),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=4)
    ),
    max_leaves=10,
)


@FUZZ
@given(st.dictionaries(st.sampled_from(POLICY_FIELDS) | st.text(max_size=12), python_values))
def test_policy_parse_model_arbitrary_dict(data: dict[Any, Any]) -> None:
    policy = input_error_only(parse_model, Policy, data, source="x")
    if policy is not None:
        _check_policy(policy)


def _hex_entries(size: int) -> st.SearchStrategy[str]:
    exact = st.binary(min_size=size, max_size=size).map(bytes.hex)
    return (
        exact
        | exact.map(str.upper)
        | exact.map(lambda h: "0x" + h)
        | st.binary(max_size=size + 2).map(bytes.hex)
        | hexish
    )


@st.composite
def plausible_policies(draw: st.DrawFn) -> dict[str, Any]:
    fields: dict[str, st.SearchStrategy[Any]] = {
        "tee": st.sampled_from(("tdx", "simulated", "TDX", "sgx", "")),
        "platform_key": st.sampled_from((None, "", "-----BEGIN PUBLIC KEY-----\n")) | st.text(),
        "os_images": st.none() | st.lists(_hex_entries(32), max_size=3),
        "mr_systems": st.none() | st.lists(_hex_entries(32), max_size=3),
        "compose_hashes": st.none() | st.lists(_hex_entries(32), max_size=3),
        "app_ids": st.none() | st.lists(_hex_entries(20), max_size=3),
        "key_providers": st.none()
        | st.lists(
            st.fixed_dictionaries(
                {"name": st.sampled_from(("kms", "local-sgx", "none"))},
                optional={"id": st.none() | hexish, "extra": json_values},
            ),
            max_size=3,
        ),
        "allowed_tcb_statuses": st.lists(
            st.sampled_from(("UpToDate", "OutOfDate", "Revoked", "uptodate", "")), max_size=3
        ),
        "allowed_advisory_ids": st.lists(st.text(max_size=16), max_size=3),
        "report_data": st.none() | _hex_entries(64) | _hex_entries(65),
    }
    chosen = draw(st.sets(st.sampled_from(POLICY_FIELDS), max_size=len(POLICY_FIELDS)))
    doc = {name: draw(fields[name]) for name in chosen}
    for name in draw(st.sets(st.sampled_from(POLICY_FIELDS), max_size=1)):
        doc[name] = draw(python_values)
    return doc


@FUZZ
@given(plausible_policies())
def test_policy_parse_model_plausible_dict(data: dict[str, Any]) -> None:
    try:
        policy = parse_model(Policy, data, source="x")
    except ConfigError as exc:
        assert exc.problems and all(": " in p for p in exc.problems), exc.problems
        assert str(exc).startswith(f"x: {len(exc.problems)} problem(s):")
        return
    _check_policy(policy)


def _check_policy(policy: Policy) -> None:
    """A parsed policy is normalised: lowercase hex without 0x, and tee/platform_key agree."""
    assert (policy.tee == "simulated") == bool(policy.platform_key)
    sizes = {"os_images": 64, "mr_systems": 64, "compose_hashes": 64, "app_ids": 40}
    for name, digits in sizes.items():
        for entry in getattr(policy, name) or ():
            assert re.fullmatch(f"[0-9a-f]{{{digits}}}", entry), (name, entry)
    if policy.report_data is not None:
        assert re.fullmatch("([0-9a-f]{2}){0,64}", policy.report_data)


# --------------------------------------------------------------------------- regressions
# Bugs these fuzz tests found: each used to escape analyze() or its output as a non-InputError.

_LIUM = "LIUM_MINER_HOTKEY"


def _quote_report_with(edit: Callable[[dict[str, Any]], None]) -> bytes:
    doc = json.loads(_vector(QUOTE_REPORT))
    log = json.loads(doc["event_log"])
    for event in log:
        edit(event)
    doc["event_log"] = json.dumps(log)
    return json.dumps(doc).encode()


def test_event_name_with_lone_surrogate_is_evidence_error() -> None:
    """Was: UnicodeEncodeError from analyze() (runtime_digest_v1 encodes the name)."""

    def edit(event: dict[str, Any]) -> None:
        if event["event"] == _LIUM:
            event["event"] = "\ud800"  # json.dumps writes the escape "\\ud800"
            event["digest"] = ""

    data = _quote_report_with(edit)
    assert b"\\ud800" in data
    with pytest.raises(InputError, match="surrogate") as info:
        analyze(load_evidence(data))
    assert info.value.field and info.value.field.endswith(".event")


def test_deeply_nested_key_provider_payload_is_evidence_error() -> None:
    """Was: RecursionError from KeyProvider.from_payload's json.loads in analyze()."""

    def edit(event: dict[str, Any]) -> None:
        if event["event"] == "key-provider":
            event["event_payload"] = (b"[" * 50_000).hex()
            event["digest"] = ""

    with pytest.raises(InputError, match="nested too deeply") as info:
        analyze(load_evidence(_quote_report_with(edit)))
    assert info.value.field and "key-provider" in info.value.field


def test_key_provider_name_with_lone_surrogate_is_evidence_error() -> None:
    """Was: accepted, leaving an identity that cannot be written as UTF-8."""

    def edit(event: dict[str, Any]) -> None:
        if event["event"] == "key-provider":
            event["event_payload"] = b'{"name":"\\ud800","id":"\\udfff"}'.hex()
            event["digest"] = ""

    with pytest.raises(InputError, match="surrogate") as info:
        analyze(load_evidence(_quote_report_with(edit)))
    assert info.value.field and "key-provider" in info.value.field
