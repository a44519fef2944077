"""Drive the installed ``teemesh`` console script: ``attest inspect`` and ``attest verify``.

Exit codes under test: inspect 0 = parsed and replayed, 1 = replay differs from the quote,
2 = unreadable input; verify 0 = accepted, 1 = rejected, 2 = bad input.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import dcap_qvl
import pytest
from conftest import vector_path
from procs import teemesh_exe

from teemesh.attest.dstack import KeyProvider
from teemesh.attest.simulated import OsImage, PlatformKey, SimulatedCvm

pytestmark = pytest.mark.integration

SIM_ATTESTATION = "dstack/simulator/attestation.bin"
SIM_QUOTE = "dstack/simulator/attestation.quote.bin"
QUOTE_REPORT = "dstack/verifier/quote-report.json"
DCAP_QUOTE = "dcap-qvl/tdx_quote"
DCAP_DIR = "dcap-qvl"
DCAP_NOW = "1751000000"
HEX48 = re.compile(r"[0-9a-f]{96}")
MIB = 1024 * 1024
LIUM = "LIUM_MINER_HOTKEY"


def run(*args: str | Path, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """The console script with stdin and a wide, colourless terminal (procs.run_teemesh has
    neither stdin nor the environment, and writes a log instead of returning text)."""
    env = {**os.environ, "COLUMNS": "400", "NO_COLOR": "1", "TERM": "dumb"}
    proc = subprocess.run(
        [teemesh_exe(), *map(str, args)],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        timeout=120,
        env=env,
        check=False,
    )
    return subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode()
    )


def flat(text: str) -> str:
    """Rich may wrap long lines; compare messages with whitespace collapsed."""
    return " ".join(text.split())


def assert_clean_error(proc: subprocess.CompletedProcess[str], *phrases: str) -> None:
    """Exit 2, nothing on stdout, one ``error:`` message naming the problem, no traceback."""
    message = flat(proc.stderr)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert message.startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for phrase in phrases:
        assert phrase in message, (phrase, message)


def inspect_json(path: str | Path, *, code: int = 0, stdin: bytes | None = None) -> dict[str, Any]:
    proc = run("attest", "inspect", path, "--json", stdin=stdin)
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


@functools.cache
def inspect_vector(relative: str) -> dict[str, Any]:
    """``inspect --json`` of an unmodified vector (cached: each run starts a process)."""
    return inspect_json(vector_path(relative))


def verify_json(*args: str | Path, code: int) -> dict[str, Any]:
    proc = run("attest", "verify", *args, "--json")
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


# --------------------------------------------------------------------------- inspect: shape

QUOTE_HEX_FIELDS = {
    "mrtd": 48,
    "rtmr0": 48,
    "rtmr1": 48,
    "rtmr2": 48,
    "rtmr3": 48,
    "report_data": 64,
    "mr_config_id": 48,
    "td_attributes": 8,
    "tee_tcb_svn": 16,
}
DSTACK_FIELDS = (
    "app_id",
    "compose_hash",
    "instance_id",
    "key_provider",
    "os_image_hash",
    "mr_system",
    "mr_aggregated",
)


def assert_shape(doc: dict[str, Any]) -> None:
    """The JSON shape the issue asks for: lowercase hex without 0x, and the three sections."""
    assert {"quote", "replay", "dstack"} <= doc.keys()
    quote = doc["quote"]
    for name, size in QUOTE_HEX_FIELDS.items():
        assert re.fullmatch(f"[0-9a-f]{{{2 * size}}}", quote[name]), (name, quote[name])
    replay = doc["replay"]
    if replay is not None:
        assert isinstance(replay["matches_quote"], bool)
        assert set(replay) - {"matches_quote"} <= {"rtmr0", "rtmr1", "rtmr2", "rtmr3"}
        assert "rtmr3" in replay
        for i in range(4):
            if f"rtmr{i}" in replay:
                assert HEX48.fullmatch(replay[f"rtmr{i}"])
    dstack = doc["dstack"]
    assert set(DSTACK_FIELDS) <= dstack.keys()
    for name in ("mr_system", "mr_aggregated"):
        assert re.fullmatch("[0-9a-f]{64}", dstack[name]), name
    for name, digits in (("app_id", 40), ("compose_hash", 64), ("os_image_hash", 64)):
        value = dstack[name]
        assert value is None or re.fullmatch(f"[0-9a-f]{{{digits}}}", value), (name, value)
    assert dstack["instance_id"] is None or re.fullmatch("[0-9a-f]+", dstack["instance_id"])
    provider = dstack["key_provider"]
    assert provider is None or (set(provider) == {"name", "id"}), provider


def assert_quote_fields(doc: dict[str, Any], want: dict[str, Any]) -> None:
    for name in QUOTE_HEX_FIELDS:
        assert doc["quote"][name] == want[name], name


def runtime_payloads(entry: dict[str, Any]) -> dict[str, str]:
    """First payload of each runtime event name, as dstack's identity rules read them."""
    out: dict[str, str] = {}
    for event in entry["runtime_events"]:
        out.setdefault(event["event"], event["payload_hex"])
    return out


