"""``teemesh agent``: a dstack-compatible guest agent backed by the simulated TEE."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import click

from teemesh.attest.dstack import compose_hash
from teemesh.attest.simulated import OsImage, PlatformKey, SimulatedCvm
from teemesh.cli._output import fail, stdout, table
from teemesh.encoding import parse_hex
from teemesh.errors import InputError
from teemesh.fsutil import append_private, write_private
from teemesh.platform.agent import GuestAgent
from teemesh.platform.appkeys import keys_from_seed, load_appkeys

DEFAULT_COMPOSE = (
    b'{"manifest_version":2,"name":"teemesh-agent","runner":"docker-compose",'
    b'"docker_compose_file":"","kms_enabled":false,"gateway_enabled":false}'
)


def load_or_create_platform_key(path: Path) -> PlatformKey:
    """The simulated platform's key: created owner-only on first use, then reused."""
    if path.exists():
        return PlatformKey.from_pem(path.read_bytes())
    key = PlatformKey.generate()
    write_private(path, key.private_pem())
    path.with_suffix(".pub").write_bytes(key.public_pem())
    return key


@click.command()
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(path_type=Path),
    required=True,
    help="Unix socket for the DstackGuest and Tappd APIs (dstack.sock).",
)
@click.option(
    "--tappd-socket",
    type=click.Path(path_type=Path),
    help="A second Unix socket, for clients that expect tappd.sock.",
)
@click.option("--listen", help="Also serve on TCP HOST:PORT.")
@click.option(
    "--state",
    type=click.Path(path_type=Path),
    default=Path(".teemesh/agent"),
    show_default=True,
    help="Folder for the platform key and the runtime-event log.",
)
@click.option(
    "--platform-key",
    type=click.Path(path_type=Path),
    help="Simulated platform signing key (default: STATE/platform.key, created once).",
)
@click.option(
    "--app-keys",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="dstack appkeys.json (default: fresh keys, as key provider none).",
)
@click.option(
    "--app-compose",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="app-compose.json whose exact bytes are measured (compose hash).",
)
@click.option("--app-id", help="Pin the app id (20 bytes hex; default: compose hash prefix).")
@click.option(
    "--os-image",
    default="dstack-0.5.7-sim",
    show_default=True,
    help="Name of the simulated OS image (measured into MRTD and RTMR0-2).",
)
def agent(
    socket_path: Path,
    tappd_socket: Path | None,
    listen: str | None,
    state: Path,
    platform_key: Path | None,
    app_keys: Path | None,
    app_compose: Path | None,
    app_id: str | None,
    os_image: str,
) -> None:
    """Serve dstack's guest-agent API on SOCKET, backed by the simulated TEE."""
    # Imported here: FastAPI and uvicorn cost every other teemesh command ~0.5 s at start-up.
    from teemesh.platform.agent_http import bind_tcp, bind_unix, run  # noqa: PLC0415

    try:
        platform = load_or_create_platform_key(platform_key or state / "platform.key")
        compose = app_compose.read_bytes() if app_compose else DEFAULT_COMPOSE
        agent_keys = load_appkeys(app_keys.read_bytes()) if app_keys else keys_from_seed()
        pinned = parse_hex(app_id, field="--app-id", size=20) if app_id else None
        cvm = SimulatedCvm(platform, OsImage(os_image), compose, agent_keys.provider, app_id=pinned)
        events_log = state / "runtime_events.log"

        def log_event(name: str, payload: bytes) -> None:
            line = {"event": name, "payload": base64.b64encode(payload).decode()}
            append_private(events_log, json.dumps(line).encode() + b"\n")

        guest = GuestAgent(cvm, agent_keys, compose, _app_name(compose), on_event=log_event)
        unix_paths = [p for p in (socket_path, tappd_socket) if p is not None]
        sockets = [bind_unix(p) for p in unix_paths]
        if listen:
            host, _, port = listen.rpartition(":")
            sockets.append(bind_tcp(host or "127.0.0.1", int(port)))
    except InputError as exc:
        fail(exc)
    except (OSError, ValueError) as exc:
        fail(f"cannot start the agent: {exc}")
    stdout.print(table("teemesh agent", [
        ("socket", socket_path),
        ("app_id", (cvm.app_id or b"").hex()),
        ("compose_hash", compose_hash(compose).hex()),
        ("instance_id", (cvm.instance_id or b"").hex()),
        ("key provider", agent_keys.provider.name),
        ("platform key", (platform_key or state / "platform.key").with_suffix(".pub")),
    ]))  # fmt: skip
    try:
        run(guest, sockets)
    finally:
        for sock in sockets:
            sock.close()
        for path in unix_paths:
            path.unlink(missing_ok=True)


def _app_name(compose: bytes) -> str:
    try:
        doc = json.loads(compose)
    except ValueError:
        return ""
    return str(doc.get("name", "")) if isinstance(doc, dict) else ""
