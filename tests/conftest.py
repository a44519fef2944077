"""Shared fixtures: the real vectors in ../shared/vectors (missing vectors fail, never skip)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
VECTORS = Path(os.environ.get("TEEMESH_VECTORS", ROOT.parent / "shared" / "vectors"))


def vector_path(relative: str) -> Path:
    path = VECTORS / relative
    if not path.exists():
        pytest.fail(f"test vector {path} is missing: the shared/ folder must sit beside the repo")
    return path


@pytest.fixture(scope="session")
def vectors() -> Path:
    return vector_path(".")


@pytest.fixture(scope="session")
def expected() -> dict[str, Any]:
    return json.loads(vector_path("dstack/expected.json").read_text())
