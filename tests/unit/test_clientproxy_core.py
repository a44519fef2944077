"""dstack-vpc's client proxy, the pure decisions: target headers, forwarding, status mapping."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teemesh.identity.svid import SvidIdentity
from teemesh.sidecar.clientproxy_core import (
    DEFAULT_PORT,
    ProxyError,
    Target,
    agent_args,
    agent_method,
    backends_by_port,
    candidates,
    error_response,
    forwarded_request,
    gateway_domain,
    identity_problem,
    json_response,
    parse_target,
    refusal_error,
    relayed_response,
    vpc_app_ids,
    vpc_headers,
    vpc_path,
)
from teemesh.sidecar.config import Backend, Route, SidecarConfig, ViaGateway
from teemesh.sidecar.routing import Instance, live_instances_of
from teemesh.sidecar.tunnel import Refusal

APP, OTHER = "ab" * 20, "cd" * 20


def instance(key: str, app: str = APP, *, service: str = "api", inst: str | None = None,
             health: str = "passing", group: str = "db") -> Instance:  # fmt: skip
    return Instance(key, service, group, key, "127.0.0.1", 7443, {}, health,
                    inst or f"{key:0>40}", app)  # fmt: skip


def config(**changes: object) -> SidecarConfig:
    fields: dict[str, object] = {
        "cluster": "pg", "group": "web", "peer_id": "web-0", "coordinators": ("https://c",),
        "coordinator_policy": {}, "address": "127.0.0.1",
        "routes": {"api": Route("api", 8080), "db": Route("pg", 5432)},
    }  # fmt: skip
    return SidecarConfig(**{**fields, **changes})  # type: ignore[arg-type]


# -- target headers -------------------------------------------------------------------------


def test_the_target_headers() -> None:
    assert parse_target({}) is None
    assert parse_target({"x-dstack-target-app": APP.upper()}) == Target(APP, DEFAULT_PORT)
    headers = {"x-dstack-target-app": f" {APP} ", "x-dstack-target-port": "8080",
               "x-dstack-target-instance": "11" * 20, "x-dstack-target-use-tls": "0"}  # fmt: skip
    assert parse_target(headers) == Target(APP, 8080, "11" * 20, False)
    assert parse_target({"x-dstack-target-app": APP, "x-dstack-target-instance": ""}) == Target(
        APP, DEFAULT_PORT
    )


@pytest.mark.parametrize(
    ("headers", "named"),
    [
        ({"x-dstack-target-app": ""}, "x-dstack-target-app"),
        ({"x-dstack-target-app": "not-hex"}, "x-dstack-target-app"),
        ({"x-dstack-target-app": APP, "x-dstack-target-port": "0"}, "x-dstack-target-port"),
        ({"x-dstack-target-app": APP, "x-dstack-target-port": "65536"}, "x-dstack-target-port"),
        ({"x-dstack-target-app": APP, "x-dstack-target-port": "80a"}, "x-dstack-target-port"),
        ({"x-dstack-target-app": APP, "x-dstack-target-port": "-1"}, "x-dstack-target-port"),
        ({"x-dstack-target-app": APP, "x-dstack-target-instance": "zz"}, "x-dstack-target-inst"),
        ({"x-dstack-target-app": APP, "x-dstack-target-use-tls": "maybe"}, "x-dstack-target-use"),
    ],
)
def test_a_bad_target_header_is_a_400_naming_it(headers: dict[str, str], named: str) -> None:
    """No silent fallback to port 443, unlike dstack-vpc."""
    with pytest.raises(ProxyError) as caught:
        parse_target(headers)
    assert caught.value.status == 400
    assert named in str(caught.value)


header_text = st.text(st.characters(codec="latin-1"), max_size=200)


@given(app=header_text, port=header_text, inst=header_text, tls=header_text)
def test_fuzz_the_target_headers(app: str, port: str, inst: str, tls: str) -> None:
    """Any header values: a well-formed target or a 400, never another exception."""
    headers = {"x-dstack-target-app": app, "x-dstack-target-port": port,
               "x-dstack-target-instance": inst, "x-dstack-target-use-tls": tls}  # fmt: skip
    try:
        target = parse_target(headers)
    except ProxyError as exc:
        assert exc.status == 400
        assert str(exc).startswith("x-dstack-target-")
        return
    assert target is not None
    assert 1 <= target.port <= 65535
    assert all(c in "0123456789abcdef" for c in target.app + (target.instance or ""))


# -- what is forwarded -----------------------------------------------------------------------


def test_the_forwarded_request_keeps_host_and_drops_the_target_headers() -> None:
    headers = [(b"host", b"vpc-server"), (b"x-dstack-target-app", APP.encode()),
               (b"X-Dstack-Target-Port", b"8080"), (b"x-custom", b"1"),
               (b"connection", b"keep-alive"), (b"transfer-encoding", b"chunked"),
               (b"content-length", b"999")]  # fmt: skip
    raw = forwarded_request("POST", "/a/b?c=1", headers, b"hello")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert body == b"hello"
    assert head.split(b"\r\n") == [b"POST /a/b?c=1 HTTP/1.1", b"host: vpc-server",
                                   b"x-custom: 1", b"Content-Length: 5", b"Connection: close"]  # fmt: skip
    assert b"Content-Length" not in forwarded_request("GET", "/", [], b"")


FORGED = [(b"X-Dstack-App-Id", b"ee" * 20), (b"x-dstack-app-id", b"ee" * 20),
          (b"X-TEEMESH-GROUP", b"admin"), (b"x-teemesh-peer", b"admin-0"),
          (b"X-Client-Verify", b"SUCCESS"), (b"x-client-cert", b"-----BEGIN%20CERT"),
          (b"X_Dstack_App_Id", b"ee" * 20), (b"x-teemesh_group", b"admin"),
          (b"X_DSTACK_TARGET_APP", b"ee" * 20)]  # fmt: skip


def test_identity_headers_are_never_forwarded() -> None:
    """A client can write them; a backend written for dstack-vpc may trust them."""
    headers = [(b"host", b"db"), *FORGED, (b"x-custom", b"1")]
    head = forwarded_request("GET", "/", headers, b"").partition(b"\r\n\r\n")[0]
    assert head.split(b"\r\n") == [b"GET / HTTP/1.1", b"host: db", b"x-custom: 1",
                                   b"Connection: close"]  # fmt: skip
    assert vpc_headers([(b"host", b"vpc-server"), *FORGED, (b"x-custom", b"1")]) == [
        ("x-custom", "1")
    ]


# -- where it goes ---------------------------------------------------------------------------


def test_instances_by_app_or_instance_id() -> None:
    a, b = instance("a"), instance("b", OTHER)
    sick = instance("c", health="critical")
    assert live_instances_of([a, b, sick], APP) == ([a], False)
    assert live_instances_of([a, b, sick], a.instance_id or "") == ([a], True)
    assert live_instances_of([sick], APP) == ([], False)


def test_candidates_and_what_is_missing() -> None:
    a, b, pg = instance("a"), instance("b", OTHER), instance("p", service="pg")
    backends = backends_by_port(config())[8080]
    assert backends == {"api"}
    assert backends_by_port(config(backends={"web": Backend(8080)}))[8080] == {"api", "web"}
    assert candidates([a, b, pg], Target(APP, 8080), backends) == [a]
    assert candidates([a, pg], Target(APP, 5432), backends_by_port(config())[5432]) == [pg]
    for target, backends_, missing in [
        (Target("ee" * 20, 8080), backends, "no live instance of app"),
        (
            Target(APP, 9999),
            backends_by_port(config()).get(9999, frozenset()),
            "no route of this sidecar serves port",
        ),
        (Target(APP, 5432), frozenset({"other"}), "serves nothing on port 5432"),
        (Target(APP, 8080, "99" * 20), backends, "no live instance 9999"),
        (Target(APP, 8080, b.instance_id), backends, "is not of app"),
        (Target(APP, 8080, APP), backends, "no live instance"),  # an app id is no instance id
    ]:
        with pytest.raises(ProxyError, match=missing) as caught:
            candidates([a, b, pg], target, backends_)
        assert caught.value.status == 404
    assert candidates([a, b], Target(OTHER, 8080, b.instance_id), backends) == [b]


def test_the_peer_must_be_the_instance_of_the_target_app() -> None:
    """What is checked after the handshake (the chain to the mesh CA: OpenSSL) and before a
    byte of the request is sent. A certificate with the catalog's group and peer id but another
    app id is refused: the case a real coordinator never issues, so tested here."""
    target = instance("db-0")
    good = SvidIdentity("pg", "db", "db-0", 7, bytes.fromhex(APP))
    assert identity_problem(good, target, APP, set()) is None
    assert "revoked" in (identity_problem(good, target, APP, {7}) or "")
    other_app = SvidIdentity("pg", "db", "db-0", 7, bytes.fromhex(OTHER))
    assert f"app {OTHER}, not app {APP}" in (identity_problem(other_app, target, APP, ()) or "")
    no_app = SvidIdentity("pg", "db", "db-0", 7, None)
    assert "no app id" in (identity_problem(no_app, target, APP, ()) or "")
    impostor = SvidIdentity("pg", "ops", "ops-0", 8, bytes.fromhex(APP))
    assert "answered as ops/ops-0" in (identity_problem(impostor, target, APP, ()) or "")


def test_refusals_become_statuses() -> None:
    target = instance("db-0")
    assert refusal_error(Refusal.CALLER_NOT_ALLOWED, target).status == 403
    assert refusal_error(Refusal.UNKNOWN_BACKEND, target).status == 404
    assert refusal_error(Refusal.BACKEND_UNREACHABLE, target).status == 502
    assert refusal_error(Refusal.BAD_REQUEST, target).status == 502
    assert refusal_error(Refusal.DRAINING, target).status == 503
    raw = error_response(refusal_error(Refusal.CALLER_NOT_ALLOWED, target))
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert "may not call" in json.loads(body)["error"]


# -- the guest-agent fallback ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "method"),
    [("/info", "Info"), ("/get_quote", "GetQuote"), ("/prpc/Attest?x=1", "Attest"),
     ("/verify/", "Verify"), ("/Version", "Version"), ("/gateway", None), ("/GATEWAY/", None)],
)  # fmt: skip
def test_agent_methods(path: str, method: str | None) -> None:
    assert agent_method(path) == method


@pytest.mark.parametrize(
    ("path", "method"),
    [("/get_key?path=x", "GetKey"), ("/prpc/GetKey", "GetKey"), ("/get-tls-key/", "GetTlsKey"),
     ("/sign", "Sign"), ("/emit_event", "EmitEvent"), ("/derive_key", "DeriveKey"),
     ("/no_such_method", "NoSuchMethod")],
)  # fmt: skip
def test_agent_methods_with_secrets_or_effects_are_refused(path: str, method: str) -> None:
    """dstack-vpc passes any method: its keys and RTMRs to anything that reaches the port."""
    with pytest.raises(ProxyError) as caught:
        agent_method(path)
    assert caught.value.status == 403
    assert f"method {method} is not served through this proxy" in str(caught.value)


@pytest.mark.parametrize("path", ["/", "/a/..", "/x%20y", "/_", "/" + "a" * 100])
def test_no_agent_method(path: str) -> None:
    with pytest.raises(ProxyError) as caught:
        agent_method(path)
    assert caught.value.status == 404


def test_agent_arguments() -> None:
    assert agent_args("GET", "/get_key?path=a&purpose=b", b"") == {"path": "a", "purpose": "b"}
    assert agent_args("POST", "/get_quote", b'{"report_data": "00"}') == {"report_data": "00"}
    assert agent_args("POST", "/info", b"") == {}
    for method, body, status in [("PUT", b"", 405), ("POST", b"[1]", 400), ("POST", b"{", 400),
                                 ("POST", b" " * (1024 * 1024 + 1), 413)]:  # fmt: skip
        with pytest.raises(ProxyError) as caught:
            agent_args(method, "/info", body)
        assert caught.value.status == status


def test_gateway_domain() -> None:
    assert gateway_domain(config()) == ""
    via = ViaGateway("127.0.0.1:443", "apps.example.com")
    assert gateway_domain(config(via_gateway=via)) == "apps.example.com"


# -- the coordinators' VPC API ----------------------------------------------------------------

HASH = "12" * 8 + "34" * 24


def test_the_coordinators_app_ids_are_what_their_policy_states() -> None:
    assert vpc_app_ids({}) == frozenset()
    assert vpc_app_ids({"compose_hashes": []}) == frozenset()
    # dstack's default: the first 20 bytes of each compose hash
    assert vpc_app_ids({"compose_hashes": [HASH.upper(), "0x" + "56" * 32]}) == {
        HASH[:40], "56" * 20,
    }  # fmt: skip
    # pinned app ids win: the default is only a guess when the policy names none
    assert vpc_app_ids({"compose_hashes": [HASH], "app_ids": [APP.upper()]}) == {APP}
    assert vpc_app_ids({"compose_hashes": [HASH], "app_ids": []}) == frozenset()


@pytest.mark.parametrize("target", ["/api/register?instance_id=x", "/api/nodes/update?uuid=a",
                                    "/api/discover/etcd", "/api/nodes/a%20b", "/api/ping",
                                    "/health"])  # fmt: skip
def test_vpc_paths_pass_as_they_are(target: str) -> None:
    assert vpc_path(target) == target


@pytest.mark.parametrize("target", [
    "/", "/api", "/apix/register", "/v1/catalog/register", "/v1/ca?x=/api/",
    "/api/../v1/catalog", "/api/%2e%2e/v1/catalog", "/api/%2E%2E%2Fv1/catalog",
    "/api/./register", "/api/..\\v1", "http://vpc-server/api/register", "*",
    "/health/", "/healthz", "/health/../v1/catalog", "/HEALTH",
])  # fmt: skip
def test_only_the_vpc_api_is_reached(target: str) -> None:
    with pytest.raises(ProxyError) as caught:
        vpc_path(target)
    assert caught.value.status == 404
    assert repr(target.partition("?")[0]) in str(caught.value)


def test_what_a_coordinator_receives_and_what_comes_back() -> None:
    headers = [(b"host", b"vpc-server"), (b"x-dstack-target-app", APP.encode()),
               (b"X-Dstack-Target-Port", b"8000"), (b"connection", b"keep-alive"),
               (b"content-length", b"3"), (b"transfer-encoding", b"chunked"),
               (b"content-type", b"application/json"), (b"x-custom", b"kept")]  # fmt: skip
    assert vpc_headers(headers) == [("content-type", "application/json"), ("x-custom", "kept")]
    reply = relayed_response(403, [("server", "x"), ("Content-Type", "application/json")],
                             b'{"error":"Forbidden"}')  # fmt: skip
    assert reply == (b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 21\r\nConnection: close\r\n\r\n{\"error\":\"Forbidden\"}")  # fmt: skip
    odd = relayed_response(599, [("content-type", "text/plain\r\nX-Injected: 1")], b"")
    assert odd.startswith(b"HTTP/1.1 599 \r\nContent-Type: text/plain  X-Injected: 1\r\n")
    assert relayed_response(204, [], b"") == (b"HTTP/1.1 204 No Content\r\nContent-Length: 0"
                                              b"\r\nConnection: close\r\n\r\n")  # fmt: skip


def test_the_proxys_own_answers_are_framed_alike() -> None:
    assert json_response(404, {"a": 1}) == relayed_response(
        404, [("Content-Type", "application/json")], b'{\n "a": 1\n}\n'
    )
