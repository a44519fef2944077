"""Fuzz the coordinator's HTTP API in process: nothing a client sends yields a 5xx.

One app (``create_app`` over a real SQLite store, a manual clock and simulated CVMs) serves the
whole module. A tiny ASGI wrapper plays the TLS layer: it puts the DER client certificate the
request names (``x-fuzz-cert``) in ``scope["state"]``, where uvicorn's protocol would put it, so
the catalog routes see a live SVID, none, a revoked one, one never admitted, a foreign one.

Properties, for every route and random methods, paths, queries, headers and bodies:
the status is below 500; a non-2xx reply is a JSON object with an ``error`` string, and a 400
also names a ``field``; the catalog answers only the live SVID, the admin API only its token.
The watch stream is read up to its first event (or a short silence when it owes none yet), never
to its end.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import json
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, unquote, urlencode, urlsplit

import fuzzkit
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from teemesh.attest.dstack import KeyProvider, compose_hash
from teemesh.attest.simulated import OsImage, PlatformKey, SimulatedCvm
from teemesh.catalog.sqlite import SqliteStore
from teemesh.clock import ManualClock
from teemesh.coordinator.admission import AdmissionRequest, admission_report_data
from teemesh.coordinator.http import create_app
from teemesh.coordinator.http_admin import AdminAuth
from teemesh.coordinator.policy import ClusterPolicy
from teemesh.coordinator.policy_signing import new_signing_key, signer_hex
from teemesh.coordinator.records import admission_key
from teemesh.coordinator.service import Coordinator
from teemesh.identity.certs import new_p256_key
from teemesh.identity.meshca import issue_svid, mesh_ca_cert, mesh_ca_key
from teemesh.identity.svid import spiffe_id
from teemesh.net.sse import SseParser
from teemesh.platform.prpc import MAX_BODY, PEER_CERT

FUZZ = settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
T = TypeVar("T")

COMPOSE = b'{"name":"web"}'
DB_COMPOSE = b'{"name":"db"}'
PLATFORM = PlatformKey.generate()
OS = OsImage("os")
TOKEN = "fuzz-admin-token-" + "x" * 32
NOW = 1_800_000_000
CERT_HEADER = "x-fuzz-cert"


def _group(compose: bytes, services: list[str]) -> dict[str, Any]:
    return {
        "compose_hashes": [compose_hash(compose).hex()],
        "os_images": [OS.os_image_hash.hex()],
        "key_providers": [{"name": "kms"}],
        "services": services,
    }


POLICY = ClusterPolicy.model_validate(
    {
        "cluster": "demo",
        "tee": "simulated",
        "platform_key": PLATFORM.public_pem().decode(),
        "groups": {"web": _group(COMPOSE, ["web", "web-admin"]), "db": _group(DB_COMPOSE, ["db"])},
    }
)


def _cvm(compose: bytes = COMPOSE) -> SimulatedCvm:
    return SimulatedCvm(PLATFORM, OS, compose, KeyProvider("kms", "ab"))


def _csr_pem(key: Any) -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fuzz")])
    )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = builder.sign(key, algorithm)
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def attest_doc(cvm: SimulatedCvm, nonce: str, group: str, peer_id: str) -> dict[str, Any]:
    """A request the coordinator admits (if the policy and the peer id's state allow)."""
    key = new_p256_key()
    bound = admission_report_data("demo", group, peer_id, bytes.fromhex(nonce), key.public_key())
    doc = {"group": group, "peer_id": peer_id, "nonce": nonce, "csr": _csr_pem(key)}
    return doc | cvm.get_quote_reply(bound)


def _pem_csr(der: bytes) -> str:
    body = base64.encodebytes(der).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"


def _odd_oids(csr_pem: str) -> list[str]:
    """The CSR with its curve, key type or signature algorithm OID made unknown."""
    der = x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(serialization.Encoding.DER)
    oids = [
        bytes.fromhex("06082a8648ce3d030107"),  # prime256v1
        bytes.fromhex("06072a8648ce3d0201"),  # id-ecPublicKey
        bytes.fromhex("06082a8648ce3d040302"),  # ecdsa-with-SHA256
    ]
    return [_pem_csr(der.replace(oid, oid[:-1] + b"\x7f")) for oid in oids if oid in der]


# CSRs the attest route must refuse with a 400 naming csr: other key types, unknown OIDs.
P256_CSR = _csr_pem(new_p256_key())
ODD_CSRS = [
    *_odd_oids(P256_CSR),
    _csr_pem(ec.generate_private_key(ec.SECP384R1())),
    _csr_pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)),
    _csr_pem(ed25519.Ed25519PrivateKey.generate()),
]
assert len(ODD_CSRS) == 6
CVMS = {"web-a": _cvm(), "web-b": _cvm(), "db": _cvm(DB_COMPOSE)}
TEMPLATE = attest_doc(CVMS["web-a"], "00" * 32, "web", "web-7")
TEMPLATE_CSR_DER = x509.load_pem_x509_csr(TEMPLATE["csr"].encode()).public_bytes(
    serialization.Encoding.DER
)


