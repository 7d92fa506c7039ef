"""A client's ``label_info`` (Slicer / OHIF segment descriptions: ``[{"id", "name", "color", ...}]``), checked
before it names segments of a DICOM-SEG."""

from __future__ import annotations

import math
from typing import Any

from ...user_input import UserInputError, parse_int

__all__ = ["check_label_info"]


def check_label_info(label_info: Any) -> list[dict[str, Any]]:
    """A client's ``label_info`` as a list of segment descriptions, or a user error naming what is wrong.

    Each entry is an object; ``id`` (when given) a whole number >= 0, ``name`` / ``description`` text, ``color`` three
    whole numbers 0-255, ``segmentAttribute`` an object.

    Raises:
        UserInputError: naming ``label_info`` and the entry at fault.
    """
    if label_info is None:
        return []
    if not isinstance(label_info, list) or not all(isinstance(e, dict) for e in label_info):
        raise UserInputError(f"'label_info' must be a list of objects, got {str(label_info)[:80]!r}")
    for n, entry in enumerate(label_info):
        where = f"'label_info' entry {n}"
        if "id" in entry:
            parse_int(entry["id"], f"{where} id", minimum=0)
        for key in ("name", "description"):
            if key in entry and not isinstance(entry[key], str):
                raise UserInputError(f"{where} {key} must be text, got {str(entry[key])[:40]!r}")
        if "color" in entry:
            colour = entry["color"]
            if (
                not isinstance(colour, list)
                or len(colour) != 3
                or any(
                    isinstance(c, bool)
                    or not isinstance(c, int | float)
                    or not math.isfinite(c)
                    or c != int(c)
                    or not 0 <= c <= 255
                    for c in colour
                )
            ):
                raise UserInputError(
                    f"{where} color must be three whole numbers 0-255, got {str(colour)[:40]!r}"
                )
        if "segmentAttribute" in entry and not isinstance(entry["segmentAttribute"], dict):
            raise UserInputError(f"{where} segmentAttribute must be an object")
    return label_info
