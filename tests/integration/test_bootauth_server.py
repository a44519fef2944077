"""The auth-simple server as a real process on loopback, driven by ``WebhookAuth`` (the KMS side)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from etcdkit import stop_process
from procs import free_port

from teemesh.errors import PeerError
from teemesh.platform.bootauth import AuthInfo, BootDecision, BootInfo, WebhookAuth

pytestmark = pytest.mark.integration

START = "from teemesh.cli.kms_auth import auth_simple; auth_simple()"
APP_ID = "5bb4ff9a3837357f19dc176407a5709c62eb6c56"
COMPOSE = "c143116fef3940e7f776bfc0919c256232ae5338a6e948c96b711e0b2383483a"
OS_IMAGE = "e61be43dd1cc6a6f5edefd7c51b608983780839b0000ce60dd99737dcffe09b9"
MR_AGG = "ab" * 32
CONFIG: dict[str, Any] = {
    "gatewayAppId": "0xgateway",
    "chainId": 8453,
    "osImages": ["0x" + OS_IMAGE],
    "kms": {"mrAggregated": ["0x" + MR_AGG], "allowAnyDevice": True},
    "apps": {"0x" + APP_ID.upper(): {"composeHashes": ["0x" + COMPOSE]}},
}
INFO = BootInfo(
    tee_variant="dstack-tdx",
    mr_aggregated=bytes.fromhex(MR_AGG),
    os_image_hash=bytes.fromhex(OS_IMAGE),
    app_id=bytes.fromhex(APP_ID),
    compose_hash=bytes.fromhex(COMPOSE),
    instance_id=bytes.fromhex("22" * 20),
    device_id=bytes.fromhex("de" * 32),
    tcb_status="UpToDate",
)


@dataclass
class Server:
    url: str
    config: Path
    log: Path
    process: subprocess.Popen[bytes]

    def write_config(self, doc: dict[str, Any]) -> None:
        self.config.write_text(json.dumps(doc))


def _start(config: Path, log: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-c", START, "--config", str(config), "--listen", f"127.0.0.1:{port}"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("auth-simple")
    config, log, port = tmp / "auth-config.json", tmp / "server.log", free_port()
    config.write_text(json.dumps(CONFIG))
    process = _start(config, log, port)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"auth-simple did not start:\n{log.read_text()}")
            try:
                if httpx.get(url + "/", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)  # not listening yet, or not answering 200 yet
        yield Server(url, config, log, process)
    finally:
        stop_process(process)


@pytest.fixture()
def webhook() -> Iterator[Callable[..., WebhookAuth]]:
    """WebhookAuth clients that are closed after the test (each holds a connection pool)."""
    made: list[WebhookAuth] = []

    def make(url: str, timeout: float = 5) -> WebhookAuth:
        made.append(WebhookAuth(url, timeout=timeout))
        return made[-1]

    yield make
    for auth in made:
        auth.close()


@pytest.fixture()
def live(server: Server) -> Server:
    """The module's server with the good config back in place (tests edit it)."""
    server.write_config(CONFIG)
    return server


def test_allows_app_and_kms(live: Server, webhook: Callable[..., WebhookAuth]) -> None:
    auth = webhook(live.url, timeout=5)
    assert auth.authorize(INFO, "app") == BootDecision(True, "", "0xgateway")
    assert auth.authorize(INFO, "kms") == BootDecision(True, "", "0xgateway")
    assert "bootAuth/app appId=" + APP_ID in live.log.read_text()


def test_denies_with_auth_simple_reason(live: Server, webhook: Callable[..., WebhookAuth]) -> None:
    auth = webhook(live.url + "/", timeout=5)
    other = BootInfo.from_json({**INFO.to_json(), "composeHash": "00" * 32})
    assert auth.authorize(other, "app") == BootDecision(
        False, "compose hash not allowed", "0xgateway"
    )
    stale = BootInfo.from_json({**INFO.to_json(), "tcbStatus": "OutOfDate"})
    assert auth.authorize(stale, "kms").reason == "TCB status is not allowed"


def test_config_edits_take_effect_at_once(
    live: Server, webhook: Callable[..., WebhookAuth]
) -> None:
    auth = webhook(live.url, timeout=5)
    assert auth.authorize(INFO, "app").is_allowed
    live.write_config({**CONFIG, "apps": {}})
    assert auth.authorize(INFO, "app").reason == "app not registered"
    live.write_config({**CONFIG, "gatewayAppId": "0xnew"})
    assert auth.authorize(INFO, "app") == BootDecision(True, "", "0xnew")
    assert auth.info() == AuthInfo(gateway_app_id="0xnew", chain_id=8453)


def test_broken_config_denies_with_a_reason(
    live: Server, webhook: Callable[..., WebhookAuth]
) -> None:
    live.write_config({**CONFIG, "kms": {"mrAggregated": ["0xnothex"]}})
    decision = webhook(live.url, timeout=5).authorize(INFO, "kms")
    assert not decision.is_allowed
    assert f"{live.config} is invalid: kms.mrAggregated.0: not hex" in decision.reason
    reply = httpx.get(live.url + "/", timeout=5)
    assert reply.status_code == 500 and reply.json()["status"] == "error"


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"{", "body: invalid JSON at line 1 column 2"),
        (b'{"mrAggregated": "00"}', "osImageHash: missing"),
        (json.dumps({**INFO.to_json(), "deviceId": "xyz"}).encode(), "deviceId: hex has an odd"),
        (json.dumps({**INFO.to_json(), "advisoryIds": [1]}).encode(), "advisoryIds[0]: expected"),
    ],
)
def test_malformed_request_is_400_naming_the_field(live: Server, body: bytes, error: str) -> None:
    reply = httpx.post(
        live.url + "/bootAuth/app",
        content=body,
        headers={"content-type": "application/json"},
        timeout=5,
    )
    assert reply.status_code == 400
    assert reply.json()["error"].startswith(error), reply.json()


def test_non_2xx_is_no_decision(live: Server, webhook: Callable[..., WebhookAuth]) -> None:
    with pytest.raises(PeerError, match="answered HTTP 404"):
        webhook(live.url + "/no/such/prefix", timeout=5).authorize(INFO, "app")


def test_server_down_is_no_decision(webhook: Callable[..., WebhookAuth]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(PeerError) as info:
        webhook(url, timeout=5).authorize(INFO, "kms")
    assert str(info.value).startswith(f"auth webhook {url}/bootAuth/kms failed: ConnectError")


def test_silent_server_times_out(webhook: Callable[..., WebhookAuth]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts in the backlog, never answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(PeerError, match=r"timed out after 0\.5 s$"):
            webhook(url, timeout=0.5).authorize(INFO, "app")
    assert time.monotonic() - started < 5


def test_bad_config_at_start_exits_2_naming_file_and_field(tmp_path: Path) -> None:
    config = tmp_path / "auth.json"
    config.write_text(json.dumps({**CONFIG, "osImages": ["0xzz"], "kms": {"allowAny": True}}))
    log = tmp_path / "out.log"
    process = _start(config, log, free_port())
    try:
        assert process.wait(timeout=30) == 2
    finally:
        stop_process(process)
    text = " ".join(log.read_text().split())
    assert f"error: {config}: 2 problem(s):" in text
    assert "osImages.0: not hex" in text and "kms.allowAny: Extra inputs" in text
