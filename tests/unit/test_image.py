"""Static checks of the teemesh image's recipe: the Dockerfile and requirements/image.lock.

No Docker engine is needed: these read the files. They hold the image to what makes it
reproducible and to what CI tested (the lock's versions are the test environment's).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
LOCK = ROOT / "requirements" / "image.lock"
LOCK_IN_REPO = "requirements/image.lock"
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}$")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)$")
VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")

Instruction = tuple[str, str]  # (keyword in upper case, its arguments)


def instructions(text: str) -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined and comments dropped."""
    result: list[Instruction] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # a comment, also between continuation lines (as Docker reads it)
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, args = current.partition(" ")
        result.append((keyword.upper(), args.strip()))
        current = ""
    assert not current, "the Dockerfile ends inside a continued instruction"
    return result


def global_args(parsed: list[Instruction]) -> dict[str, str]:
    """The defaults of the ARGs before the first FROM (the only ones FROM can use)."""
    defaults: dict[str, str] = {}
    for keyword, args in parsed:
        if keyword == "FROM":
            break
        if keyword == "ARG":
            name, _, value = args.partition("=")
            defaults[name.strip()] = value.strip().strip('"')
    return defaults


def from_images(parsed: list[Instruction]) -> list[str]:
    """Each FROM's image reference, its ARGs replaced by their defaults."""
    defaults = global_args(parsed)
    stages: set[str] = set()
    images = []
    for keyword, args in parsed:
        if keyword != "FROM":
            continue
        words = [w for w in args.split() if not w.startswith("--platform")]
        image = VARIABLE.sub(lambda m: defaults.get(m[1] or m[2], ""), words[0])
        if len(words) == 3 and words[1].upper() == "AS":
            stages.add(words[2].lower())
        if image.lower() not in stages:  # FROM an earlier stage is no base image
            images.append(image)
    return images


def final_stage(parsed: list[Instruction]) -> list[Instruction]:
    """The instructions of the last stage: the image that ships."""
    starts = [i for i, (keyword, _) in enumerate(parsed) if keyword == "FROM"]
    assert starts, "the Dockerfile has no FROM"
    return parsed[starts[-1] :]


def pip_installs(parsed: list[Instruction]) -> list[list[str]]:
    """The arguments of every `pip install` that a RUN makes, one list per command."""
    commands = []
    for keyword, args in parsed:
        if keyword != "RUN":
            continue
        for command in re.split(r"&&|;|\|\|", args):
            if "pip" not in command:
                continue
            words = shlex.split(command)
            for i in range(len(words) - 1):
                if words[i].endswith("pip") and words[i + 1] == "install":
                    commands.append(words[i + 2 :])
                    break
    return commands


def lock_pins(text: str) -> dict[str, tuple[str, list[str]]]:
    """The lock's pins: normalized name -> (version, hashes). Fails on anything but `==`."""
    pins: dict[str, tuple[str, list[str]]] = {}
    entry = ""
    for raw in [*text.splitlines(), ""]:
        line = raw.split("#", 1)[0].strip()  # pip-compile's comments: "# via ..."
        if line.endswith("\\"):
            entry += line[:-1] + " "
            continue
        entry += line
        if entry.strip():
            requirement, *options = entry.split()
            match = PIN.match(requirement)
            assert match, f"the lock pins {requirement!r} without an exact == version"
            hashes = [o for o in options if HASH.match(o)]
            assert hashes, f"the lock has no --hash=sha256: for {requirement}"
            assert len(hashes) == len(options), f"unexpected options for {requirement}: {options}"
            name = canonicalize_name(match[1])
            assert name not in pins, f"{name} is locked twice"
            pins[name] = (match[2], hashes)
        entry = ""
    return pins


def pyproject() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def requirement_names(key: str) -> set[str]:
    """Normalized (PEP 503) names of a list of requirements in pyproject ("a.b")."""
    section, field = key.split(".")
    table = pyproject()[section]
    assert isinstance(table, dict)
    return {canonicalize_name(Requirement(r).name) for r in table[field]}


