"""Reading the JSON files users hand us (model configs, datasets): a damaged one is an error naming the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["read_json"]


def read_json(path: str | Path, expected: type, what: str = "a JSON object") -> Any:
    """The content of the JSON file ``path``, which must be an instance of ``expected`` (``dict`` or ``list``).

    Raises:
        ValueError: naming the file: not valid JSON (damaged, cut short, not UTF-8), or not ``what``.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, expected):
        raise ValueError(f"{path}: expected {what}, got {type(data).__name__}")
    return data