# --------------------------------------------------------------------------- the app under test


@dataclass
class Certs:
    """DER client certificates by the name a request gives in ``x-fuzz-cert``."""

    by_name: dict[str, bytes] = field(default_factory=dict)


async def _admit(coordinator: Coordinator, cvm: SimulatedCvm, group: str, peer_id: str) -> bytes:
    nonce = (await coordinator.challenge())["nonce"]
    reply = await coordinator.attest(
        AdmissionRequest.from_json(attest_doc(cvm, nonce, group, peer_id))
    )
    cert = x509.load_pem_x509_certificate(reply["certificate"].encode())
    return cert.public_bytes(serialization.Encoding.DER)


def _svid_der(ca_key: ec.EllipticCurvePrivateKey, cluster: str, group: str, peer: str) -> bytes:
    ca = mesh_ca_cert(ca_key, cluster)
    cert = issue_svid(
        ca_key, ca, new_p256_key().public_key(),
        spiffe=spiffe_id(cluster, group, peer), peer_id=peer, app_id=b"\x01" * 20,
        now=dt.datetime.fromtimestamp(NOW, dt.UTC), ttl=dt.timedelta(hours=1),
    )  # fmt: skip
    return cert.public_bytes(serialization.Encoding.DER)


def coordinator_factory(
    tmp: Path, certs: Certs, clock: ManualClock
) -> Callable[[], Awaitable[Coordinator]]:
    """``make`` for create_app: a coordinator with web/web-1 admitted (the fuzzing caller)."""

    async def make() -> Coordinator:
        store = await SqliteStore.open(tmp / "catalog.db", clock=clock, history=64)
        ca_key = mesh_ca_key(b"\x07" * 32)
        coordinator = Coordinator(POLICY, store, ca_key, mesh_ca_cert(ca_key, "demo"), clock=clock)
        await coordinator.start()
        certs.by_name["peer"] = await _admit(coordinator, CVMS["web-a"], "web", "web-1")
        certs.by_name["revoked"] = await _admit(coordinator, CVMS["web-b"], "web", "web-2")
        await coordinator.revoke_peer("web", "web-2", "fuzz set-up")
        certs.by_name["stranger"] = _svid_der(ca_key, "demo", "db", "db-9")  # never admitted
        certs.by_name["superseded"] = _svid_der(ca_key, "demo", "web", "web-1")
        certs.by_name["foreign"] = _svid_der(ca_key, "other", "web", "web-1")
        certs.by_name["ca"] = coordinator.ca_cert.public_bytes(serialization.Encoding.DER)
        return coordinator

    return make


def with_client_cert(app: Any, certs: Certs) -> Any:
    """What ``prpc._PeerCertProtocol`` does per TLS connection, chosen per request here."""

    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            name = headers.get(CERT_HEADER.encode(), b"").decode()
            scope = {**scope, "state": {**scope.get("state", {})}}
            scope["state"][PEER_CERT] = certs.by_name.get(name)
        await app(scope, receive, send)

    return wrapped