def assert_dstack_identity(doc: dict[str, Any], entry: dict[str, Any]) -> None:
    payloads, derived, dstack = runtime_payloads(entry), entry["derived"], doc["dstack"]
    assert dstack["app_id"] == payloads["app-id"]
    assert dstack["compose_hash"] == payloads["compose-hash"]
    assert dstack["instance_id"] == payloads["instance-id"]
    assert dstack["key_provider"] == json.loads(derived["key_provider_info_utf8"])
    assert dstack["mr_system"] == derived["mr_system"]
    assert dstack["mr_aggregated"] == derived["mr_aggregated"]
    assert dstack["mr_system_boottime"] == derived["mr_system_boottime_variant"]
    assert dstack["mr_aggregated_boottime"] == derived["mr_aggregated_boottime"]


def test_inspect_attestation_bin(expected: dict[str, Any]) -> None:
    entry = expected["simulator/attestation.bin"]
    doc = inspect_vector(SIM_ATTESTATION)
    assert_shape(doc)
    assert doc["form"] == "attestation-v0"
    assert_quote_fields(doc, entry["quote"])
    want_replay = {f"rtmr{i}": entry["quote"][f"rtmr{i}"] for i in range(3)}
    want_replay |= {"rtmr3": entry["derived"]["rtmr3_replayed_full"], "matches_quote": True}
    assert doc["replay"] == want_replay
    assert_dstack_identity(doc, entry)
    assert doc["dstack"]["os_image_hash"] == runtime_payloads(entry)["os-image-hash"]
    assert doc["dstack"]["app_events"] == []


def test_inspect_get_quote_json(expected: dict[str, Any]) -> None:
    entry = expected["verifier/quote-report.json"]
    doc = inspect_vector(QUOTE_REPORT)
    assert_shape(doc)
    assert doc["form"] == "get-quote-json"
    assert_quote_fields(doc, entry["quote"])
    want_replay = {f"rtmr{i}": entry["quote"][f"rtmr{i}"] for i in range(3)}
    want_replay |= {"rtmr3": entry["derived"]["rtmr3_replayed_full"], "matches_quote": True}
    assert doc["replay"] == want_replay
    assert_dstack_identity(doc, entry)
    # This older guest measures no os-image-hash: the value comes from the (unmeasured) vm_config.
    vm_config = json.loads(json.loads(vector_path(QUOTE_REPORT).read_text())["vm_config"])
    assert doc["dstack"]["os_image_hash"] == vm_config["os_image_hash"]
    assert doc["dstack"]["os_image_hash_measured"] is False
    lium = [e for e in entry["runtime_events"] if e["event"] == LIUM]
    assert doc["dstack"]["app_events"] == [{"event": LIUM, "payload": lium[0]["payload_hex"]}]