@pytest.fixture(scope="module")
def parsed() -> list[Instruction]:
    return instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def pins() -> dict[str, tuple[str, list[str]]]:
    return lock_pins(LOCK.read_text())


# ---------------------------------------------------------------------------------------------
# the Dockerfile


def test_every_from_is_pinned_by_digest(parsed: list[Instruction]) -> None:
    images = from_images(parsed)
    assert images, "the Dockerfile has no FROM"
    for image in images:
        assert DIGEST.search(image), f"FROM {image!r} is not pinned by @sha256:<64 hex>"


def test_a_base_image_override_must_carry_a_digest(parsed: list[Instruction]) -> None:
    """If FROM takes its image from an ARG, a build step refuses a value without a digest."""
    for keyword, args in parsed:
        if keyword != "FROM" or not (used := VARIABLE.search(args)):
            continue
        name = used[1] or used[2]
        checks = [a for k, a in parsed if k == "RUN" and name in a and "@sha256:" in a]
        assert checks, f"nothing refuses a {name} that is not pinned by digest"


@pytest.mark.parametrize(
    ("dockerfile", "pinned"),
    [
        ("FROM python:3.11-slim\n", False),
        ("FROM python@sha256:abc\n", False),
        ("ARG B=python:3.11\nFROM ${B}\n", False),
        ("ARG B=python:3.11@sha256:" + "a" * 64 + "\nFROM ${B} AS base\nFROM base\n", True),
        ("FROM --platform=linux/amd64 python:3.11@sha256:" + "0" * 64 + "\n", True),
    ],
)
def test_the_digest_check_can_fail(dockerfile: str, pinned: bool) -> None:
    images = from_images(instructions(dockerfile))
    assert all(DIGEST.search(image) for image in images) is pinned


def test_pip_installs_only_the_hashed_lock_and_the_project(parsed: list[Instruction]) -> None:
    installs = pip_installs(parsed)
    assert installs, "the Dockerfile never runs pip install"
    locked = 0
    for words in installs:
        assert "--no-deps" in words, f"pip install without --no-deps: {words}"
        assert "--no-cache-dir" in words, f"pip install leaves its cache in a layer: {words}"
        if "-r" in words:
            assert "--require-hashes" in words, f"pip install -r without --require-hashes: {words}"
            assert "--only-binary=:all:" in words, f"the lock may be built from sdists: {words}"
            locked += 1
        else:  # the project itself, from the build context, with the locked build backend
            targets = [w for w in words if not w.startswith("-")]
            assert targets and all(t.startswith(("/", ".")) for t in targets), words
            assert "--no-build-isolation" in words, f"an unpinned build backend: {words}"
    assert locked == 1, "the lock is not installed exactly once"
    runs = [a for k, a in parsed if k == "RUN" and "--require-hashes" in a]
    assert all(LOCK_IN_REPO in run for run in runs), f"pip does not read {LOCK_IN_REPO}"


def test_entrypoint_is_teemesh(parsed: list[Instruction]) -> None:
    entrypoints = [json.loads(a) for k, a in final_stage(parsed) if k == "ENTRYPOINT"]
    assert entrypoints, "no ENTRYPOINT (exec form)"
    assert entrypoints[-1] == ["teemesh"]


def test_runs_as_non_root(parsed: list[Instruction]) -> None:
    users = [a for k, a in final_stage(parsed) if k == "USER"]
    assert users, "no USER: the image would run as root"
    user, _, group = users[-1].partition(":")
    assert user not in {"root", "0"}, f"USER {users[-1]}"
    assert group not in {"root", "0"}, f"USER {users[-1]}"


