"""Fuzz ``teemesh render`` with hostile compose files: whatever the text, rendering gives files
or an InputError naming the compose file, and what it accepts is a compose every container of
which runs in the CVM's network, with the route names."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml
from fuzzkit import TEXT, input_error_only
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from teemesh.spec import parse_spec, plan_cluster
from teemesh.spec.deploy import render
from teemesh.spec.goyaml import dump_compose_yaml, load_compose_yaml
from teemesh.spec.user_compose import MAX_DEPTH

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SPEC: dict[str, Any] = {
    "cluster": "fuzz",
    "tee": "simulated",
    "workload_groups": {
        "db": {"compose": "compose.yaml", "backends": {"db": {"port": 5432}},
               "routes": {"db": {"backend": "db"}}},
    },
}  # fmt: skip
KEYS = ("image", "build", "ports", "networks", "network_mode", "extra_hosts", "depends_on",
        "command", "environment", "volumes", "x-any", "extends", "volumes_from")  # fmt: skip
VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-2, 70000)
    | TEXT
    | st.sampled_from(("host", "bridge", "nginx@sha256:" + "a" * 64, "$X", "${Y:?}", "$$",
                       "teemesh-state:/k", "teemesh-sidecar", "container:x", "on", "0755")),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=12,
)  # fmt: skip
DEEP = st.builds(
    lambda depth, value: json.loads("[" * depth + json.dumps(value) + "]" * depth),
    st.integers(0, MAX_DEPTH + 2),
    st.none() | st.integers(),
)
"""Lists in lists around the limit of nesting: the deepest documents accepted, the first refused."""
SERVICES = st.dictionaries(
    st.sampled_from(("web", "app", "teemesh-sidecar", "db", "")) | TEXT,
    st.dictionaries(st.sampled_from(KEYS), VALUES | DEEP, max_size=5) | VALUES,
    max_size=3,
)
DOCS = (
    st.fixed_dictionaries(
        {"services": SERVICES | VALUES},
        optional={
            "volumes": VALUES | st.dictionaries(TEXT, VALUES),
            "version": VALUES,
            "x-top": VALUES | DEEP,
            "include": VALUES,
        },
    )
    | VALUES
)


def _spec(tmp: Path) -> Any:
    (tmp / "compose.yaml").write_text("services: {}\n")
    return parse_spec(SPEC, base_dir=tmp)


@FUZZ
@given(doc=DOCS)
def test_any_compose_document_renders_or_is_refused_by_name(
    tmp_path_factory: Any, doc: Any
) -> None:
    spec = _spec(tmp_path_factory.mktemp("fuzz")).with_compose_texts(
        {"db": yaml.safe_dump(doc, allow_unicode=True)}
    )
    _check(spec)


@FUZZ
@given(text=st.text(max_size=200) | st.sampled_from(("services: {a: b", "- [", ":\n:", "\t")))
def test_any_compose_text_renders_or_is_refused_by_name(tmp_path_factory: Any, text: str) -> None:
    spec = _spec(tmp_path_factory.mktemp("fuzz")).with_compose_texts({"db": text})
    _check(spec)


def _check(spec: Any) -> None:
    plan = plan_cluster(spec)
    rendered = input_error_only(render, plan, allow_unpinned=True)
    if rendered is None:
        return
    composed = yaml.safe_load(rendered.files()["db/docker-compose.yaml"])
    for name, service in composed["services"].items():
        assert service["network_mode"] == "host"
        if name != "teemesh-sidecar":  # the sidecar serves the routes; every other container
            assert "db:127.77.0.10" in service["extra_hosts"]  # dials them by name


PLAIN = st.sampled_from((
    "on", "Off", "yes", "NO", "y", "0755", "08", "00.5", "1:30", "1:1", "2001-12-14", "2001-1-2",
    "2001-12-14 21:59:43.10 -5", "0o17", "0O17", "0x1F", "0X1F", "-0x1", "0b101", "1_000", "0",
    "-0", "+7", "12", ".5", "1.", "-1.5e-3", "1e3", "1E+3", "1e999", ".inf", "-.Inf", "+.INF",
    ".NaN", ".nan", "~", "null", "Null", "NULL", "true", "True", "tRue", "FALSE", "=", "<<", "-",
    "a: b", "'x'", '"y"', "x #c", "é", "",
)) | st.text(st.sampled_from("abz019.:-_+eEox~ "), min_size=1, max_size=8)  # fmt: skip
"""Plain scalars YAML 1.1 and 1.2 read differently, and text built from their characters."""
TEXTS = st.recursive(
    PLAIN,
    lambda inner: (
        st.lists(inner, max_size=4).map(lambda items: f"[{', '.join(items)}]")
        | st.lists(st.tuples(PLAIN, inner), max_size=4).map(
            lambda items: "{" + ", ".join(f"{k}: {v}" for k, v in items) + "}"
        )
    ),
    max_leaves=12,
)


@FUZZ
@given(text=TEXTS)
def test_what_the_loader_accepts_is_written_and_read_back_the_same(text: str) -> None:
    try:
        doc = load_compose_yaml(text)
    except (yaml.YAMLError, ValueError):
        return
    written = dump_compose_yaml(doc)
    assert _same(load_compose_yaml(written), doc), written
    assert _same(yaml.safe_load(written), doc), written  # and YAML 1.1 reads it the same


def _same(a: Any, b: Any) -> bool:
    """Equal, of the same types all the way down (True is not 1), NaN equal to NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, dict):
        return len(a) == len(b) and all(
            _same(k, k2) and _same(v, v2)
            for (k, v), (k2, v2) in zip(a.items(), b.items(), strict=True)
        )
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)
