"""``teemesh up / status / logs / exec / kill / restart / pause / resume / partition / heal /
down``: a whole cluster on this machine, one network namespace per CVM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import click

from teemesh.cli._output import fail, grid, print_json, stderr, stdout
from teemesh.config import ConfigError
from teemesh.errors import MeshError, Refused

if TYPE_CHECKING:
    from teemesh.platform.local import NotReady

F = TypeVar("F", bound=Callable[..., Any])
EXIT_NOT_READY = 3
EXIT_REFUSED = 4


def _state_option(func: F) -> F:
    return click.option(
        "--state",
        "state_dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="TEEMESH_STATE",
        help="The cluster's state dir (default: the only cluster under .teemesh/).",
    )(func)


def _clusters() -> list[Path]:
    """State dirs under ``.teemesh/`` holding a cluster, or what a crashed ``up`` left."""
    marks = (*Path(".teemesh").glob("*/launch.json"), *Path(".teemesh").glob("*/network.json"))
    return sorted({p.parent for p in marks})


def _resolve_state(state_dir: Path | None) -> Path:
    """An explicit state dir, or the one cluster ``up`` recorded under ``.teemesh/``."""
    if state_dir is not None:
        return state_dir
    found = _clusters()
    if len(found) == 1:
        return found[0]
    if not found:
        fail("no cluster under .teemesh/: name its state dir with --state")
    fail(f"several clusters under .teemesh/ ({', '.join(map(str, found))}): choose with --state")


def _errors(func: F) -> F:
    """MeshError -> a message and an exit code, never a traceback."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except Refused as exc:
            fail(exc, EXIT_REFUSED)
        except MeshError as exc:
            fail(exc)

    return cast("F", wrapper)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


@click.command("up")
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False, path_type=Path))
@_state_option
@click.option("--json", "as_json", is_flag=True, help="Print the ready cluster as JSON.")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for ready.")
@click.option(
    "--keep-on-failure", is_flag=True, help="Leave what was made when starting fails midway."
)
@click.option(
    "--rendered",
    "rendered",
    type=click.Path(file_okay=False, path_type=Path),
    help="Run what `teemesh render SPEC --out DIR` wrote: each app's CVMs are measured by "
    "DIR/<app>/app-compose.json, the coordinators admit by DIR/cluster-policy.json.",
)
def up(
    spec_path: Path,
    state_dir: Path | None,
    as_json: bool,
    timeout: float,
    keep_on_failure: bool,
    rendered: Path | None,
) -> None:
    """Bring up the cluster SPEC: a network namespace per CVM, its agent, sidecar and command.

    Returns once every CVM is admitted and every backend healthy; otherwise says which CVM is
    not ready and why, and leaves the cluster up for `teemesh status` and `teemesh logs`.
    With --rendered DIR, the CVMs run the very files render wrote for upload (the KMS, the
    sidecars' configurations and pins still come from SPEC)."""
    from teemesh.platform import local  # noqa: PLC0415

    state = state_dir or local.default_state_dir(spec_path)
    started = time.monotonic()

    def progress(line: str) -> None:
        stderr.print(f"[dim]{time.monotonic() - started:5.1f}s[/dim] {line}")

    def warn(line: str) -> None:
        from rich.text import Text  # noqa: PLC0415

        stderr.print(Text("warning: ", style="bold yellow") + Text(line))  # paths, not markup

    # SIGTERM midway tears down what was made, as Ctrl-C does (up catches any exception)
    previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        with stderr.status(f"bringing up {spec_path}"):
            record = local.up(
                spec_path,
                state,
                progress=progress,
                timeout=timeout,
                keep_on_failure=keep_on_failure,
                rendered=rendered,
                warn=warn,
            )
    except ConfigError as exc:
        fail(f"{exc.source}: {len(exc.problems)} problem(s):\n" + _listing(exc.problems))
    except Refused as exc:
        fail(exc, EXIT_REFUSED)
    except MeshError as exc:
        if _is_not_ready(exc):
            _not_ready(cast("NotReady", exc), state)
        fail(exc)
    finally:
        signal.signal(signal.SIGTERM, previous)
    elapsed = time.monotonic() - started
    if as_json:
        print_json({"cluster": record.cluster, "state": str(state), "seconds": round(elapsed, 2),
                    "cvms": [c.name for c in record.cvms],
                    "public": list(record.public)})  # fmt: skip
        return
    stderr.print(
        f"[green]ready[/green]: cluster {record.cluster}, {len(record.cvms)} CVMs, "
        f"in {elapsed:.1f} s (state {state})"
    )
    _public(list(record.public), state.absolute() / "gateway-ca.pem")