class World:
    """The app, its lifespan and an httpx client, all on one event loop kept for the module."""

    def __init__(self, tmp: Path, policy_source: Callable[[], ClusterPolicy]) -> None:
        self.loop = asyncio.new_event_loop()
        self.clock = ManualClock(NOW)
        self.certs = Certs()
        self.logs: list[str] = []
        self.app = create_app(
            coordinator_factory(tmp, self.certs, self.clock),
            admin=AdminAuth(hashlib.sha256(TOKEN.encode()).digest()),
            policy_source=policy_source,
            policy_signer=signer_hex(new_signing_key()[0]),  # publish: checks run, then refuse
            log=self.logs.append,
        )
        self.asgi = with_client_cert(self.app, self.certs)
        self.stack = contextlib.AsyncExitStack()
        self.run(self.stack.enter_async_context(self.app.router.lifespan_context(self.app)))
        transport = httpx.ASGITransport(app=self.asgi)
        self.client = httpx.AsyncClient(transport=transport, base_url="http://coordinator")
        self.stack.push_async_callback(self.client.aclose)

    @property
    def coordinator(self) -> Coordinator:
        coordinator: Coordinator = self.app.state.coordinator
        return coordinator

    def run(self, work: Awaitable[T]) -> T:
        return self.loop.run_until_complete(work)

    def close(self) -> None:
        try:
            self.run(self.stack.aclose())
            self.run(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("coordinator-fuzz"), lambda: POLICY)
    try:
        yield w
    finally:
        w.close()


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Call:
    route: str  # what the request aims at: "attest", "register", ..., "random"
    method: str
    path: str
    query: tuple[tuple[str, str], ...] = ()
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes | None = None
    attest: str | None = None  # a real request, mutated: "valid" for a new nonce, "swap" (only
    # the nonce is new: report_data no longer binds it) or "stale" (the nonce was never issued)
    cert: str = ""
    token: str = "none"  # "good", "bad" or "none"

    @property
    def url(self) -> str:
        return self.path + (f"?{urlencode(self.query)}" if self.query else "")


text = st.text(max_size=12) | st.sampled_from(
    ["", "web", "web-1", "db", "web-admin", "Web!", "é", "\U0001f600", "\x00", "a" * 300, "-x"]
)
ints = st.integers() | st.sampled_from([0, -1, 1, 65535, 65536, 2**63, 2**64, -(2**63) - 1])
json_values = fuzzkit.json_values(text, fuzzkit.json_scalars(text) | ints)
labels = st.sampled_from(["web", "web-1", "web-2", "web-4", "db", "db-0", "nope"]) | st.from_regex(
    r"[a-z0-9][a-z0-9-]{0,8}", fullmatch=True
)


@dataclass(frozen=True)
class Schema:
    """A request body's fields: values that pass, values that do not, and which must be there."""

    good: dict[str, st.SearchStrategy[Any]]
    wrong: dict[str, st.SearchStrategy[Any]]
    required: tuple[str, ...] = ()


@st.composite
def near(draw: st.DrawFn, schema: Schema) -> dict[str, Any]:
    """A valid body, one with a single field spoiled, or each field good, wrong or missing."""
    optional = {k: v for k, v in schema.good.items() if k not in schema.required}
    doc = draw(
        st.fixed_dictionaries({k: schema.good[k] for k in schema.required}, optional=optional)
    )
    mode = draw(st.sampled_from(["valid", "valid", "one", "one", "mixed"]))
    if mode == "one":
        name = draw(st.sampled_from([*schema.good, "extra"]))
        if draw(st.booleans()):
            doc.pop(name, None)
        else:
            doc[name] = draw(schema.wrong.get(name, json_values) | json_values)
    elif mode == "mixed":
        parts = {k: good | schema.wrong[k] | json_values for k, good in schema.good.items()}
        doc = draw(st.fixed_dictionaries({}, optional=parts))
        doc |= draw(st.dictionaries(text, json_values, max_size=2))
    return doc


label_keys = st.from_regex(r"[a-z][a-z0-9-]{0,6}[a-z0-9]", fullmatch=True)
good_tags = st.dictionaries(label_keys, st.text(min_size=1, max_size=20), max_size=3)
wrong_tags = st.sampled_from(
    [{f"t{i}": "v" for i in range(33)}, {"k": "v" * 257}, {"Bad Key": "v"}, {"k": ""}, [], "k"]
)
good_health = st.sampled_from(["passing", "warning", "critical"])
wrong_health = st.sampled_from(["dead", "PASSING", "", 1])
REGISTRATION = Schema(
    good={
        "service": st.sampled_from(["web", "web-admin"]),
        "address": st.sampled_from(["10.0.0.1", "[::1]", "web.local", "fe80::1"]),
        "port": st.integers(1, 65535),
        "tags": good_tags,
        "health": good_health,
    },
    wrong={
        "service": st.sampled_from(["db", "nope", "Web", "", "a" * 64, "web/x"]) | labels,
        "address": st.sampled_from(["a b", "x" * 254, "", "10.0.0.1/8", "é", "\x00"]),
        "port": ints | st.sampled_from([80.5, "80", True, 1e400]),
        "tags": wrong_tags,
        "health": wrong_health,
    },
    required=("service", "address", "port"),
)
UPDATE = Schema(
    good={"tags": good_tags | st.none(), "health": good_health | st.none()},
    wrong={"tags": wrong_tags, "health": wrong_health},
)
REVOKE = Schema(
    good={
        "group": st.sampled_from(["web", "db"]),
        "peer_id": st.sampled_from(["web-2", "web-4", "db-0", "db-9"]),
        "reason": st.text(max_size=40),
    },
    wrong={
        "group": st.sampled_from(["Web!", "", "nope"]) | labels,
        "peer_id": st.sampled_from(["", "-x", "a" * 64]) | labels,
        "reason": st.sampled_from(["é" * 400_000, "x" * 1025, 5]),
    },
    required=("group", "peer_id"),
)


