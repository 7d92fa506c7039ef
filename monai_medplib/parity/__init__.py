"""``medplib verify-parity``: run a golden fixture saved by the original MedPLIB code and compare every stored
quantity (:mod:`.runner`) as rows of a table (:mod:`.compare`). The core never imports this package."""

from __future__ import annotations

from .compare import ParityReport, Row
from .runner import run_parity

__all__ = ["ParityReport", "Row", "run_parity"]