def _public(urls: list[str], ca: Path) -> None:
    """The gateway's URLs, and how to trust its local CA."""
    if not urls:
        return
    stdout.print(f"public through the gateway (its certificate is signed by the local CA {ca}):")
    for url in urls:
        stdout.print(f"  curl --cacert {ca} {url}")


def _listing(problems: list[str]) -> str:
    return "\n".join(f"  - {p}" for p in problems)


def _is_not_ready(exc: MeshError) -> bool:
    from teemesh.platform.local import NotReady  # noqa: PLC0415

    return isinstance(exc, NotReady)


def _not_ready(exc: NotReady, state: Path) -> None:
    stderr.print(f"[bold red]error:[/bold red] {exc}")
    stderr.print(f"the cluster is left up: `teemesh status --state {state}`, then `teemesh down`")
    sys.exit(EXIT_NOT_READY)


@click.command("status")
@_state_option
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@_errors
def status(state_dir: Path | None, as_json: bool) -> None:
    """Each CVM: processes, admission and certificate expiry, routes, backend health."""
    from teemesh.platform import local  # noqa: PLC0415

    doc = local.status(_resolve_state(state_dir))
    if as_json:
        print_json(doc)
        return
    rows = [_status_row(cvm) for cvm in doc["cvms"]]
    columns = ("CVM", "role", "address", "processes", "admission", "routes", "backends")
    stdout.print(grid(f"cluster {doc['cluster']}", columns, rows))
    _public(doc["public"], Path(doc["gateway_ca"] or "gateway-ca.pem"))
    if doc["partitions"]:
        stdout.print("partitions: " + ", ".join(" / ".join(p) for p in doc["partitions"]))


def _processes(states: dict[str, str]) -> str:
    """``3 running``, or each process that is not running by name."""
    if not states:
        return "none"
    odd = [f"{name} {state}" for name, state in states.items() if state != "running"]
    running = len(states) - len(odd)
    return ", ".join(([f"{running} running"] if running else []) + odd)


def _status_row(cvm: dict[str, Any]) -> tuple[str, ...]:
    processes = _processes(cvm["processes"])
    if "sidecar" not in cvm:
        return (cvm["name"], cvm["role"], cvm["address"], processes, "", "", "")
    sidecar = cvm["sidecar"]
    if sidecar is None:
        return (cvm["name"], cvm["role"], cvm["address"], processes,
                f"no answer ({cvm['sidecar_error']})", "", "")  # fmt: skip
    admission = sidecar["admission"]
    expiry = admission.get("expires_at")
    left = f" ({int(expiry - time.time()) // 60} min)" if expiry else ""
    error = f" ({admission['last_error']})" if admission.get("last_error") else ""
    routes = ", ".join(f"{r['name']}: {len(r['instances'])}" for r in sidecar["routes"])
    backends = ", ".join(f"{b['name']} {b['health']}" for b in sidecar["backends"])
    return (cvm["name"], cvm["role"], cvm["address"], processes,
            f"{admission['state']}{left}{error}", routes, backends)  # fmt: skip


@click.command("logs")
@click.argument("cvm")
@_state_option
@click.option("--process", "process", help="One process: agent, sidecar, app, coordinator, kms.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing as the logs grow.")
@_errors
def logs(cvm: str, state_dir: Path | None, process: str | None, follow: bool) -> None:
    """Print the logs of a CVM's processes."""
    from teemesh.platform import local  # noqa: PLC0415

    files = [p for p in local.log_files(_resolve_state(state_dir), cvm, process) if p.exists()]
    if follow:
        os.execvp("tail", ["tail", "-n", "+1", "-F", *map(str, files)])  # noqa: S606
    for path in files:
        if len(files) > 1:
            click.echo(f"==> {path.stem} <==")
        click.echo(path.read_text(errors="replace"), nl=False)