def test_inspect_raw_quote(expected: dict[str, Any]) -> None:
    entry = expected["simulator/attestation.bin"]
    doc = inspect_vector(SIM_QUOTE)
    assert_shape(doc)
    assert doc["form"] == "quote"
    assert_quote_fields(doc, entry["quote"])
    assert doc["replay"] is None  # a bare quote has no event log to replay
    dstack = doc["dstack"]
    assert [dstack[k] for k in DSTACK_FIELDS[:5]] == [None] * 5
    # Without a key-provider event mr_system is the boot-time variant; mr_aggregated uses RTMR3.
    assert dstack["mr_system"] == entry["derived"]["mr_system_boottime_variant"]
    assert dstack["mr_aggregated"] == entry["derived"]["mr_aggregated"]


def test_inspect_dcap_quote_matches_dcap_qvl() -> None:
    """No expected.json entry: dcap-qvl's own parser is the independent reference."""
    data = vector_path(DCAP_QUOTE).read_bytes()
    report = dcap_qvl.parse_quote(data).report
    doc = inspect_vector(DCAP_QUOTE)
    assert_shape(doc)
    assert doc["form"] == "quote"
    assert doc["replay"] is None
    reference = {
        "mrtd": report.mr_td,
        "rtmr0": report.rt_mr0,
        "rtmr1": report.rt_mr1,
        "rtmr2": report.rt_mr2,
        "rtmr3": report.rt_mr3,
        "report_data": report.report_data,
        "mr_config_id": report.mr_config_id,
        "td_attributes": report.td_attributes,
        "tee_tcb_svn": report.tee_tcb_svn,
    }
    assert doc["quote"] == doc["quote"] | {k: bytes(v).hex() for k, v in reference.items()}
    mrs = report.mr_td + report.rt_mr0 + report.rt_mr1 + report.rt_mr2
    assert doc["dstack"]["mr_system"] == hashlib.sha256(mrs + bytes(32)).hexdigest()
    assert doc["dstack"]["mr_aggregated"] == hashlib.sha256(mrs + report.rt_mr3).hexdigest()


def test_inspect_human_output() -> None:
    proc = run("attest", "inspect", vector_path(QUOTE_REPORT))
    assert proc.returncode == 0, proc.stderr
    out = flat(proc.stdout)
    assert "quote (get-quote-json)" in out
    assert "matches_quote yes" in out
    assert f"app event {LIUM} =" in out


# --------------------------------------------------------------------------- inspect: replay


def quote_report_with(path: Path, edit: Any) -> Path:
    doc = json.loads(vector_path(QUOTE_REPORT).read_text())
    log = json.loads(doc["event_log"])
    for event in log:
        edit(event)
    doc["event_log"] = json.dumps(log)
    path.write_text(json.dumps(doc))
    return path


def test_inspect_replay_mismatch_exits_1(tmp_path: Path, expected: dict[str, Any]) -> None:
    def edit(event: dict[str, Any]) -> None:
        if event["event"] == LIUM:
            event["event_payload"] = b"a different hotkey".hex()
            event["digest"] = ""  # recomputed from the payload: the log is well-formed

    doc = inspect_json(quote_report_with(tmp_path / "edited.json", edit), code=1)
    assert_shape(doc)
    entry = expected["verifier/quote-report.json"]
    assert doc["replay"]["matches_quote"] is False
    assert doc["replay"]["rtmr3"] != entry["quote"]["rtmr3"]
    assert doc["quote"]["rtmr3"] == entry["quote"]["rtmr3"]
    assert all(doc["replay"][f"rtmr{i}"] == entry["quote"][f"rtmr{i}"] for i in range(3))
    assert doc["dstack"]["app_events"][0]["payload"] == b"a different hotkey".hex()

    human = run("attest", "inspect", tmp_path / "edited.json")
    assert human.returncode == 1
    assert "matches_quote NO" in flat(human.stdout)


def test_inspect_payload_that_contradicts_its_digest_exits_2(tmp_path: Path) -> None:
    def edit(event: dict[str, Any]) -> None:
        if event["event"] == LIUM:
            event["event_payload"] = b"a different hotkey".hex()  # digest kept: now a lie

    proc = run("attest", "inspect", quote_report_with(tmp_path / "lie.json", edit), "--json")
    assert_clean_error(proc, f"event_log({LIUM})", "does not match its payload")


# --------------------------------------------------------------------------- inspect: bad input


