"""``teemesh sidecar``: the per-CVM data plane, and the commands a workload uses to talk to it."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from teemesh.checks import split_host_port
from teemesh.cli._options import agent_option, collateral_option
from teemesh.cli._output import fail, grid, print_json, stderr, stdout, table
from teemesh.errors import MeshError

DEFAULT_API = "127.0.0.1:7001"
DEFAULT_STATE = Path(".teemesh/sidecar")
PATRONI_ROLES = {"master": "master", "primary": "master", "promoted": "master",
                 "replica": "replica", "standby_leader": "replica", "sync_standby": "replica",
                 "demoted": "replica"}  # fmt: skip
"""Patroni's role names (3.x and 4.x) as the two roles routes select."""

api_option = click.option(
    "--api", default=DEFAULT_API, show_default=True, help="The sidecar's local API, HOST:PORT."
)


@click.group()
def sidecar() -> None:
    """The per-CVM sidecar: route names, attested mTLS tunnels, health and roles."""


state_option = click.option(
    "--state",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_STATE,
    show_default=True,
    help="Folder for the hosts file of route names and the run file (sidecar-run.json).",
)
hosts_file_option = click.option(
    "--hosts-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write '<vip> <route>' lines (default: STATE/hosts); /etc/hosts works too.",
)
log_level_option = click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning"]), default="info"
)


def launch_options(command: Callable[..., None]) -> Callable[..., None]:
    """What ``run`` and ``dstack`` both take: where the sidecar keeps its state, how it logs,
    its guest agent and DCAP collateral."""
    for option in (collateral_option, agent_option, log_level_option, hosts_file_option,
                   state_option):  # fmt: skip
        command = option(command)
    return command


@sidecar.command("run")
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="Sidecar configuration (identity, coordinators, backends, routes).",
)
@launch_options
def run(
    config_path: Path,
    state: Path,
    hosts_file: Path | None,
    log_level: str,
    agent_endpoint: str | None,
    collateral: Path | None,
) -> None:
    """Admit this CVM, then serve its routes and backends until SIGTERM (then drain).

    The configuration is checked here; then this process becomes the lean sidecar process
    (``python -m teemesh.sidecar``), keeping its PID, so signals reach the sidecar itself.
    """
    _launch(config_path, state, hosts_file, log_level, agent_endpoint, collateral)


@sidecar.command("dstack")
@launch_options
def dstack(
    state: Path,
    hosts_file: Path | None,
    log_level: str,
    agent_endpoint: str | None,
    collateral: Path | None,
) -> None:
    """Run as ``sidecar run`` does, configured by this CVM's measured app-compose.

    The guest agent's Info gives the app-compose this CVM was measured by; its ``teemesh``
    section (written by ``teemesh render``) is the app's sidecar configuration, completed by the
    replica's environment: TEEMESH_PEER_ID, TEEMESH_ADDRESS, TEEMESH_COORDINATORS (URLs,
    comma-separated), TEEMESH_PLATFORM_KEY (tee: simulated), TEEMESH_VIA_GATEWAY (transport:
    gateway) and, in the gateway app, TEEMESH_GATEWAY_CERT and TEEMESH_GATEWAY_KEY (PEM, written
    to STATE owner-only). The completed configuration is written to STATE/sidecar.yaml.
    """
    from teemesh.fsutil import write_private  # noqa: PLC0415
    from teemesh.platform.agent_client import AgentClient  # noqa: PLC0415
    from teemesh.sidecar import dstack as measured  # noqa: PLC0415

    try:
        state = state.resolve()
        try:
            with AgentClient(agent_endpoint) as agent:
                info = agent.info()
        except MeshError as exc:
            fail(f"cannot read this CVM's app-compose from its guest agent: {exc}")
        section, digest = measured.measured_section(info)
        tls = {name: os.environ.get(name, "").strip()
               for name in (measured.ENV_GATEWAY_CERT, measured.ENV_GATEWAY_KEY)}  # fmt: skip
        files = (state / "gateway-tls.pem", state / "gateway-tls.key")
        gateway_files = (str(files[0]), str(files[1])) if all(tls.values()) else None
        config = measured.dstack_sidecar_config(
            section, digest, os.environ, gateway_files=gateway_files
        )
        if "gateway" in config:
            for path, pem in zip(files, tls.values(), strict=True):
                write_private(path, measured.pem_from_env(pem).encode())
        config_path = state / "sidecar.yaml"
        write_private(config_path, json.dumps(config, indent=2).encode())  # JSON is YAML
    except MeshError as exc:
        fail(exc)
    except OSError as exc:
        fail(f"cannot write the sidecar's configuration in {state}: {exc}")
    _launch(config_path, state, hosts_file, log_level, agent_endpoint, collateral)