CALLER = ("web", "web-1")


def _is_json(body: bytes) -> bool:
    try:
        json.loads(body)
    except (ValueError, RecursionError):
        return False
    return True


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, ensure_ascii=False).encode("utf-8", errors="surrogatepass")


SPECIAL_BODIES = [
    b"",
    b"null",
    b"9" * 5000,  # over Python's int-string limit: json.loads raises a bare ValueError
    b'{"port": ' + b"1" * 5000 + b"}",
    b"[" * 100_000,
    b'"\\ud800"',
    b'{"service": "\\udfff"}',
    b"\xff\xfe{\x00}\x00",
    json.dumps({"service": "web"}).encode("utf-16"),
    b"\xef\xbb\xbf{}",
    b" " * (MAX_BODY + 1),
]


def bodies(schema: Schema | None) -> st.SearchStrategy[bytes]:
    """Near the schema most often (Hypothesis favours the first options), then anything."""
    anything = [st.sampled_from(SPECIAL_BODIES), json_values.map(_dumps), st.binary(max_size=64)]
    if schema is None:
        return st.one_of(anything)
    return st.one_of([near(schema).map(_dumps)] * 3 + anything)


def _mutate(doc: dict[str, Any], data: st.DataObject, least: int) -> dict[str, Any]:
    """A real admission request with ``least`` to two things changed."""
    doc = dict(doc)
    for _ in range(data.draw(st.integers(least, 2))):
        name = data.draw(st.sampled_from([*doc, "attestation", "extra"]))
        how = data.draw(
            st.sampled_from(["csr", "drop", "json", "flip", "truncate", "csr-der", "label"])
        )
        value = doc.get(name)
        if how == "drop":
            doc.pop(name, None)
        elif how == "json":
            doc[name] = data.draw(json_values)
        elif how == "flip" and isinstance(value, str) and value:
            at = data.draw(st.integers(0, 2**16)) % len(value)  # lengths vary: PEM, signatures
            doc[name] = value[:at] + data.draw(st.sampled_from("0f z\n")) + value[at + 1 :]
        elif how == "truncate" and isinstance(value, str):
            doc[name] = value[: data.draw(st.integers(0, 2**16)) % (len(value) + 1)]
        elif how == "csr":
            doc["csr"] = data.draw(st.sampled_from(ODD_CSRS))
        elif how == "csr-der":
            der = bytearray(TEMPLATE_CSR_DER)
            for _ in range(data.draw(st.integers(1, 3))):
                der[data.draw(st.integers(0, len(der) - 1))] ^= data.draw(st.integers(1, 255))
            doc["csr"] = _pem_csr(bytes(der))  # the armour intact, the inside broken
        elif how == "label":
            doc[name] = data.draw(labels)
    return doc


ROUTES: dict[str, tuple[str, str]] = {
    "challenge": ("POST", "/v1/admission/challenge"),
    "attest": ("POST", "/v1/admission/attest"),
    "ca": ("GET", "/v1/ca"),
    "register": ("POST", "/v1/catalog/register"),
    "heartbeat": ("POST", "/v1/catalog/heartbeat"),
    "update": ("PATCH", "/v1/catalog/instances/{}"),
    "deregister": ("DELETE", "/v1/catalog/instances/{}"),
    "read": ("GET", "/v1/catalog"),
    "admissions": ("GET", "/v1/admin/admissions"),
    "revoke": ("POST", "/v1/admin/revoke"),
    "policy": ("GET", "/v1/admin/policy"),
    "reload": ("POST", "/v1/admin/policy/reload"),
    "publish": ("POST", "/v1/admin/policy"),
}
CATALOG = {"register", "heartbeat", "update", "deregister", "read", "watch"}
ADMIN = {"admissions", "revoke", "policy", "reload", "publish"}
SCHEMAS = {"register": REGISTRATION, "update": UPDATE, "revoke": REVOKE}
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "FUZZ"]
CERT_NAMES = ["peer", "peer", "peer", "", "revoked", "stranger", "superseded", "foreign", "ca"]


