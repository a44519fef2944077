"""``teemesh agent``: a dstack-compatible guest agent backed by the simulated TEE."""

from __future__ import annotations

import base64
import json
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from teemesh.attest.dcap import CollateralStore
from teemesh.attest.dstack import compose_hash
from teemesh.attest.policy import load_policy
from teemesh.attest.simulated import OsImage, PlatformKey, SimulatedCvm
from teemesh.cli._options import collateral_option
from teemesh.cli._output import fail, stderr, stdout, table
from teemesh.encoding import load_json, parse_hex
from teemesh.errors import InputError, MeshError
from teemesh.fsutil import append_private, write_private

if TYPE_CHECKING:
    from teemesh.platform.appkeys import AgentKeys

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
    "--instance-id",
    help="Pin the instance id (20 bytes hex; default: fresh each start): a rebooted CVM keeps it.",
)
@click.option(
    "--os-image",
    default="dstack-0.5.7-sim",
    show_default=True,
    help="Name of the simulated OS image (measured into MRTD and RTMR0-2).",
)
@click.option(
    "--kms-url",
    "kms_urls",
    multiple=True,
    metavar="URL",
    help="Get the app keys from this KMS at boot (repeatable: tried in order).",
)
@click.option(
    "--kms-policy",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Attestation policy the KMS must satisfy (required with --kms-url).",
)
@collateral_option
@click.option(
    "--encrypted-env",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="dstack .encrypted-env sealed to this app's env key (KMS mode); decrypted into "
    "STATE/decrypted-env, keeping only the compose file's allowed_envs.",
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
    instance_id: str | None,
    os_image: str,
    kms_urls: tuple[str, ...],
    kms_policy: Path | None,
    collateral: Path | None,
    encrypted_env: Path | None,
) -> None:
    """Serve dstack's guest-agent API on SOCKET, backed by the simulated TEE."""
    # Imported here: FastAPI and uvicorn cost every other teemesh command ~0.5 s at start-up.
    # So are the guest agent (msgpack), app keys and dstack's key derivations: the sidecar
    # (`teemesh sidecar run`) must not carry them in memory.
    from teemesh.platform.agent import GuestAgent  # noqa: PLC0415
    from teemesh.platform.agent_http import create_app  # noqa: PLC0415
    from teemesh.platform.appkeys import keys_from_seed, load_appkeys  # noqa: PLC0415
    from teemesh.platform.keys import decrypt_env  # noqa: PLC0415
    from teemesh.platform.prpc import bind_tcp, bind_unix, run_app  # noqa: PLC0415

    if kms_urls and app_keys:
        raise click.UsageError("--app-keys and --kms-url exclude each other")
    if kms_urls and kms_policy is None:
        raise click.UsageError("--kms-url needs --kms-policy: which KMS may give this app keys")
    if encrypted_env and not kms_urls:
        raise click.UsageError("--encrypted-env needs --kms-url (the env key comes from the KMS)")
    try:
        platform = load_or_create_platform_key(platform_key or state / "platform.key")
        compose = app_compose.read_bytes() if app_compose else DEFAULT_COMPOSE
        settings = _compose_settings(compose)
        pinned = parse_hex(app_id, field="--app-id", size=20) if app_id else None
        instance = parse_hex(instance_id, field="--instance-id", size=20) if instance_id else None
        cvm = SimulatedCvm(
            platform,
            OsImage(os_image),
            compose,
            app_id=pinned,
            instance_id=b"" if settings.get("no_instance_id") is True else instance,
            awaiting_keys=True,
        )
        if kms_urls:
            assert kms_policy is not None
            agent_keys = _keys_from_kms(kms_urls, kms_policy, collateral, cvm)
        else:
            agent_keys = load_appkeys(app_keys.read_bytes()) if app_keys else keys_from_seed()
        cvm.finish_boot(agent_keys.provider)
        if encrypted_env:
            env = decrypt_env(encrypted_env.read_bytes(), agent_keys.env_crypt_key)
            _write_env(state / "decrypted-env", env, settings.get("allowed_envs"))
        events_log = state / "runtime_events.log"

        def log_event(name: str, payload: bytes) -> None:
            line = {"event": name, "payload": base64.b64encode(payload).decode()}
            append_private(events_log, json.dumps(line).encode() + b"\n")

        guest = GuestAgent(
            cvm, agent_keys, compose, str(settings.get("name", "")), on_event=log_event
        )
        unix_paths = [p for p in (socket_path, tappd_socket) if p is not None]
        sockets = [bind_unix(p) for p in unix_paths]
        if listen:
            sockets.append(bind_tcp(listen))
    except MeshError as exc:
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
        run_app(create_app(guest), sockets)
    finally:
        for sock in sockets:
            sock.close()
        for path in unix_paths:
            path.unlink(missing_ok=True)


def _compose_settings(compose: bytes) -> dict[str, Any]:
    """The app-compose fields the guest acts on; the bytes themselves are measured as they are."""
    try:
        doc = load_json(compose, field="app-compose")
    except InputError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _keys_from_kms(
    urls: tuple[str, ...], policy_path: Path, collateral: Path | None, cvm: SimulatedCvm
) -> AgentKeys:
    from teemesh.platform.kms_client import KmsPolicy, fetch_app_keys  # noqa: PLC0415

    store = CollateralStore.open(collateral) if collateral else None
    with stderr.status(f"getting app keys from {', '.join(urls)}"):
        agent_keys, url = fetch_app_keys(urls, KmsPolicy(load_policy(policy_path), store), cvm)
    stderr.print(f"agent: app keys from {url}")
    return agent_keys


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _write_env(path: Path, env: Sequence[tuple[str, str]], allowed: object) -> None:
    """KEY=value lines a shell can source, owner-only; names outside allowed_envs are dropped."""
    allowed_names = set(allowed) if isinstance(allowed, list) else set()
    kept, dropped = [], []
    for name, value in env:
        if name not in allowed_names:
            dropped.append(name)
        elif not _ENV_NAME.fullmatch(name):
            raise InputError("not a variable name", field=f"encrypted env {name!r}")
        else:
            kept.append(f"{name}={shlex.quote(value)}\n")
    write_private(path, "".join(kept).encode())
    if dropped:  # names only: values are secrets
        stderr.print(f"agent: dropped env not in allowed_envs: {', '.join(sorted(set(dropped)))}")