def _launch(
    config_path: Path,
    state: Path,
    hosts_file: Path | None,
    log_level: str,
    agent_endpoint: str | None,
    collateral: Path | None,
) -> NoReturn:
    """Check the configuration file, write the run file, and become the sidecar process."""
    import logging  # noqa: PLC0415

    from teemesh.sidecar.config import load_sidecar_config  # noqa: PLC0415
    from teemesh.sidecar.contrast import with_environment  # noqa: PLC0415
    from teemesh.sidecar.launch import Launch  # noqa: PLC0415

    try:
        config = load_sidecar_config(config_path)
        # Contrast's sidecar settings (EDG_*/CONTRAST_*), as a pod spec written for it sets them
        config = with_environment(config, os.environ)
        if config.gateway is not None:  # a bad certificate or TXT file is said now, not later
            from teemesh.gateway.listener import check_settings  # noqa: PLC0415

            check_settings(config.gateway)
        if collateral:
            from teemesh.attest.dcap import CollateralStore  # noqa: PLC0415

            CollateralStore.open(collateral)  # refuse a bad path now, not at each admission
        state.mkdir(parents=True, exist_ok=True)
        launch_file = state.resolve() / "sidecar-run.json"
        hosts = (hosts_file or state / "hosts").resolve()
        level = getattr(logging, log_level.upper())
        evidence = str(collateral.resolve()) if collateral else None
        Launch(config, str(hosts), agent_endpoint, evidence, level).write(launch_file)
    except MeshError as exc:
        fail(exc)
    except OSError as exc:
        fail(f"cannot start the sidecar: {exc}")
    sys.stdout.flush()
    sys.stderr.flush()
    command = [sys.executable, "-m", "teemesh.sidecar", str(launch_file)]
    os.execv(sys.executable, command)  # noqa: S606 (no shell: argv as is)