def _header_safe(value: bytes) -> bytes:
    return bytes(c for c in value if c not in b"\r\n\x00").strip()


header_bytes = st.binary(max_size=40).map(_header_safe)
service_segment = (
    st.sampled_from(["web", "web-admin", "db", "nope", "a" * 2000, "%2F", "..", "é", "web%00"])
    | labels
    | st.text(min_size=1, max_size=12).map(lambda s: quote(s, safe=""))
)
prefixes = (
    st.sampled_from(
        [
            "instances/",
            "instances/web/",
            "revocations/",
            "",
            "admissions/",
            "nonces/",
            "leases/",
            "policy/",
            "instances/" + "a" * 2000,
            "instances/\x00",
            "revocations/" + "é" * 600,
        ]
    )
    | st.text(max_size=12)
    | st.text(max_size=12).map(lambda s: "instances/" + s)
)
revisions = (
    st.integers(-3, 200).map(str)
    | st.sampled_from(
        ["", "x", "1e3", " 5 ", "5_0", "0x10", str(2**63), str(2**63 - 1), "9" * 5000]
    )
    | st.text(max_size=6)
)


@st.composite
def calls(draw: st.DrawFn, routes: list[str]) -> Call:
    route = draw(st.sampled_from(routes))
    if route == "random":
        base = draw(st.sampled_from(["/v1", "/v1/catalog", "/v1/admin", "/v1/admission", ""]))
        segments = draw(st.lists(text.map(lambda s: quote(s, safe="")), max_size=4))
        path = base + "".join(f"/{s}" for s in segments)
        path = "/v1" + path if path.startswith("//") or not path else path
        method = draw(st.sampled_from(METHODS))
    else:
        method, path = ROUTES[route]
        if "{}" in path:
            path = path.format(draw(service_segment))
        method = draw(
            st.sampled_from(METHODS) | st.just(method) | st.just(method) | st.just(method)
        )
    query: list[tuple[str, str]] = []
    if draw(st.booleans()):
        query.append(("prefix", draw(prefixes)))
    if draw(st.integers(0, 4)) == 0:
        query.append(("revision", draw(revisions)))
    if draw(st.integers(0, 4)) == 0:
        query.append((draw(text), draw(text)))
    token = draw(st.sampled_from(["good", "good", "bad", "none", "raw"]))
    headers: list[tuple[bytes, bytes]] = []
    if token == "good":
        headers.append(
            (b"authorization", draw(st.sampled_from([b"Bearer ", b"bearer  "])) + TOKEN.encode())
        )
    elif token == "bad":
        wrong = draw(st.sampled_from([TOKEN[:-1], TOKEN + "x", TOKEN.upper(), "", "Bearer"]))
        headers.append(
            (b"authorization", draw(st.sampled_from([b"Bearer ", b"Basic ", b""])) + wrong.encode())
        )
    elif token == "raw":
        headers.append((b"authorization", draw(header_bytes)))
        token = "bad"
    if draw(st.integers(0, 4)) == 0:
        ids = revisions.map(lambda s: _header_safe(s.encode())) | header_bytes
        headers.append((b"last-event-id", draw(ids)))
    if draw(st.booleans()):
        kind = draw(
            st.sampled_from([b"application/json", b"text/plain", b"", b"multipart/form-data"])
        )
        headers.append((b"content-type", kind))
    cert = draw(st.just("peer") | st.sampled_from(CERT_NAMES))
    headers.append((CERT_HEADER.encode(), cert.encode()))
    attest = None
    if route == "attest":
        attest = draw(st.sampled_from(["swap", "valid", "stale", "random"]))
    body = None
    if attest in {None, "random"}:
        attest = None
        body = draw(bodies(SCHEMAS.get(route)))
        if route == "revoke" and _is_json(body):
            doc = json.loads(body)
            if isinstance(doc, dict) and (doc.get("group"), doc.get("peer_id")) == CALLER:
                body = _dumps(doc | {"peer_id": "web-2"})  # the fuzzing caller stays admitted
    return Call(route, method, path, tuple(query), tuple(headers), body, attest, cert, token)