BAD_INPUTS: dict[str, tuple[bytes, tuple[str, ...]]] = {
    "garbage": (b"\x99\x13garbage\x00\xff", ("unrecognised evidence", "0x99")),
    "bad-hex": (b"04000200810000zz00\n", ("unrecognised evidence",)),
    "bad-hex-in-json": (b'{"quote": "0400zz"}', ("quote: not hex", "'z'")),
    "json-list": (b'[{"quote": "00"}]', ("unrecognised evidence", "GetQuote JSON")),
    "json-syntax": (b'{"quote": ', ("evidence: invalid JSON at line 1",)),
    "json-without-evidence": (b'{"hello": 1}', ('"quote"', "attestation")),
    "empty": (b"", ("input is empty",)),
    "whitespace": (b" \n\t\n", ("input is empty",)),
    "truncated-quote": (
        bytes.fromhex("0400020081000000"),
        ("quote.header.qe_svn at offset 8", "truncated"),
    ),
    "too-large": (b"\0" * (MIB + 1), (f"input larger than {MIB} bytes",)),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_inspect_bad_input_exits_2(tmp_path: Path, case: str) -> None:
    content, phrases = BAD_INPUTS[case]
    path = tmp_path / f"{case}.bin"
    path.write_bytes(content)
    assert_clean_error(run("attest", "inspect", path, "--json"), *phrases)


def test_inspect_missing_file_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "nope.bin"
    assert_clean_error(
        run("attest", "inspect", missing, "--json"), str(missing), "No such file or directory"
    )


def test_inspect_directory_exits_2(tmp_path: Path) -> None:
    assert_clean_error(run("attest", "inspect", tmp_path), str(tmp_path))


def test_inspect_size_limit_is_exactly_one_mib(tmp_path: Path) -> None:
    """1 MiB is read and parsed (and fails as an attestation); 1 MiB + 1 is refused unread."""
    path = tmp_path / "limit.bin"
    path.write_bytes(b"\0" * MIB)
    proc = run("attest", "inspect", path)
    assert_clean_error(proc, "attestation")
    assert "larger than" not in proc.stderr
    assert_clean_error(run("attest", "inspect", "-", stdin=b"\0" * (MIB + 1)), "larger than")


# --------------------------------------------------------------------------- inspect: input forms


def test_inspect_stdin_matches_file() -> None:
    data = vector_path(SIM_ATTESTATION).read_bytes()
    from_stdin = inspect_json("-", stdin=data)
    assert from_stdin == inspect_vector(SIM_ATTESTATION)
    assert from_stdin["replay"]["matches_quote"] is True


def test_inspect_hex_file_with_trailing_newline(tmp_path: Path) -> None:
    binary = inspect_vector(SIM_ATTESTATION)
    path = tmp_path / "attestation.hex"
    path.write_text(vector_path(SIM_ATTESTATION).read_bytes().hex() + "\n")
    doc = inspect_json(path)
    assert doc["form"] == "attestation-v0-hex"
    assert {k: doc[k] for k in ("quote", "replay", "dstack")} == {
        k: binary[k] for k in ("quote", "replay", "dstack")
    }


def test_inspect_hex_quote_with_prefix_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "quote.hex"
    path.write_bytes(b"0x" + vector_path(DCAP_QUOTE).read_bytes().hex().upper().encode() + b"\r\n")
    doc = inspect_json(path)
    assert doc["form"] == "quote-hex"
    assert doc["quote"] == inspect_vector(DCAP_QUOTE)["quote"]


def test_inspect_attestation_wrapped_in_json(tmp_path: Path) -> None:
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"attestation": vector_path(SIM_ATTESTATION).read_bytes().hex()}))
    doc = inspect_json(path)
    assert doc["form"] == "attestation-v0-json"
    assert doc["dstack"] == inspect_vector(SIM_ATTESTATION)["dstack"]


# --------------------------------------------------------------------------- verify: DCAP