def _call(api: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(*split_host_port(api), timeout=10)
    try:
        payload = json.dumps(body) if body is not None else None
        conn.request(method, path, payload, {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
    except (OSError, http.client.HTTPException) as exc:
        fail(f"cannot reach the sidecar's API at {api}: {exc}")
    finally:
        conn.close()
    try:
        return response.status, json.loads(data)
    except ValueError:
        return response.status, data.decode(errors="replace")


def _set_backend(api: str, service: str, body: dict[str, Any], as_json: bool) -> None:
    status, doc = _call(api, "POST", f"/v1/backends/{service}", body)
    if status != 200:
        fail(
            f"sidecar refused: HTTP {status}: {doc.get('error') if isinstance(doc, dict) else doc}"
        )
    if as_json:
        print_json(doc)
    else:
        rows = [("tags", _tags(doc["tags"])), ("health", doc["health"])]
        stdout.print(table(f"backend {service}", rows))


@sidecar.command("tag")
@click.option("--service", required=True, help="A workload-owned backend of this CVM.")
@click.option("--role", help="Set the role tag (routes with a role select on it).")
@click.option("--no-role", is_flag=True, help="Remove the role tag.")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="Set a tag (repeatable).")
@click.option("--health", type=click.Choice(["passing", "warning", "critical"]))
@click.option("--json", "as_json", is_flag=True, help="Print the backend's state as JSON.")
@api_option
def tag(
    service: str,
    role: str | None,
    no_role: bool,
    tags: tuple[str, ...],
    health: str | None,
    as_json: bool,
    api: str,
) -> None:
    """Set a backend's role, tags or health in the catalog, through the local sidecar."""
    body: dict[str, Any] = {}
    if role is not None or no_role:
        body["role"] = None if no_role else role
    pairs = [t.partition("=") for t in tags]
    if any(not sep or not key for key, sep, _ in pairs):
        fail("--tag expects KEY=VALUE")
    if pairs:
        body["tags"] = {key: value for key, _, value in pairs}
    if health:
        body["health"] = health
    if not body:
        fail("nothing to set: give --role, --no-role, --tag or --health")
    _set_backend(api, service, body, as_json)


@sidecar.command("patroni-callback")
@click.option("--service", required=True, help="The backend Patroni serves (e.g. postgres).")
@api_option
@click.argument("action")
@click.argument("role")
@click.argument("scope", required=False)
def patroni_callback(service: str, api: str, action: str, role: str, scope: str | None) -> None:
    """Patroni's callback (on_start, on_role_change, ...): publish its ROLE as the role tag.

    In patroni.yml: ``callbacks: {on_role_change: "teemesh sidecar patroni-callback --service
    postgres"}``; Patroni appends ACTION ROLE SCOPE.
    """
    if action == "on_stop":
        _set_backend(api, service, {"role": None}, as_json=False)
        return
    mapped = PATRONI_ROLES.get(role)
    if mapped is None:
        stderr.print(f"patroni-callback: role {role!r} selects no route; the role tag is removed")
    _set_backend(api, service, {"role": mapped}, as_json=False)


@sidecar.command("status")
@click.option("--json", "as_json", is_flag=True)
@api_option
def status(as_json: bool, api: str) -> None:
    """What the local sidecar is doing: admission, routes and their instances, backends."""
    code, doc = _call(api, "GET", "/v1/status")
    if code != 200 or not isinstance(doc, dict):
        fail(f"sidecar: HTTP {code}: {doc}")
    if as_json:
        print_json(doc)
        return
    admission = doc["admission"]
    stdout.print(table(f"sidecar {doc['peer']}", [
        ("ready", "yes" if doc["ready"] else "no"),
        ("admission", admission["state"]),
        ("SVID", admission["spiffe_id"] or "-"),
        ("expires at", str(admission["expires_at"] or "-")),
        ("ingress", doc["ingress"]),
        ("open tunnels", f"{doc['tunnels']['egress']} out, {doc['tunnels']['ingress']} in"),
    ]))  # fmt: skip
    routes = [
        (r["name"], r["listen"], r["backend"], r["role"], ", ".join(r["instances"]) or "none")
        for r in doc["routes"]
    ]
    stdout.print(grid("routes", ("route", "listen", "backend", "role", "instances"), routes))
    backends = [
        (b["name"], b["port"], b["owner"], b["health"], _tags(b["tags"])) for b in doc["backends"]
    ]
    stdout.print(grid("backends", ("backend", "port", "owner", "health", "tags"), backends))


def _tags(tags: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in tags.items()) or "-"


@sidecar.command("exec", context_settings={"ignore_unknown_options": True})
@click.option(
    "--hosts-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=DEFAULT_STATE / "hosts",
    show_default=True,
    help="The sidecar's hosts file of route names.",
)
@click.option(
    "--mode",
    type=click.Choice(["auto", "namespace", "append"]),
    default="auto",
    show_default=True,
    help="namespace: a private /etc/hosts in a mount namespace (needs root); append: add the "
    "names to this container's own /etc/hosts; auto: namespace when root, else append.",
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(hosts_file: Path, mode: str, command: tuple[str, ...]) -> None:
    """Run COMMAND with the route names resolving (``teemesh sidecar exec -- psql -h db``)."""
    from teemesh.sidecar.hosts import route_block, write_hosts  # noqa: PLC0415

    routes = route_block(hosts_file.read_text())
    if shutil.which(command[0]) is None:
        fail(f"command not found: {command[0]}")
    if mode == "auto":
        mode = "namespace" if os.geteuid() == 0 and shutil.which("unshare") else "append"
    if mode == "append":
        try:
            write_hosts(Path("/etc/hosts"), routes)
        except OSError as exc:
            fail(f"cannot add route names to /etc/hosts ({exc}); run as root for --mode namespace")
        os.execvp(command[0], list(command))  # noqa: S606 (the user's own command)
    folder = Path(tempfile.mkdtemp(prefix="teemesh-exec-"))
    private = folder / "hosts"
    private.write_text(Path("/etc/hosts").read_text() if Path("/etc/hosts").exists() else "")
    write_hosts(private, routes)
    # the bind mount holds the file: its folder can go before the command runs
    script = 'mount --bind "$0" /etc/hosts && rm -rf "${0%/hosts}" && exec "$@"'
    argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script,
            str(private), *command]  # fmt: skip
    try:
        os.execvp(argv[0], argv)  # noqa: S606
    except OSError as exc:
        print(f"teemesh sidecar exec: cannot run unshare: {exc}", file=sys.stderr)
        sys.exit(1)
