"""``teemesh attest``: inspect and verify attestation evidence."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from teemesh.attest.dcap import CollateralStore
from teemesh.attest.evidence import MAX_EVIDENCE_LEN, Analysis, analyze, load_evidence
from teemesh.attest.policy import Policy, load_policy
from teemesh.attest.verify import verify_evidence
from teemesh.cli._output import fail, print_json, read_input, stdout, table
from teemesh.errors import InputError


@click.group()
def attest() -> None:
    """Inspect and verify TDX / dstack attestation evidence."""


@attest.command()
@click.argument("file")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def inspect(file: str, as_json: bool) -> None:
    """Print parsed evidence from FILE (quote, GetQuote JSON or attestation; - for stdin).

    Exit 0 when parsed and the event log replays to the quote, 1 when it does not, 2 on bad input.
    """
    try:
        analysis = analyze(load_evidence(read_input(file, limit=MAX_EVIDENCE_LEN)))
        doc = analysis.to_json()
    except InputError as exc:
        fail(exc)
    if as_json:
        print_json(doc)
    else:
        _show(analysis, doc)
    sys.exit(1 if analysis.replay_matches is False else 0)


def _show(analysis: Analysis, doc: dict[str, object]) -> None:
    quote = doc["quote"]
    assert isinstance(quote, dict)
    stdout.print(table(f"quote ({analysis.evidence.form})", quote.items()))
    replay = analysis.replay
    if replay is None:
        stdout.print("\n[bold]replay[/]: no event log in this evidence")
    else:
        quoted = analysis.evidence.quote.report.rtmrs
        rows = [
            (f"rtmr{i}", f"{replay.rtmrs[i].hex()}  {'✓' if replay.rtmrs[i] == quoted[i] else '✗'}")
            for i in replay.covered
        ]
        rows.append(("matches_quote", "yes" if analysis.replay_matches else "NO"))
        stdout.print()
        stdout.print(table("event log replay", rows))
    dstack = doc["dstack"]
    assert isinstance(dstack, dict)
    rows2 = [(k, v) for k, v in dstack.items() if k != "app_events"]
    for event in dstack["app_events"]:
        rows2.append(("app event", f"{event['event']} = {event['payload']}"))
    stdout.print()
    stdout.print(table("dstack identity", rows2))


@attest.command()
@click.argument("file")
@click.option(
    "--collateral",
    type=click.Path(exists=True, path_type=Path),
    help="DCAP collateral: a JSON file or a folder of them (one per FMSPC).",
)
@click.option(
    "--now", type=click.IntRange(0, 2**63 - 1), help="Verify as of this UNIX time (default: now)."
)
@click.option(
    "--policy",
    "policy_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Policy YAML (default: tee tdx, TCB UpToDate only, nothing else pinned).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def verify(
    file: str, collateral: Path | None, now: int | None, policy_file: Path | None, as_json: bool
) -> None:
    """Verify evidence against a policy. Exit 0 accepted, 1 rejected, 2 bad input."""
    try:
        policy = load_policy(policy_file) if policy_file else Policy()
        store = CollateralStore.open(collateral) if collateral else None
        evidence = load_evidence(read_input(file, limit=MAX_EVIDENCE_LEN))
        verdict = verify_evidence(
            evidence, policy, collateral=store, now=int(time.time()) if now is None else now
        )
    except InputError as exc:
        fail(exc)
    if as_json:
        print_json(verdict.to_json())
    else:
        from rich.text import Text  # noqa: PLC0415

        status = Text("accepted", "bold green") if verdict.ok else Text("rejected", "bold red")
        stdout.print(
            table(
                "verdict",
                [
                    ("result", status),
                    ("tee", verdict.tee),
                    ("tcb_status", verdict.tcb_status),
                    ("advisory_ids", ", ".join(verdict.advisory_ids) or "none"),
                ],
            )
        )
        for reason in verdict.reasons:
            stdout.print(Text("  ") + Text(reason.code.value, "red") + Text(f": {reason.message}"))
    sys.exit(0 if verdict.ok else 1)