# --------------------------------------------------------------------------- sending


async def send(world: World, call: Call, data: st.DataObject) -> httpx.Response:
    body = call.body
    if call.attest == "stale":
        body = _dumps(_mutate(TEMPLATE, data, 0))
    elif call.attest is not None:
        nonce = (await world.coordinator.challenge())["nonce"]
        if call.attest == "valid":
            group, peer, cvm = data.draw(
                st.sampled_from(
                    [
                        ("web", "web-4", "web-a"),
                        ("web", "web-1", "web-b"),  # held by a live instance
                        ("web", "web-2", "web-b"),  # revoked
                        ("db", "db-0", "db"),
                        ("db", "db-1", "web-a"),  # the web compose in the db group
                        ("nope", "x", "db"),
                    ]
                )
            )
            doc = attest_doc(CVMS[cvm], nonce, group, peer)
        else:
            doc = TEMPLATE | {"nonce": nonce}
        body = _dumps(_mutate(doc, data, 0 if call.attest == "valid" else 1))
    return await world.client.request(
        call.method, call.url, headers=list(call.headers), content=body
    )


def check_reply(call: Call, status: int, headers: Any, content: bytes) -> Any:
    """The properties every reply has; returns the parsed JSON body (None when there is none)."""
    assert status < 500, (status, content[:500])
    if call.method == "HEAD" and not content:
        return None
    if status in {307, 308}:  # Starlette's trailing-slash redirect: "/v1/catalog/"
        target = unquote(urlsplit(headers.get("location", "")).path).rstrip("/")
        assert not content and target == unquote(call.path).rstrip("/"), (target, call.path)
        return None
    doc = json.loads(content)
    if not 200 <= status < 300:
        assert isinstance(doc, dict), doc
        assert isinstance(doc.get("error"), str) and doc["error"], doc
        if status == 400:
            assert isinstance(doc.get("field"), str) and doc["field"], doc
    return doc


def _on_route(call: Call) -> bool:
    """Does the request reach the route's handler (its method, a path that matches)?"""
    method = ROUTES.get(call.route, ("GET", ""))[0]
    if call.route in {"update", "deregister"}:
        service = unquote(call.path.removeprefix("/v1/catalog/instances/"))
        return call.method == method and "/" not in service and service not in {".", ".."}
    return call.route != "random" and call.method == method


def check_access(call: Call, status: int, doc: Any) -> None:
    """The catalog answers only the live SVID (and never refuses it as such); the admin API
    answers only the admin token."""
    if not _on_route(call):
        return
    if call.route in CATALOG:
        if call.cert in {"", "foreign", "ca"}:  # no SVID of this cluster
            assert status == 401, (status, doc)
        elif call.cert in {"revoked", "stranger", "superseded"}:
            assert status == 403, (status, doc)
        elif call.cert == "peer":  # the live SVID (web/web-1 stays admitted throughout)
            assert status != 401, (status, doc)
            if status == 403:  # the one refusal a live peer can get: a service not its group's
                assert call.route == "register", (status, doc)
                assert "does not own service" in doc["error"], doc
    if call.route in ADMIN:
        if call.token != "good":
            assert status == 401, (status, doc)
        else:
            assert status != 401, (status, doc)


def check_call(world: World, call: Call, data: st.DataObject) -> None:
    reply = world.run(send(world, call, data))
    event(f"{call.route} {call.method}: {reply.status_code}")
    doc = check_reply(call, reply.status_code, reply.headers, reply.content)
    check_access(call, reply.status_code, doc)
    if call.route == "ca" and call.method == "GET":
        assert reply.status_code == 200
        x509.load_pem_x509_certificate(doc["ca_certificate"].encode())


@FUZZ
@given(call=calls(["attest", "attest", "challenge", "attest", "ca"]), data=st.data())
def test_admission_requests_get_no_server_error(
    world: World, call: Call, data: st.DataObject
) -> None:
    check_call(world, call, data)


@FUZZ
@given(call=calls(["register", "heartbeat", "update", "deregister", "read"]), data=st.data())
def test_catalog_requests_get_no_server_error(
    world: World, call: Call, data: st.DataObject
) -> None:
    check_call(world, call, data)