def test_builds_leave_no_timestamps_or_upgrades(parsed: list[Instruction]) -> None:
    stage = final_stage(parsed)
    assert any(k == "ARG" and a.split("=")[0] == "SOURCE_DATE_EPOCH" for k, a in stage)
    env = " ".join(a for k, a in stage if k == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    runs = [a for k, a in stage if k == "RUN"]
    assert not any(re.search(r"apt(-get)? (dist-|full-)?upgrade", run) for run in runs)
    for run in runs:
        if "apt-get install" in run:
            assert "/var/lib/apt/lists/*" in run, "apt lists left in a layer"
            packages = [
                w
                for w in shlex.split(run.split("apt-get install", 1)[1].split(";")[0])
                if not w.startswith("-")
            ]
            assert packages
            assert all("=" in p for p in packages), f"apt packages not pinned: {packages}"


def test_labels_name_the_source_and_the_version(parsed: list[Instruction]) -> None:
    labels = " ".join(a for k, a in parsed if k == "LABEL")
    assert "org.opencontainers.image.source=" in labels
    project = pyproject()["project"]
    assert isinstance(project, dict)
    assert f'org.opencontainers.image.version="{project["version"]}"' in labels


def test_etcd_is_the_version_ci_runs(parsed: list[Instruction]) -> None:
    """The image's etcd-server is the Debian version the store tests ran."""
    pinned = global_args(parsed) | {
        a.split("=")[0]: a.split("=", 1)[1] for k, a in parsed if k == "ARG" and "=" in a
    }
    version = pinned.get("ETCD_SERVER_VERSION")
    assert version, "no ETCD_SERVER_VERSION"
    if shutil.which("dpkg-query") is None:
        pytest.fail("not Debian: the tests run on Debian 12 (scripts/test)")
    found = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", "etcd-server"],
        capture_output=True,
        text=True,
        check=False,
    )
    if found.returncode != 0 or not found.stdout:
        pytest.fail("etcd-server is not installed (apt-get install etcd-server; scripts/test does)")
    assert found.stdout == version, "the image's etcd-server differs from the tested one"


# ---------------------------------------------------------------------------------------------
# the lock


def test_every_pin_is_exact_and_hashed(pins: dict[str, tuple[str, list[str]]]) -> None:
    assert pins, "the lock pins nothing"


@pytest.mark.parametrize(
    "lock",
    [
        "click>=8.1 \\\n    --hash=sha256:" + "a" * 64 + "\n",
        "click==8.1.0\n",
        "click==8.1.0 \\\n    --hash=sha256:abc\n",
        "click==8.1.0 \\\n    --hash=md5:" + "a" * 32 + "\n",
    ],
)
def test_the_lock_check_can_fail(lock: str) -> None:
    with pytest.raises(AssertionError):
        lock_pins(lock)


def test_the_lock_check_reads_comments_and_continuations() -> None:
    text = "# header\nClick_X==8.1.0 \\\n    --hash=sha256:" + "b" * 64 + "\n    # via x\n"
    assert lock_pins(text) == {"click-x": ("8.1.0", ["--hash=sha256:" + "b" * 64])}


def test_lock_covers_every_runtime_dependency(pins: dict[str, tuple[str, list[str]]]) -> None:
    missing = requirement_names("project.dependencies") - pins.keys()
    assert not missing, f"runtime dependencies not in {LOCK_IN_REPO}: {sorted(missing)}"


def test_lock_pins_the_build_backend(pins: dict[str, tuple[str, list[str]]]) -> None:
    build = pyproject()["build-system"]
    assert isinstance(build, dict)
    for spec in build["requires"]:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"the build backend {name} is not locked"
        assert requirement.specifier.contains(pins[name][0]), f"{name}=={pins[name][0]}: {spec}"


def test_lock_matches_the_tested_environment(pins: dict[str, tuple[str, list[str]]]) -> None:
    """The image runs what CI tested: every locked runtime package at the installed version
    (the build backend aside: it builds the image's wheel, the test environment's is its own)."""
    build_only = requirement_names("build-system.requires")
    differ = []
    for name, (version, _) in sorted(pins.items()):
        if name in build_only:
            continue
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            differ.append(f"{name}=={version} (not installed)")
            continue
        if Version(installed) != Version(version):
            differ.append(f"{name}=={version} (installed {installed})")
    assert not differ, (
        f"{LOCK_IN_REPO} differs from the test environment; regenerate it "
        f"(requirements/README.md): {differ}"
    )
