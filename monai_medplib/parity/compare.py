"""Comparison rows of the parity runner: tolerances read from the fixture, differences, the printed table."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

DEFAULT_FLOAT_TOLERANCE = 1e-4
DEFAULT_THRESHOLD_MARGIN = 1e-3
_NUMBER = r"[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?"


@dataclass(frozen=True)
class Tolerance:
    """``exact`` (identical values) or a max-abs bound."""

    max_abs: float = 0.0
    exact: bool = False

    def __str__(self) -> str:
        return "exact" if self.exact else f"<= {self.max_abs:.0e}"


EXACT = Tolerance(exact=True)


def parse_tolerance(text: str | None, default: float = DEFAULT_FLOAT_TOLERANCE) -> Tolerance:
    """Read a fixture ``suggested_tolerance`` string: ``"exact ..."`` or ``"max-abs <= 1e-4 ..."``."""
    if not text:
        return Tolerance(default)
    if text.strip().lower().startswith("exact"):
        return EXACT
    match = re.search(r"<=\s*(" + _NUMBER + ")", text)
    return Tolerance(float(match.group(1))) if match else Tolerance(default)


def threshold_margin(entry: dict) -> float:
    """Largest ``X`` among a case's ``pixels_within_X_of_threshold`` keys (README: 1e-3)."""
    margins = [
        float(m.group(1))
        for key in entry
        if (m := re.fullmatch(r"pixels_within_(" + _NUMBER + ")_of_threshold", key))
    ]
    return max(margins) if margins else DEFAULT_THRESHOLD_MARGIN


@dataclass
class Row:
    """One compared quantity. ``ok`` None means not compared (unknown to this runner)."""

    case: str
    quantity: str
    diff: float
    tolerance: str
    ok: bool | None
    note: str = ""


@dataclass
class ParityReport:
    """All rows of a parity run."""

    rows: list[Row] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(row.ok is not False for row in self.rows)

    @property
    def failures(self) -> list[Row]:
        return [row for row in self.rows if row.ok is False]

    def format_table(self, failures_only: bool = False) -> str:
        """The table (case, quantity, max-abs diff, tolerance, ok) and a summary line."""
        header = ("case", "quantity", "max-abs diff", "tolerance", "ok")
        lines = [
            (
                r.case,
                r.quantity,
                _format_diff(r.diff),
                r.tolerance,
                _format_ok(r) + (f"  {r.note}" if r.note else ""),
            )
            for r in (self.failures if failures_only else self.rows)
        ]
        widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
        out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
        out += [fmt.format(*line) for line in lines]
        skipped = sum(r.ok is None for r in self.rows)
        out.append(
            f"{len(self.rows) - skipped - len(self.failures)} ok, {len(self.failures)} failed, {skipped} not compared"
        )
        return "\n".join(out)


def _format_diff(diff: float) -> str:
    if isinstance(diff, float) and (math.isnan(diff) or math.isinf(diff)):
        return str(diff)
    if diff == int(diff) and abs(diff) >= 1:
        return str(int(diff))
    return f"{diff:.3g}" if diff else "0"


def _format_ok(row: Row) -> str:
    return {True: "ok", False: "FAIL", None: "skip"}[row.ok]


def compare_tensor(case: str, name: str, ours: torch.Tensor, expected: torch.Tensor, tol: Tolerance) -> Row:
    """Max-abs difference (exact: number of differing elements) of two tensors of the same shape."""
    ours = ours.detach().cpu()
    expected = expected.detach().cpu()
    if tuple(ours.shape) != tuple(expected.shape):
        return Row(
            case, name, math.inf, str(tol), False, f"shape {tuple(ours.shape)} != {tuple(expected.shape)}"
        )
    if tol.exact:
        diff = float((ours.double() != expected.double()).sum())
        return Row(case, name, diff, str(tol), diff == 0, "" if diff == 0 else "elements differ")
    if ours.numel() == 0:
        return Row(case, name, 0.0, str(tol), True)
    diff = float((ours.double() - expected.double()).abs().max())
    return Row(case, name, diff, str(tol), diff <= tol.max_abs)


def compare_values(case: str, name: str, ours: object, expected: object) -> Row:
    """Exact comparison of JSON values (ids, lengths, text); diff = number of differing positions."""
    if isinstance(ours, Sequence) and not isinstance(ours, str) and isinstance(expected, Sequence):
        ours_list, exp_list = _plain(ours), _plain(expected)
        diff = sum(a != b for a, b in zip(ours_list, exp_list)) + abs(len(ours_list) - len(exp_list))
    else:
        diff = int(_plain(ours) != _plain(expected))
    note = "" if diff == 0 else f"got {_short(ours)}, expected {_short(expected)}"
    return Row(case, name, float(diff), str(EXACT), diff == 0, note)


def compare_binary_mask(
    case: str,
    name: str,
    ours: torch.Tensor,
    expected: torch.Tensor,
    expected_logits: torch.Tensor | None,
    threshold_logit: float,
    margin: float,
) -> Row:
    """Binary masks equal except pixels whose expected logit lies within ``margin`` of the threshold logit."""
    ours, expected = ours.cpu().bool(), expected.cpu().bool()
    tol = f"exact (|logit-thr|>{margin:g})"
    if ours.shape != expected.shape:
        return Row(case, name, math.inf, tol, False, f"shape {tuple(ours.shape)} != {tuple(expected.shape)}")
    differ = ours != expected
    count = int(differ.sum())
    if expected_logits is None:
        return Row(case, name, float(count), "exact", count == 0)
    near = (expected_logits.cpu().double() - threshold_logit).abs() <= margin
    bad = int((differ & ~near).sum())
    note = f"{count} px differ, {count - bad} within the threshold margin" if count else ""
    return Row(case, name, float(bad), tol, bad == 0, note)


def _plain(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _short(value: object, limit: int = 60) -> str:
    text = repr(_plain(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."