@FUZZ
@given(call=calls(sorted(ADMIN)), data=st.data())
def test_admin_requests_get_no_server_error(world: World, call: Call, data: st.DataObject) -> None:
    check_call(world, call, data)


@FUZZ
@given(call=calls([*ROUTES, "random", "random"]), data=st.data())
def test_any_request_gets_no_server_error(world: World, call: Call, data: st.DataObject) -> None:
    check_call(world, call, data)


@pytest.mark.parametrize(("service", "status"), [("db", 403), ("web", 200), ("web-admin", 200)])
def test_the_live_peer_is_refused_only_a_service_its_group_does_not_own(
    world: World, service: str, status: int
) -> None:
    """The one refusal check_access lets the live SVID have, made on purpose (random bodies
    rarely name another group's service)."""
    doc = {"service": service, "address": "10.0.0.1", "port": 8080}
    call = Call("register", "POST", ROUTES["register"][1], body=_dumps(doc), cert="peer")
    headers = {CERT_HEADER: "peer", "content-type": "application/json"}
    reply = world.run(world.client.post(call.path, headers=headers, content=call.body))
    assert reply.status_code == status, reply.text
    check_access(call, reply.status_code, check_reply(call, status, reply.headers, reply.content))


# --------------------------------------------------------------------------- the watch stream


START_WAIT = 10.0
"""Seconds allowed for what must come: the response start, an error body, the snapshot."""
IDLE_WAIT = 0.25
"""Seconds a stream that owes no event yet (it resumes at a revision) is listened to."""


