"""Boot authorization: auth-simple's rules and reasons, the wire types, and the authorizers."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from teemesh.config import ConfigError
from teemesh.errors import InputError, PeerError
from teemesh.platform.bootauth import (
    ZERO_ADDRESS,
    AuthInfo,
    AuthSimpleConfig,
    BootDecision,
    BootInfo,
    BootReason,
    ConfigAuth,
    DevAuth,
    WebhookAuth,
    decide,
    load_auth_config,
    parse_auth_config,
)
from teemesh.platform.bootauth_http import create_app

APP_ID = "5bb4ff9a3837357f19dc176407a5709c62eb6c56"
COMPOSE = "c143116fef3940e7f776bfc0919c256232ae5338a6e948c96b711e0b2383483a"
OS_IMAGE = "e61be43dd1cc6a6f5edefd7c51b608983780839b0000ce60dd99737dcffe09b9"
MR_AGG = "ab" * 32
DEVICE = "de" * 32
OTHER = "0f" * 32

INFO = BootInfo(
    tee_variant="dstack-tdx",
    mr_aggregated=bytes.fromhex(MR_AGG),
    os_image_hash=bytes.fromhex(OS_IMAGE),
    mr_system=bytes.fromhex("11" * 32),
    app_id=bytes.fromhex(APP_ID),
    compose_hash=bytes.fromhex(COMPOSE),
    instance_id=bytes.fromhex("22" * 20),
    device_id=bytes.fromhex(DEVICE),
    key_provider_info=b'{"name":"kms","id":"00"}',
    tcb_status="UpToDate",
    advisory_ids=(),
)

GOOD: dict[str, Any] = {
    "gatewayAppId": "0xgateway",
    "osImages": ["0x" + OS_IMAGE],
    "kms": {"mrAggregated": ["0x" + MR_AGG], "devices": ["0x" + DEVICE]},
    "apps": {"0x" + APP_ID: {"composeHashes": ["0x" + COMPOSE], "devices": ["0x" + DEVICE]}},
}


def config(**changes: Any) -> AuthSimpleConfig:
    return parse_auth_config(json.dumps({**GOOD, **changes}), source="auth.json")


def info(**changes: Any) -> BootInfo:
    return dataclasses.replace(INFO, **changes)


# --------------------------------------------------------------------------- decide


@pytest.mark.parametrize("kind", ["app", "kms"])
def test_allowed_carries_gateway_app_id_and_empty_reason(kind: str) -> None:
    assert decide(config(), INFO, kind) == BootDecision(True, "", "0xgateway")


@pytest.mark.parametrize("kind", ["app", "kms"])
@pytest.mark.parametrize(
    ("cfg", "boot", "reason"),
    [
        ({}, {"tcb_status": "OutOfDate"}, BootReason.TCB_STATUS),
        ({}, {"tcb_status": ""}, BootReason.TCB_STATUS),
        ({}, {"advisory_ids": ("INTEL-SA-00837",)}, BootReason.ADVISORY),
        (
            {"allowedAdvisoryIds": ["INTEL-SA-00837"]},
            {"advisory_ids": ("INTEL-SA-00837", "INTEL-SA-00615")},
            BootReason.ADVISORY,
        ),
        ({}, {"os_image_hash": bytes.fromhex(OTHER)}, BootReason.OS_IMAGE),
        ({"osImages": []}, {}, BootReason.OS_IMAGE),
    ],
)
def test_common_checks(kind: str, cfg: dict[str, Any], boot: dict[str, Any], reason: str) -> None:
    decision = decide(config(**cfg), info(**boot), kind)
    assert decision == BootDecision(False, reason, "0xgateway")


def test_checks_run_in_auth_simple_order() -> None:
    everything_wrong = info(
        tcb_status="Revoked",
        advisory_ids=("X",),
        os_image_hash=b"\1",
        mr_aggregated=b"\2",
        app_id=b"\3",
    )
    assert decide(config(), everything_wrong, "kms").reason == BootReason.TCB_STATUS
    ok_tcb = dataclasses.replace(everything_wrong, tcb_status="UpToDate")
    assert decide(config(), ok_tcb, "app").reason == BootReason.ADVISORY
    assert decide(config(), info(os_image_hash=b"\1", app_id=b"\3"), "app").reason == (
        BootReason.OS_IMAGE
    )


def test_tcb_statuses_and_advisories_can_be_widened() -> None:
    widened = config(allowedTcbStatuses=["UpToDate", "SWHardeningNeeded"], allowedAdvisoryIds=["A"])
    assert decide(
        widened, info(tcb_status="SWHardeningNeeded", advisory_ids=("A",)), "app"
    ).is_allowed
    assert not decide(widened, info(tcb_status="OutOfDate"), "app").is_allowed


def test_strict_by_default() -> None:
    cfg = parse_auth_config("{}", source="t")
    assert cfg.allowed_tcb_statuses == ("UpToDate",)
    assert cfg.allowed_advisory_ids == ()
    assert cfg.kms_contract_addr == ZERO_ADDRESS and cfg.app_implementation == ZERO_ADDRESS
    assert decide(cfg, INFO, "app") == BootDecision(False, BootReason.OS_IMAGE, "")


def test_kms_aggregated_mr() -> None:
    assert decide(config(), info(mr_aggregated=bytes(32)), "kms").reason == BootReason.KMS_MR
    empty = config(kms={"mrAggregated": [], "allowAnyDevice": True})
    assert decide(empty, INFO, "kms").reason == BootReason.KMS_MR
    # the app path never looks at mrAggregated
    assert decide(config(), info(mr_aggregated=bytes(32)), "app").is_allowed


@pytest.mark.parametrize(
    ("devices", "allow_any", "allowed"),
    [
        (["0x" + DEVICE], False, True),
        (["0x" + OTHER], False, False),
        (["0x" + OTHER], True, True),
        ([], False, True),  # an empty list admits any device, as in auth-simple
    ],
)
def test_device_rule(devices: list[str], allow_any: bool, allowed: bool) -> None:
    rule = {"devices": devices, "allowAnyDevice": allow_any}
    kms = config(kms={"mrAggregated": [MR_AGG], **rule})
    app = config(apps={APP_ID: {"composeHashes": [COMPOSE], **rule}})
    assert decide(kms, INFO, "kms") == BootDecision(
        allowed, "" if allowed else BootReason.KMS_DEVICE, "0xgateway"
    )
    assert decide(app, INFO, "app") == BootDecision(
        allowed, "" if allowed else BootReason.APP_DEVICE, "0xgateway"
    )


def test_app_rules() -> None:
    assert decide(config(apps={}), INFO, "app").reason == BootReason.APP_NOT_REGISTERED
    assert decide(config(), info(app_id=bytes(20)), "app").reason == BootReason.APP_NOT_REGISTERED
    assert decide(config(), info(compose_hash=bytes(32)), "app").reason == BootReason.COMPOSE_HASH
    no_hashes = config(apps={APP_ID: {}})
    assert decide(no_hashes, INFO, "app").reason == BootReason.COMPOSE_HASH
    # an app entry admits only its own app; the kms path never looks at apps
    assert decide(config(apps={}), INFO, "kms").is_allowed


def test_reason_strings_match_auth_simple() -> None:
    assert [r.value for r in BootReason] == [
        "TCB status is not allowed",
        "advisory ID is not allowed",
        "OS image is not allowed",
        "aggregated MR not allowed",
        "KMS is not allowed to boot on this device",
        "app not registered",
        "compose hash not allowed",
        "app is not allowed to boot on this device",
    ]


def test_unknown_kind_is_an_input_error() -> None:
    with pytest.raises(InputError, match="kind: expected one of app, kms"):
        decide(config(), INFO, "gateway")


# --------------------------------------------------------------------------- hex normalisation


def test_config_hex_normalised_from_0x_and_upper_case() -> None:
    cfg = parse_auth_config(
        json.dumps(
            {
                "osImages": ["0X" + OS_IMAGE.upper()],
                "kms": {"mrAggregated": [MR_AGG.upper()], "devices": ["0x" + DEVICE.upper()]},
                "apps": {"0x" + APP_ID.upper(): {"composeHashes": ["0x" + COMPOSE.upper()]}},
            }
        ),
        source="t",
    )
    assert cfg.os_images == (OS_IMAGE,)
    assert cfg.kms.mr_aggregated == (MR_AGG,)
    assert cfg.kms.devices == (DEVICE,)
    assert list(cfg.apps) == [APP_ID]
    assert cfg.apps[APP_ID].compose_hashes == (COMPOSE,)
    assert decide(cfg, INFO, "app").is_allowed
    assert decide(cfg, INFO, "kms").is_allowed


def test_boot_info_hex_accepts_0x_and_upper_case() -> None:
    doc = INFO.to_json()
    shouty = {k: "0x" + v.upper() if k in ("appId", "composeHash") else v for k, v in doc.items()}
    assert BootInfo.from_json(shouty) == INFO


def test_same_app_twice_after_normalising_is_an_error() -> None:
    with pytest.raises(ConfigError, match="is listed twice"):
        config(apps={"0x" + APP_ID: {}, APP_ID.upper(): {}})


# --------------------------------------------------------------------------- config errors


def test_config_problems_reported_together() -> None:
    with pytest.raises(ConfigError) as err:
        parse_auth_config(
            json.dumps(
                {
                    "osImages": ["0xzz"],
                    "chainId": "1",
                    "allowedTcbStatuses": "UpToDate",
                    "kms": {"mrAggregated": ["abc"], "allowAnyDevice": "yes"},
                    "apps": {"nothex": {"composeHashes": [COMPOSE]}, APP_ID: {"composeHash": []}},
                    "gatewayAppID": "",
                }
            ),
            source="/etc/auth.json",
        )
    problems = err.value.problems
    assert str(err.value).startswith(f"/etc/auth.json: {len(problems)} problem(s):")
    expected = [
        "osImages.0: not hex",
        "chainId:",
        "allowedTcbStatuses:",
        "kms.mrAggregated.0: hex has an odd number of digits",
        "kms.allowAnyDevice:",
        "apps.nothex.[key]: not hex",
        f"apps.{APP_ID}.composeHash: Extra inputs are not permitted",
        "gatewayAppID: Extra inputs are not permitted",
    ]
    for part in expected:
        assert any(p.startswith(part) for p in problems), (part, problems)
    assert len(problems) == len(expected)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "(top level): invalid JSON at line 1 column 1"),
        ('{"osImages": [}', "(top level): invalid JSON at line 1 column 15"),
        ("[]", "(top level): Input should be a valid dictionary"),
        ('{"chainId": -1}', "chainId: Input should be greater than or equal to 0"),
        ('{"chainId": true}', "chainId: Input should be a valid integer"),
        ('{"apps": {"aa": null}}', "apps.aa: Input should be a valid dictionary"),
    ],
)
def test_config_parse_errors(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_auth_config(text, source="a.json")
    assert err.value.problems[0].startswith(problem), err.value.problems


def test_load_auth_config_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    with pytest.raises(ConfigError, match=f"(?s){missing}: 1 problem.*No such file"):
        load_auth_config(missing)
    (tmp_path / "a.json").write_text(json.dumps(GOOD))
    assert load_auth_config(tmp_path / "a.json") == config()


# --------------------------------------------------------------------------- wire types


def test_boot_info_wire_round_trip() -> None:
    doc = INFO.to_json()
    assert list(doc) == [
        "teeVariant",
        "mrAggregated",
        "osImageHash",
        "mrSystem",
        "appId",
        "composeHash",
        "instanceId",
        "deviceId",
        "keyProviderInfo",
        "tcbStatus",
        "advisoryIds",
    ]
    assert doc["appId"] == APP_ID and doc["keyProviderInfo"] == INFO.key_provider_info.hex()
    assert json.loads(json.dumps(doc)) == doc
    assert BootInfo.from_json(doc) == INFO


def test_boot_info_defaults_like_auth_simple_and_ignores_unknown_keys() -> None:
    required = {k: INFO.to_json()[k] for k in ("mrAggregated", "osImageHash", "appId")}
    required |= {k: "" for k in ("composeHash", "instanceId", "deviceId")}
    parsed = BootInfo.from_json({**required, "eventLog": "[]", "mrtd": "00"})
    assert parsed.tee_variant == "" and parsed.tcb_status == "" and parsed.advisory_ids == ()
    assert parsed.mr_system == b"" and parsed.key_provider_info == b""
    legacy = BootInfo.from_json({**required, "attestationMode": "dstack-tdx"})
    assert legacy.tee_variant == "dstack-tdx"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "BootInfo: expected a JSON object, got an array"),
        ({"mrAggregated": None}, "mrAggregated: expected a hex string"),
        ({"osImageHash": "0xabc"}, "osImageHash: hex has an odd number of digits"),
        ({"deviceId": "zz"}, "deviceId: not hex"),
        ({"tcbStatus": 1}, "tcbStatus: expected a string, got a number"),
        ({"teeVariant": None}, "teeVariant: expected a string, got null"),
        ({"advisoryIds": "INTEL-SA-1"}, "advisoryIds: expected an array, got a string"),
        ({"advisoryIds": ["a", 2]}, r"advisoryIds\[1\]: expected a string, got a number"),
        ({"advisoryIds": [True]}, r"advisoryIds\[0\]: expected a string, got a boolean"),
    ],
)
def test_boot_info_bad_input_names_the_field(doc: Any, message: str) -> None:
    if isinstance(doc, dict):
        doc = {**INFO.to_json(), **doc}
    with pytest.raises(InputError, match=message):
        BootInfo.from_json(doc)


@pytest.mark.parametrize("field", ["mrAggregated", "osImageHash", "appId", "deviceId"])
def test_boot_info_missing_required_field(field: str) -> None:
    doc = INFO.to_json()
    del doc[field]
    with pytest.raises(InputError, match=f"^{field}: missing$"):
        BootInfo.from_json(doc)


def test_boot_decision_wire_form() -> None:
    decision = BootDecision(False, "app not registered", "gw")
    assert decision.to_json() == {
        "isAllowed": False,
        "reason": "app not registered",
        "gatewayAppId": "gw",
    }
    assert BootDecision.from_json(decision.to_json()) == decision


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("yes", "BootDecision: expected a JSON object"),
        ({"isAllowed": 1, "reason": "", "gatewayAppId": ""}, "isAllowed: expected true or false"),
        ({"isAllowed": True, "gatewayAppId": ""}, "reason: missing"),
        ({"isAllowed": True, "reason": ""}, "gatewayAppId: missing"),
        ({"isAllowed": True, "reason": None, "gatewayAppId": ""}, "reason: expected a string"),
    ],
)
def test_boot_decision_from_json_is_strict(doc: Any, message: str) -> None:
    with pytest.raises(InputError, match=message):
        BootDecision.from_json(doc)


def test_auth_info_wire_form() -> None:
    meta = config(chainId=8453, kmsContractAddr="0xKms").auth_info()
    doc = meta.to_json()
    assert doc == {
        "status": "ok",
        "kmsContractAddr": "0xKms",
        "gatewayAppId": "0xgateway",
        "chainId": 8453,
        "appImplementation": ZERO_ADDRESS,
        "appAuthImplementation": ZERO_ADDRESS,
    }
    assert AuthInfo.from_json(doc) == meta
    with pytest.raises(InputError, match="chainId"):
        AuthInfo.from_json({**doc, "chainId": True})
    with pytest.raises(InputError, match="status"):
        AuthInfo.from_json({**doc, "status": "error"})


# --------------------------------------------------------------------------- authorizers


def test_dev_auth_allows_everything_and_says_it_is_dev() -> None:
    dev = DevAuth("gw")
    assert dev.authorize(info(tcb_status="Revoked"), "kms") == BootDecision(True, "", "gw")
    assert dev.info() == AuthInfo(gateway_app_id="gw", is_dev=True)
    with pytest.raises(InputError):
        dev.authorize(INFO, "other")


def test_config_auth_rereads_the_file_on_every_request(tmp_path: Path) -> None:
    path = tmp_path / "auth.json"
    path.write_text(json.dumps(GOOD))
    auth = ConfigAuth(path)
    assert auth.authorize(INFO, "app").is_allowed
    path.write_text(json.dumps({**GOOD, "apps": {}}))
    assert auth.authorize(INFO, "app") == BootDecision(False, "app not registered", "0xgateway")
    path.write_text(json.dumps({**GOOD, "gatewayAppId": "new"}))
    assert auth.info().gateway_app_id == "new"


def test_config_auth_denies_with_a_reason_when_the_config_breaks(tmp_path: Path) -> None:
    path = tmp_path / "auth.json"
    path.write_text(json.dumps({**GOOD, "osImages": ["nothex"]}))
    decision = ConfigAuth(path).authorize(INFO, "kms")
    assert not decision.is_allowed
    assert decision.reason.startswith(f"auth config {path} is invalid: osImages.0: not hex")
    path.unlink()
    assert "No such file" in ConfigAuth(path).authorize(INFO, "app").reason
    with pytest.raises(ConfigError):
        ConfigAuth(path).info()


def _webhook(handler: Any) -> WebhookAuth:
    return WebhookAuth("http://auth.test/base/", timeout=2, transport=httpx.MockTransport(handler))


def test_webhook_posts_the_boot_info_to_the_kind_path() -> None:
    seen: list[tuple[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), json.loads(request.content)))
        return httpx.Response(200, json={"isAllowed": True, "reason": "", "gatewayAppId": "gw"})

    auth = _webhook(handler)
    assert auth.authorize(INFO, "kms") == BootDecision(True, "", "gw")
    assert auth.authorize(INFO, "app").is_allowed
    assert seen == [
        ("http://auth.test/base/bootAuth/kms", INFO.to_json()),
        ("http://auth.test/base/bootAuth/app", INFO.to_json()),
    ]


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        (httpx.Response(500, text="boom"), "answered HTTP 500: boom"),
        (httpx.Response(302, headers={"location": "/x"}), "answered HTTP 302"),
        (httpx.Response(200, text="not json"), "sent a malformed reply: body: invalid JSON"),
        (httpx.Response(200, json={"isAllowed": "true"}), "malformed reply: isAllowed"),
        (httpx.Response(200, json={"isAllowed": True}), "malformed reply: reason: missing"),
        (httpx.Response(200, content=b"x" * (1024 * 1024 + 1)), "reply over 1048576 bytes"),
    ],
)
def test_webhook_that_cannot_decide_raises_peer_error(
    response: httpx.Response, reason: str
) -> None:
    with pytest.raises(PeerError) as info:
        _webhook(lambda request: response).authorize(INFO, "app")
    assert str(info.value).startswith("auth webhook http://auth.test/base/bootAuth/app ")
    assert reason in str(info.value)


def test_webhook_transport_errors_raise_peer_error() -> None:
    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    with pytest.raises(PeerError, match=r"timed out after 2 s$"):
        _webhook(timeout).authorize(INFO, "app")
    with pytest.raises(PeerError, match=r"failed: ConnectError: \[Errno 111\]"):
        _webhook(refused).authorize(INFO, "kms")


def test_webhook_info() -> None:
    meta = AuthInfo(gateway_app_id="gw", chain_id=1)
    assert _webhook(lambda r: httpx.Response(200, json=meta.to_json())).info() == meta
    with pytest.raises(PeerError, match="malformed reply: chainId"):
        _webhook(lambda r: httpx.Response(200, json={"status": "ok"})).info()
    with pytest.raises(PeerError, match="answered HTTP 503"):
        _webhook(lambda r: httpx.Response(503)).info()


@pytest.mark.parametrize(
    ("url", "timeout", "message"),
    [
        ("auth.local:3000", 1.0, "url: expected an http"),
        ("ftp://auth.local", 1.0, "url: expected an http"),
        ("http://", 1.0, "url:"),
        ("http://auth.local", 0.0, "timeout: expected a positive number"),
    ],
)
def test_webhook_refuses_bad_settings(url: str, timeout: float, message: str) -> None:
    with pytest.raises(InputError, match=message):
        WebhookAuth(url, timeout)


# --------------------------------------------------------------------------- HTTP app (in process)


def _drive(app: Any, script: Callable[[httpx.AsyncClient], Awaitable[None]]) -> None:
    """Run ``script`` against the ASGI app in process (no sockets)."""

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://auth") as client:
            await script(client)

    asyncio.run(main())


def test_http_app_answers_and_reports_malformed_bodies(tmp_path: Path) -> None:
    path = tmp_path / "auth.json"
    path.write_text(json.dumps(GOOD))
    seen: list[tuple[str, BootDecision]] = []
    app = create_app(ConfigAuth(path), on_decision=lambda k, i, d: seen.append((k, d)))

    async def script(client: httpx.AsyncClient) -> None:
        assert (await client.get("/")).json()["gatewayAppId"] == "0xgateway"
        reply = await client.post("/bootAuth/app", json=INFO.to_json())
        assert reply.status_code == 200 and reply.json()["isAllowed"] is True
        for body, error in [
            (b"", "body: invalid JSON"),
            (b"[]", "BootInfo: expected a JSON object"),
            (b'{"appId": 1}', "mrAggregated: missing"),
            (json.dumps({**INFO.to_json(), "appId": "0xq"}).encode(), "appId: hex has an odd"),
            (b'"\\ud800"', "body: not valid Unicode"),
            (b"\xff", "body: not UTF-8"),
        ]:
            reply = await client.post("/bootAuth/kms", content=body)
            assert reply.status_code == 400, body
            assert reply.json()["error"].startswith(error), reply.json()
        path.write_text("{")
        broken = await client.get("/")
        assert broken.status_code == 500 and broken.json()["status"] == "error"
        assert str(path) in broken.json()["message"]
        denied = (await client.post("/bootAuth/app", json=INFO.to_json())).json()
        assert denied["isAllowed"] is False and "is invalid" in denied["reason"]

    _drive(app, script)
    assert [k for k, _ in seen] == ["app", "app"]


def test_http_app_refuses_oversized_bodies() -> None:
    async def script(client: httpx.AsyncClient) -> None:
        reply = await client.post("/bootAuth/app", content=b" " * (300 * 1024))
        assert reply.status_code == 400 and "over" in reply.json()["error"]
        assert (await client.get("/")).json()["gatewayAppId"] == "gw"

    _drive(create_app(DevAuth("gw")), script)
