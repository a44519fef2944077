"""Fuzz the sidecar's dstack configuration (``teemesh.sidecar.dstack``): whatever the guest
agent's Info and the environment, ``measured_section`` and ``dstack_sidecar_config`` give a
configuration or raise ``InputError``, never anything else.

Three generators: any JSON-like Info (the shape is wrong almost always), Info whose app-compose
is any JSON value that hashes right (so the section checks run), and real rendered app-composes
with one field of the ``teemesh`` section replaced and any environment.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import fuzzkit
from fuzzkit import input_error_only
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from teemesh.sidecar.dstack import (
    ENV_ADDRESS,
    ENV_COORDINATORS,
    ENV_GATEWAY_CERT,
    ENV_PEER_ID,
    ENV_PLATFORM_KEY,
    ENV_VIA_GATEWAY,
    dstack_sidecar_config,
    measured_section,
)
from teemesh.spec import group_app_compose, parse_spec, system_app_compose

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SPEC = parse_spec(
    {
        "cluster": "demo",
        "tee": "simulated",
        "gateway": {"base_domain": "example.test"},
        "transport": "gateway",
        "coordinators": {"dcs": {"callers": ["web"]}},
        "workload_groups": {
            "web": {
                "command": "run-web",
                "backends": {"web": {"port": 8080}},
                "routes": {"web": {"backend": "web"}},
            }
        },
    }
)
RENDERED = (
    group_app_compose(SPEC, "web"),
    system_app_compose(SPEC, "coordinator"),
    system_app_compose(SPEC, "gateway"),
)
ENV_NAMES = (ENV_PEER_ID, ENV_ADDRESS, ENV_COORDINATORS, ENV_PLATFORM_KEY, ENV_VIA_GATEWAY,
             ENV_GATEWAY_CERT, "OTHER")  # fmt: skip
environments = st.dictionaries(
    st.sampled_from(ENV_NAMES),
    st.text(max_size=40) | st.sampled_from(("web-0", "10.0.0.2", "https://a:1,https://b:2")),
    max_size=len(ENV_NAMES),
)
gateway_files = st.none() | st.tuples(st.text(max_size=8), st.text(max_size=8))


def _info(text: str, compose_hash: str | None = None) -> dict[str, Any]:
    try:
        digest = compose_hash or hashlib.sha256(text.encode()).hexdigest()
    except UnicodeEncodeError:
        digest = "00" * 32
    return {"tcb_info": json.dumps({"app_compose": text, "compose_hash": digest})}


def _complete(info: Any, env: dict[str, str], files: tuple[str, str] | None) -> dict[str, Any]:
    section, digest = measured_section(info)
    return dstack_sidecar_config(section, digest, env, gateway_files=files)


def _check(info: Any, env: dict[str, str], files: tuple[str, str] | None) -> None:
    config = input_error_only(_complete, info, env, files)
    if config is not None:  # a configuration always names its replica and its pin
        assert config["peer_id"] == env[ENV_PEER_ID].strip()
        assert config["coordinators"]
        assert config["coordinator_policy"]["compose_hashes"]


infos = st.dictionaries(
    st.sampled_from(("tcb_info", "compose_hash", "app_id")) | fuzzkit.TEXT,
    fuzzkit.json_values() | fuzzkit.json_values().map(json.dumps),
    max_size=4,
)


@FUZZ
@given(infos, environments, gateway_files)
@example({"tcb_info": "[" * 5000}, {}, None)
@example({"tcb_info": '{"app_compose": "\\ud800"}'}, {}, None)
def test_any_info_gives_a_configuration_or_an_input_error(
    info: dict[str, Any], env: dict[str, str], files: tuple[str, str] | None
) -> None:
    _check(info, env, files)


sections = st.dictionaries(
    st.sampled_from(("coordinator_policy", "via_gateway", "gateway", "routes")) | fuzzkit.TEXT,
    fuzzkit.json_values(),
    max_size=4,
)


@FUZZ
@given(
    st.one_of(
        fuzzkit.json_values(),
        sections.map(lambda s: {"teemesh": {"sidecar": s}}),
    ).map(json.dumps),
    environments,
    gateway_files,
)
@example(json.dumps({"teemesh": {"sidecar": {"via_gateway": 0}}}), {}, None)
@example(json.dumps({"teemesh": {"sidecar": {"coordinator_policy": []}}}), {}, None)
@example(
    json.dumps({"teemesh": {"sidecar": {}}}),
    {ENV_PEER_ID: "web-0", ENV_ADDRESS: "10.0.0.2", ENV_COORDINATORS: " , "},
    None,
)
def test_any_measured_app_compose_gives_a_configuration_or_an_input_error(
    text: str, env: dict[str, str], files: tuple[str, str] | None
) -> None:
    _check(_info(text), env, files)


@FUZZ
@given(
    st.sampled_from(RENDERED),
    st.sampled_from(("coordinator_policy", "via_gateway", "gateway", "ingress", "peer_id")),
    fuzzkit.json_values(),
    environments,
    gateway_files,
)
def test_a_rendered_app_compose_with_one_field_changed(
    app_compose: bytes,
    name: str,
    value: Any,
    env: dict[str, str],
    files: tuple[str, str] | None,
) -> None:
    doc = json.loads(app_compose)
    doc["teemesh"]["sidecar"][name] = value
    _check(_info(json.dumps(doc)), env, files)
