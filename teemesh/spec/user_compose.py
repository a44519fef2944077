"""A workload group's own docker compose file: read as compose reads it, checked, and wired
into the CVM's network.

Pure. The user's file is untrusted input to a measured document: ``teemesh render`` copies its
services into the compose a CVM is measured by, so this module must neither change what a value
means on the way (``goyaml``: compose's reading, not PyYAML's) nor let in what the measurement
would not cover: compose content from elsewhere (``include``, ``extends: {file}``), image names
or volume sources the unmeasured environment chooses, or a way into teemesh's containers and
their keys.
"""

from __future__ import annotations

from typing import Any

import yaml

from teemesh.errors import InputError
from teemesh.spec.goyaml import load_compose_yaml

SIDECAR = "teemesh-sidecar"
VOLUME = "teemesh-state"
APP = "app"
MAX_DEPTH = 64
"""Nesting a compose file may have (a real one has under ten levels): deeper is refused before
PyYAML's recursive writer could run out of stack."""


def read_user_compose(text: str | None, group: str) -> dict[str, Any]:
    """``group``'s compose file (its ``text``; None: none) as a checked document."""
    if text is None:
        return {}
    where = _file(group)
    try:
        doc = load_compose_yaml(text)
    except RecursionError as exc:
        raise InputError("document nested too deeply", field=where) from exc
    except yaml.YAMLError as exc:
        raise InputError(f"not YAML: {exc}", field=where) from exc
    except ValueError as exc:  # int(): more digits than Python converts
        raise InputError(f"invalid YAML value: {exc}", field=where) from exc
    if doc is None:
        return {}
    if not isinstance(doc, dict) or not isinstance(doc.get("services") or {}, dict):
        raise InputError("expected a compose file (a mapping with services)", field=where)
    if _too_deep(doc):
        raise InputError(f"document nested too deeply (over {MAX_DEPTH} levels)", field=where)
    if "include" in doc:
        raise InputError(
            "include: the included files would not be measured with the app; "
            "copy their services into this file",
            field=f"{where}: include",
        )
    volumes = doc.get("volumes") or {}
    if not isinstance(volumes, dict):
        raise InputError("volumes: expected a mapping", field=where)
    if VOLUME in volumes:
        raise InputError(f"volumes: the name {VOLUME!r} is teemesh's", field=where)
    for name, volume in volumes.items():
        actual = volume.get("name") if isinstance(volume, dict) else None
        if isinstance(actual, str) and (actual.endswith(VOLUME) or "$" in actual):
            raise InputError(
                f"name: {actual!r} could be teemesh's volume (its keys)",
                field=f"{where}: volumes.{name}",
            )
    return doc


_UNSUPPORTED = {
    "build": "dstack builds no image: give an image, pinned by digest",
    "ports": "every container runs in the CVM's network (network_mode: host): its ports are "
    "the ports it listens on; remove ports",
    "networks": "every container runs in the CVM's network (network_mode: host); remove networks",
}


def wire_service(service: Any, group: str, name: str, extra_hosts: list[str]) -> dict[str, Any]:
    """A user's service in the CVM's network, with the route names, after the sidecar."""
    where = f"{_file(group)}: services.{name}"
    if name in (SIDECAR, APP):  # reserved even when unused: adding a command moves nothing
        raise InputError(f"the service name {name!r} is teemesh's", field=where)
    if not isinstance(service, dict):
        raise InputError("expected a mapping", field=where)
    problems = _problems(service)
    given = service.get("extra_hosts") or []
    if isinstance(given, dict):
        given = [f"{host}:{address}" for host, address in given.items()]
    if not isinstance(given, list):
        problems.append("extra_hosts: expected a list or a mapping")
    if problems:
        raise InputError("; ".join(problems), field=where)
    out = dict(service) | {"network_mode": "host", "extra_hosts": [*given, *extra_hosts]}
    depends = service.get("depends_on")
    if depends is None:
        out["depends_on"] = [SIDECAR]
    elif isinstance(depends, list):
        out["depends_on"] = [*depends, SIDECAR]
    else:
        out["depends_on"] = depends | {SIDECAR: {"condition": "service_started"}}
    return out


def _problems(service: dict[Any, Any]) -> list[str]:
    """Why ``service`` cannot run as it is in a measured CVM (extra_hosts aside)."""
    problems = [f"{key}: {why}" for key, why in _UNSUPPORTED.items() if key in service]
    mode = service.get("network_mode", "host")
    if mode != "host":
        problems.append(f"network_mode: {mode!r}; every container runs in the CVM's network")
    image = service.get("image")
    if not isinstance(image, str):
        problems.append("image: missing (dstack pulls images, pinned by digest)")
    elif "$" in image:
        problems.append(
            f"image: {image!r} refers to the environment, which is not measured: "
            "it would choose the code"
        )
    extends = service.get("extends")
    if isinstance(extends, dict) and "file" in extends:
        problems.append(
            "extends: file: the other file would not be measured with the app; "
            "copy the service into this file"
        )
    depends = service.get("depends_on")
    if depends is not None and not isinstance(depends, list | dict):
        problems.append("depends_on: expected a list or a mapping")
    return problems + _teemesh_state(service)


def _teemesh_state(service: dict[Any, Any]) -> list[str]:
    """Why ``service`` could reach teemesh's volume (the sidecar's keys), if it could."""
    problems = []
    volumes = service.get("volumes")
    for volume in volumes if isinstance(volumes, list) else []:
        if isinstance(volume, str):
            source = volume.split(":", 1)[0] if ":" in volume else None
        elif isinstance(volume, dict):
            source = volume.get("source")
        else:
            continue
        if isinstance(source, str) and (source == VOLUME or "$" in source):
            problems.append(
                f"volumes: {volume!r} mounts teemesh's volume (the sidecar's keys)"
                if source == VOLUME
                else f"volumes: {volume!r}: the environment, which is not measured, "
                "would choose what is mounted"
            )
    others = service.get("volumes_from")
    for other in others if isinstance(others, list) else []:
        if not isinstance(other, str):
            continue
        source = other.removesuffix(":ro").removesuffix(":rw")
        if source.startswith("container:") or "$" in source:
            problems.append(f"volumes_from: {other!r}: only a service of this file")
        elif source in (SIDECAR, APP) or source.startswith("teemesh-"):
            problems.append(f"volumes_from: {other!r} is teemesh's (the sidecar's keys)")
    return problems


def _too_deep(doc: Any) -> bool:
    """Whether ``doc`` nests deeper than MAX_DEPTH (an alias inside itself: without end). A
    part shared through an alias is walked once, with its depth."""
    depth: dict[int, int] = {}  # id -> levels at and below; absent while being walked
    stack: list[tuple[Any, bool]] = [(doc, False)]
    walking: set[int] = set()
    while stack:
        node, walked = stack.pop()
        below = [v for v in (node.values() if isinstance(node, dict) else node)
                 if isinstance(v, dict | list)]  # fmt: skip
        if walked:
            walking.discard(id(node))
            depth[id(node)] = 1 + max((depth[id(v)] for v in below), default=0)
            if depth[id(node)] > MAX_DEPTH:
                return True
        elif id(node) in walking:
            return True
        elif id(node) not in depth:
            walking.add(id(node))
            stack.append((node, True))
            stack.extend((v, False) for v in below)
    return False


def _file(group: str) -> str:
    return f"workload_groups.{group}.compose"