@click.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("cvm")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@_state_option
@_errors
def exec_(cvm: str, argv: tuple[str, ...], state_dir: Path | None) -> None:
    """Run a command inside a CVM, with its /etc/hosts (route names resolve); its exit code is
    this command's."""
    from teemesh.platform import local  # noqa: PLC0415

    command = local.exec_argv(_resolve_state(state_dir), cvm, list(argv))
    sys.exit(subprocess.call(command))


def _cvm_command(name: str, doc: str, action: Callable[[Path, str], object], done: str) -> None:
    @click.command(name, help=doc)
    @click.argument("cvm")
    @_state_option
    @_errors
    def command(cvm: str, state_dir: Path | None) -> None:
        state = _resolve_state(state_dir)
        from teemesh.platform import local  # noqa: PLC0415

        local.load_launch(state).cvm(cvm)  # an unknown name lists the valid ones
        action(state, cvm)
        stderr.print(f"{cvm}: {done}")

    COMMANDS.append(command)


COMMANDS: list[click.Command] = []


def _kill(state: Path, cvm: str) -> None:
    from teemesh.platform import vmm  # noqa: PLC0415

    vmm.kill(state, cvm)


def _crash(state: Path, cvm: str) -> None:
    from teemesh.platform import vmm  # noqa: PLC0415

    vmm.kill(state, cvm, hard=True)


def _restart(state: Path, cvm: str) -> None:
    from teemesh.platform import local  # noqa: PLC0415

    local.restart(state, cvm)


def _pause(state: Path, cvm: str) -> None:
    from teemesh.platform import vmm  # noqa: PLC0415

    vmm.pause(state, cvm)


def _resume(state: Path, cvm: str) -> None:
    from teemesh.platform import vmm  # noqa: PLC0415

    vmm.resume(state, cvm)


_cvm_command("kill", "Stop every process of a CVM (SIGTERM, then SIGKILL).", _kill, "killed")
_cvm_command(
    "crash", "Power a CVM off: SIGKILL to every process, none cleans up.", _crash, "crashed"
)
_cvm_command("restart", "Kill a CVM's processes and start them again.", _restart, "restarted")
_cvm_command("pause", "Freeze every process of a CVM (SIGSTOP).", _pause, "paused")
_cvm_command("resume", "Let a paused CVM run again (SIGCONT).", _resume, "resumed")


@click.command("partition")
@click.argument("a")
@click.argument("b")
@_state_option
@_errors
def partition(a: str, b: str, state_dir: Path | None) -> None:
    """Cut the network between CVMs A and B, both ways."""
    from teemesh.platform import netns  # noqa: PLC0415

    state = _known_pair(state_dir, a, b)
    netns.partition(state, a, b)
    stderr.print(f"partitioned {a} / {b}")


def _known_pair(state_dir: Path | None, a: str, b: str) -> Path:
    """The cluster's state dir, once both CVM names are known to it (else a clear error)."""
    from teemesh.platform import local  # noqa: PLC0415

    state = _resolve_state(state_dir)
    record = local.load_launch(state)
    record.cvm(a)
    record.cvm(b)
    return state


@click.command("heal")
@click.argument("a", required=False)
@click.argument("b", required=False)
@_state_option
@_errors
def heal(a: str | None, b: str | None, state_dir: Path | None) -> None:
    """Undo the partition of A and B, or with no CVMs every partition."""
    from teemesh.platform import netns  # noqa: PLC0415

    state = _resolve_state(state_dir)
    if a is None:
        netns.heal_all(state)
        stderr.print("healed every partition")
        return
    if b is None:
        raise click.UsageError("heal takes two CVMs, or none for every partition")
    _known_pair(state, a, b)
    netns.heal(state, a, b)
    stderr.print(f"healed {a} / {b}")


@click.command("down")
@_state_option
@_errors
def down(state_dir: Path | None) -> None:
    """Remove everything `up` made: processes, namespaces, links, mounts (safe to repeat)."""
    from teemesh.platform import local  # noqa: PLC0415

    if state_dir is None and not _clusters():
        stderr.print("nothing to remove: no cluster under .teemesh/")
        return
    state = _resolve_state(state_dir)
    if local.down(state):
        stderr.print(f"removed the cluster in {state}")
    else:
        stderr.print(f"nothing to remove in {state}")


COMMANDS += [up, status, logs, exec_, partition, heal, down]