def test_verify_dcap_quote_accepted() -> None:
    args = ("--collateral", vector_path(DCAP_DIR), "--now", DCAP_NOW)
    doc = verify_json(vector_path(DCAP_QUOTE), *args, code=0)
    assert doc == {
        "ok": True,
        "tee": "tdx",
        "tcb_status": "UpToDate",
        "advisory_ids": [],
        "reasons": [],
    }


def test_verify_dcap_collateral_as_single_file() -> None:
    collateral = vector_path(f"{DCAP_DIR}/tdx_quote_collateral.json")
    doc = verify_json(
        vector_path(DCAP_QUOTE), "--collateral", collateral, "--now", DCAP_NOW, code=0
    )
    assert doc["ok"] is True


def test_verify_tampered_quote_rejected(tmp_path: Path) -> None:
    data = bytearray(vector_path(DCAP_QUOTE).read_bytes())
    data[600] ^= 0x01  # inside the TD report: the QE's signature no longer covers it
    path = tmp_path / "tampered.bin"
    path.write_bytes(bytes(data))
    doc = verify_json(path, "--collateral", vector_path(DCAP_DIR), "--now", DCAP_NOW, code=1)
    assert doc["ok"] is False
    assert [r["code"] for r in doc["reasons"]] == ["QUOTE_INVALID"]
    assert "DCAP verification failed" in doc["reasons"][0]["message"]


def test_verify_expired_collateral_rejected() -> None:
    args = ("--collateral", vector_path(DCAP_DIR), "--now", "1800000000")
    doc = verify_json(vector_path(DCAP_QUOTE), *args, code=1)
    assert doc["ok"] is False
    assert doc["tcb_status"] is None
    assert [r["code"] for r in doc["reasons"]] == ["QUOTE_INVALID"]
    assert "expired" in doc["reasons"][0]["message"].lower()


def test_verify_tdx_quote_without_collateral_exits_2() -> None:
    proc = run("attest", "verify", vector_path(DCAP_QUOTE), "--now", DCAP_NOW, "--json")
    assert_clean_error(proc, "collateral", "needs collateral")


def test_verify_collateral_for_another_platform_exits_2() -> None:
    """quote-report.json's quote comes from FMSPC 90c06f000000; only b0c06f000000 is on file."""
    args = ("--collateral", vector_path(DCAP_DIR), "--now", DCAP_NOW, "--json")
    proc = run("attest", "verify", vector_path(QUOTE_REPORT), *args)
    assert_clean_error(proc, "no collateral for the quote's platform FMSPC 90c06f000000")


def test_verify_unreadable_evidence_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "garbage.bin"
    path.write_bytes(b"\x99 not evidence")
    proc = run("attest", "verify", path, "--collateral", vector_path(DCAP_DIR), "--json")
    assert_clean_error(proc, "unrecognised evidence")


# --------------------------------------------------------------------------- verify: simulated


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A simulated CVM's GetQuote reply, its platform key's PEM, and another platform's PEM."""
    folder = tmp_path_factory.mktemp("simulated")
    platform = PlatformKey.generate()
    cvm = SimulatedCvm(
        platform=platform, os_image=OsImage("teemesh-test-os"), app_compose=b'{"services": {}}'
    )
    evidence = folder / "evidence.json"
    evidence.write_text(json.dumps(cvm.get_quote_reply(b"integration nonce")))
    (folder / "platform.pem").write_bytes(platform.public_pem())
    (folder / "other.pem").write_bytes(PlatformKey.generate().public_pem())
    return {"folder": folder, "evidence": evidence, "compose_hash": cvm.compose_hash.hex()}