async def first_event(
    app: Any, call: Call, snapshot_due: bool
) -> tuple[int | None, dict[bytes, bytes], bytes]:
    """Status, headers and the body up to its first event.

    The response start, and then a whole error reply or (with ``snapshot_due``) the opening
    snapshot, may take up to START_WAIT; a stream that owes nothing is read for IDLE_WAIT only.
    """
    path, _, query = call.url.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": call.method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query.encode(),
        "headers": [*call.headers, (b"host", b"coordinator")],
        "server": ("coordinator", 80),
        "client": ("127.0.0.1", 1234),
    }
    status: int | None = None
    headers: dict[bytes, bytes] = {}
    body = bytearray()
    started = asyncio.Event()
    done = asyncio.Event()
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # the client stays connected until cancelled
        raise AssertionError("unreachable")

    async def send_(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            headers.update(message.get("headers", []))
            started.set()
        elif message["type"] == "http.response.body":
            body.extend(message.get("body", b""))
            if b"\n\n" in body or not message.get("more_body", False):
                done.set()

    async def until(flag: asyncio.Event, timeout: float) -> None:
        waiter = asyncio.ensure_future(flag.wait())
        try:
            await asyncio.wait({task, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter

    task = asyncio.ensure_future(app(scope, receive, send_))
    try:
        await until(started, START_WAIT)
        if status is not None:
            owed = status != 200 or snapshot_due
            await until(done, START_WAIT if owed else IDLE_WAIT)
    finally:
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task  # an exception the app raised surfaces here
    return status, headers, bytes(body)


watch_calls = calls(["read"]).map(
    lambda c: Call(
        "watch", c.method, "/v1/catalog/watch", c.query, c.headers, None, None, c.cert, c.token
    )
)


@FUZZ
@given(call=watch_calls)
def test_the_watch_fails_cleanly_or_streams_events(world: World, call: Call) -> None:
    asked = dict(call.query)
    resumes = "revision" in asked or any(k == b"last-event-id" for k, _ in call.headers)
    status, headers, body = world.run(first_event(world.asgi, call, snapshot_due=not resumes))
    assert status is not None, "no response within the timeout"
    event(f"watch {call.method}: {status} {body[:12]!r}")
    if status != 200 or call.method == "HEAD":
        text_headers = {k.decode(): v.decode() for k, v in headers.items()}
        check_access(call, status, check_reply(call, status, text_headers, body))
        return
    check_access(call, status, None)
    assert headers.get(b"content-type", b"").startswith(b"text/event-stream")
    events = SseParser().feed(body)
    for sse in events:
        assert sse.event in {"snapshot", "change", "error"}, sse
        doc = json.loads(sse.data)
        if sse.event == "error":
            assert isinstance(doc["error"], str) and doc["reason"], doc
        else:
            assert sse.id == str(doc["revision"]), sse
    if not resumes:
        assert events and events[0].event == "snapshot", body


# --------------------------------------------------------------------------- the admin token


def guarded_world(tmp: Path) -> tuple[World, list[int]]:
    """A world whose policy file, if ever read, would revoke every web peer."""
    reads: list[int] = []
    no_web = POLICY.model_copy(update={"groups": {"db": POLICY.groups["db"]}})

    def source() -> ClusterPolicy:
        reads.append(1)
        return no_web

    return World(tmp, source), reads


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[World, list[int]]]:
    world, reads = guarded_world(tmp_path_factory.mktemp("coordinator-admin"))
    try:
        yield world, reads
    finally:
        world.close()


wrong_auth = (
    st.sampled_from(
        [
            None,
            "",
            "Bearer",
            "Bearer ",
            f"Bearer {TOKEN[:-1]}",
            f"Bearer {TOKEN}x",
            f"Bearer {TOKEN.upper()}",
            f"Basic {TOKEN}",
            f"Token {TOKEN}",
            TOKEN,
            f"Bearer{TOKEN}",
            f"Bearer {hashlib.sha256(TOKEN.encode()).hexdigest()}",
        ]
    )
    | header_bytes.map(lambda b: b.decode("latin-1"))
    | st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=60).map(
        lambda s: f"Bearer {s}"
    )
).filter(
    lambda v: (
        v is None or v.partition(" ")[2].strip() != TOKEN or v.partition(" ")[0].lower() != "bearer"
    )
)


@FUZZ
@given(
    route=st.sampled_from(sorted(ADMIN)),
    auth=wrong_auth,
    body=bodies(REVOKE) | st.just(_dumps({"group": "web", "peer_id": "web-1"})),
)
def test_the_admin_api_refuses_a_wrong_token_and_does_nothing(
    guarded: tuple[World, list[int]], route: str, auth: str | None, body: bytes
) -> None:
    world, reads = guarded
    store = world.coordinator.store
    before = world.run(store.get(admission_key("web", "web-1")))
    epoch = world.run(world.coordinator.current())
    method, path = ROUTES[route]
    headers = {} if auth is None else {"authorization": auth.encode("latin-1")}
    reply = world.run(world.client.request(method, path, headers=headers, content=body))
    assert reply.status_code == 401, reply.text
    assert "Bearer" in reply.json()["error"]
    assert "admissions" not in reply.json() and "policy" not in reply.json()
    assert reads == [], "the policy file was read"
    assert world.run(store.get(admission_key("web", "web-1"))) == before
    assert world.run(world.coordinator.current()).epoch == epoch.epoch


def test_a_long_revocation_reason_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """Stored JSON-escaped with the admission and every certificate, it would pass the store's
    value limit half-way through the revocation."""
    world, _reads = guarded_world(tmp_path)
    try:
        store = world.coordinator.store
        before = world.run(store.range(""))
        good = {"authorization": f"Bearer {TOKEN}"}
        body = {"group": "web", "peer_id": "web-1", "reason": "é" * 400_000}
        reply = world.run(world.client.post("/v1/admin/revoke", headers=good, json=body))
        assert reply.status_code == 400, reply.text
        assert reply.json()["field"] == "reason"
        assert world.run(store.range("")).kvs == before.kvs
        body["reason"] = "é" * 1000
        reply = world.run(world.client.post("/v1/admin/revoke", headers=good, json=body))
        assert reply.status_code == 200, reply.text
    finally:
        world.close()


def test_the_admin_token_does_act(tmp_path: Path) -> None:
    """The same requests with the token do what they say (so the test above can fail)."""
    world, reads = guarded_world(tmp_path)
    try:
        good = {"authorization": f"Bearer {TOKEN}"}
        listed = world.run(world.client.get("/v1/admin/admissions", headers=good))
        assert listed.status_code == 200
        assert {a["peer_id"] for a in listed.json()["admissions"]} == {"web-1", "web-2"}
        body = {"group": "db", "peer_id": "db-0"}
        unknown = world.run(world.client.post("/v1/admin/revoke", headers=good, json=body))
        assert unknown.status_code == 404 and "db/db-0 has no admission" in unknown.text
        reloaded = world.run(world.client.post("/v1/admin/policy/reload", headers=good))
        assert reloaded.status_code == 200, reloaded.text
        assert reads == [1]
        assert [r["peer_id"] for r in reloaded.json()["revoked"]] == ["web-1"]
        assert world.run(world.coordinator.store.get(admission_key(*CALLER))) is None
    finally:
        world.close()
