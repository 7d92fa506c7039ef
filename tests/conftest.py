"""Shared pytest fixtures: where the golden fixtures live, and the real data the tests use."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# CI clones main with shared/ beside it; MEDPLIB_SHARED overrides for other layouts.
SHARED = Path(os.environ.get("MEDPLIB_SHARED", REPO.parent / "shared"))
PUBLIC_FIXTURE = SHARED / "fixtures" / "upstream_tiny_public"


@pytest.fixture(scope="session")
def public_fixture() -> Path:
    """The upstream tiny-model oracle (model dir, inputs, expected outputs)."""
    if not PUBLIC_FIXTURE.is_dir():
        pytest.fail(f"golden fixture not found at {PUBLIC_FIXTURE}; set MEDPLIB_SHARED to the shared/ folder")
    return PUBLIC_FIXTURE
