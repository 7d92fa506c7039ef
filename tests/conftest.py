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


def _host_line() -> str:
    """Free disk space where the tests write, and the CPU's vector extensions: the two host facts that have
    decided CI failures (a full temp disk; CLIP sums that differ between AVX2 and AVX-512)."""
    import shutil
    import tempfile

    temp = tempfile.gettempdir()
    try:
        flags = next(
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
        ).split()
        vector = "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "no avx2"
    except (OSError, StopIteration):
        vector = "unknown"
    return (
        f"host: {shutil.disk_usage(temp).free / 1e9:.1f} GB free in {temp}, {os.cpu_count()} CPUs, {vector}"
    )


def pytest_report_header() -> str:
    return _host_line()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    terminalreporter.write_line(_host_line())
