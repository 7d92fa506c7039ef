"""Shared pytest fixtures: where the golden fixtures live, and the real data the tests use."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The public oracle ships in the repository, so a clone anywhere runs every test; MEDPLIB_FIXTURES points
# to another fixtures folder holding an ``upstream_tiny_public`` set.
FIXTURES = Path(os.environ.get("MEDPLIB_FIXTURES", Path(__file__).resolve().parent / "fixtures"))
PUBLIC_FIXTURE = FIXTURES / "upstream_tiny_public"


@pytest.fixture(scope="session")
def public_fixture() -> Path:
    """The upstream tiny-model oracle (model dir, inputs, expected outputs)."""
    if not PUBLIC_FIXTURE.is_dir():
        pytest.fail(
            f"golden fixture not found at {PUBLIC_FIXTURE}; MEDPLIB_FIXTURES must name a folder that holds "
            "upstream_tiny_public (unset it to use tests/fixtures)"
        )
    return PUBLIC_FIXTURE