def write_policy(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_verify_simulated_with_matching_policy_accepted(simulated: dict[str, Any]) -> None:
    """Control for the refusals below: the right key and compose hash are accepted."""
    policy = write_policy(
        simulated["folder"],
        "ok.yaml",
        "tee: simulated\nplatform_key: platform.pem\n"
        f"compose_hashes: ['0x{simulated['compose_hash'].upper()}']\n",
    )
    doc = verify_json(simulated["evidence"], "--policy", policy, code=0)
    assert doc == {
        "ok": True,
        "tee": "simulated",
        "tcb_status": "UpToDate",
        "advisory_ids": [],
        "reasons": [],
    }


def test_verify_simulated_compose_hash_not_allowed(simulated: dict[str, Any]) -> None:
    policy = write_policy(
        simulated["folder"],
        "pinned.yaml",
        f"tee: simulated\nplatform_key: platform.pem\ncompose_hashes: ['{'ab' * 32}']\n",
    )
    doc = verify_json(simulated["evidence"], "--policy", policy, code=1)
    assert doc["ok"] is False
    assert doc["tcb_status"] == "UpToDate"  # the quote itself was fine
    assert [r["code"] for r in doc["reasons"]] == ["COMPOSE_HASH_NOT_ALLOWED"]
    assert simulated["compose_hash"] in doc["reasons"][0]["message"]


def test_verify_simulated_quote_refused_by_default_policy(simulated: dict[str, Any]) -> None:
    doc = verify_json(simulated["evidence"], code=1)
    assert doc["ok"] is False
    assert doc["tee"] == "tdx"
    assert [r["code"] for r in doc["reasons"]] == ["QUOTE_INVALID"]
    assert "simulated" in doc["reasons"][0]["message"]


def test_verify_simulated_quote_from_another_platform(simulated: dict[str, Any]) -> None:
    policy = write_policy(
        simulated["folder"], "other.yaml", "tee: simulated\nplatform_key: other.pem\n"
    )
    doc = verify_json(simulated["evidence"], "--policy", policy, code=1)
    assert doc["ok"] is False
    assert [r["code"] for r in doc["reasons"]] == ["QUOTE_INVALID"]
    assert "another platform key" in doc["reasons"][0]["message"]


def test_verify_policy_with_two_bad_fields_exits_2(simulated: dict[str, Any]) -> None:
    policy = write_policy(
        simulated["folder"],
        "bad.yaml",
        f"tee: sgx\ncompose_hashes: ['{'zz' * 32}']\n",
    )
    proc = run("attest", "verify", simulated["evidence"], "--policy", policy, "--json")
    assert_clean_error(proc, str(policy), "2 problem(s)", "tee:", "compose_hashes.0:")
    assert "not hex" in proc.stderr


def test_verify_policy_with_unreadable_platform_key_exits_2(simulated: dict[str, Any]) -> None:
    policy = write_policy(
        simulated["folder"], "nokey.yaml", "tee: simulated\nplatform_key: missing.pem\n"
    )
    proc = run("attest", "verify", simulated["evidence"], "--policy", policy, "--json")
    assert_clean_error(proc, "platform_key: cannot read", "missing.pem")


# --------------------------------------------------------------------------- regressions
# Each of these used to end in a Python traceback and exit 1 (which reads as "rejected").


def test_policy_platform_key_path_with_nul_byte_exits_2(simulated: dict[str, Any]) -> None:
    policy = write_policy(
        simulated["folder"], "nul.yaml", 'tee: simulated\nplatform_key: "a\\0b.pem"\n'
    )
    proc = run("attest", "verify", simulated["evidence"], "--policy", policy, "--json")
    assert_clean_error(proc, str(policy), "platform_key: cannot read")


def test_deeply_nested_policy_yaml_exits_2(tmp_path: Path) -> None:
    policy = write_policy(tmp_path, "deep.yaml", "[" * 5000)
    proc = run("attest", "verify", vector_path(DCAP_QUOTE), "--policy", policy, "--json")
    assert_clean_error(proc, str(policy), "nested too deeply")


def test_collateral_file_not_utf8_exits_2(tmp_path: Path) -> None:
    (tmp_path / "collateral.json").write_bytes(b"\xff\xfe not utf-8")
    args = ("--collateral", tmp_path, "--now", DCAP_NOW)
    proc = run("attest", "verify", vector_path(DCAP_QUOTE), *args)
    assert_clean_error(proc, str(tmp_path / "collateral.json"), "cannot read collateral")


# Rich console markup in text that comes from the input: a closing tag such as "[/x]" raised
# rich.errors.MarkupError (traceback, exit 1), and "[bold]" silently vanished from the text.


def test_error_message_keeps_brackets(tmp_path: Path) -> None:
    missing = tmp_path / "[/x]" / "a[bold]b.bin"
    assert_clean_error(run("attest", "inspect", missing), str(missing))


def test_human_inspect_keeps_brackets(tmp_path: Path) -> None:
    provider = json.dumps({"name": "[/x]", "id": "ab"}).encode()

    def edit(event: dict[str, Any]) -> None:
        if event["event"] == "key-provider":
            event["event_payload"] = provider.hex()
            event["digest"] = ""

    proc = run("attest", "inspect", quote_report_with(tmp_path / "kp.json", edit))
    assert proc.returncode == 1, proc.stderr  # the edit changes RTMR3: replay differs
    assert "[/x]" in proc.stdout


def _verify_with_key_provider(tmp_path: Path, name: str) -> subprocess.CompletedProcess[str]:
    """Verify a simulated quote whose measured key-provider name is ``name``."""
    platform = PlatformKey.generate()
    cvm = SimulatedCvm(
        platform=platform,
        os_image=OsImage("teemesh-test-os"),
        app_compose=b"{}",
        key_provider=KeyProvider(name, ""),
    )
    evidence = tmp_path / "evidence.json"
    evidence.write_text(json.dumps(cvm.get_quote_reply(b"n")))
    (tmp_path / "platform.pem").write_bytes(platform.public_pem())
    policy = write_policy(
        tmp_path,
        "kp.yaml",
        "tee: simulated\nplatform_key: platform.pem\nkey_providers: [{name: kms}]\n",
    )
    return run("attest", "verify", evidence, "--policy", policy)


def test_human_verify_keeps_brackets(tmp_path: Path) -> None:
    proc = _verify_with_key_provider(tmp_path, "[/x]")
    assert proc.returncode == 1, proc.stderr
    assert "KEY_PROVIDER_NOT_ALLOWED" in proc.stdout
    assert "key provider [/x]" in proc.stdout


@pytest.mark.parametrize("now", ["-1", str(2**64)])
def test_verify_now_out_of_range_exits_2(now: str) -> None:
    """Was: dcap_qvl.verify's OverflowError escaped (traceback, exit 1)."""
    proc = run(
        "attest",
        "verify",
        vector_path(DCAP_QUOTE),
        "--collateral",
        vector_path(DCAP_DIR),
        f"--now={now}",
    )
    # Either teemesh's own error or click's usage error (e.g. an IntRange) would do.
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "now" in proc.stderr.lower()


def test_deeply_nested_collateral_json_exits_2(tmp_path: Path) -> None:
    """Was: RecursionError from json.loads in _read_collateral (traceback, exit 1)."""
    (tmp_path / "collateral.json").write_text("[" * 100_000)
    args = ("--collateral", tmp_path, "--now", DCAP_NOW)
    proc = run("attest", "verify", vector_path(DCAP_QUOTE), *args)
    assert_clean_error(proc, str(tmp_path / "collateral.json"), "nested too deeply")


def test_dangling_symlink_in_collateral_folder(tmp_path: Path) -> None:
    """Was: FileNotFoundError from file.stat() in _read_collateral (traceback, exit 1)."""
    (tmp_path / "a.json").symlink_to(tmp_path / "gone.json")
    (tmp_path / "b.json").write_bytes(
        vector_path(f"{DCAP_DIR}/tdx_quote_collateral.json").read_bytes()
    )
    args = ("--collateral", tmp_path, "--now", DCAP_NOW, "--json")
    proc = run("attest", "verify", vector_path(DCAP_QUOTE), *args)
    # Skipping the broken entry (exit 0) or refusing it by name (exit 2) would both be fine.
    assert "Traceback" not in proc.stderr
    assert proc.returncode in (0, 2), proc.stderr
    if proc.returncode == 2:
        assert "a.json" in proc.stderr


def test_key_provider_name_with_lone_surrogate_exits_2(tmp_path: Path) -> None:
    """Was: accepted, then the human output crashed writing it (UnicodeEncodeError, exit 1)."""
    proc = _verify_with_key_provider(tmp_path, "\ud800")
    assert_clean_error(proc, "event_log(key-provider)", "surrogate")
