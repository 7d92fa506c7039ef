"""MONAI transforms: CT / MR volumes -> MedPLIB's 8-bit 2D slices, prompts onto slices, and back.

Names load on first use (``transforms.planes`` is imported by the command line before MONAI is).
"""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULES = ("planes", "intensity", "slicing", "prompts")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:  # ``transforms.prompts`` as a module, also on the first access
        return importlib.import_module(f".{name}", __name__)
    for sub in _SUBMODULES:
        module = importlib.import_module(f".{sub}", __name__)
        if name in getattr(module, "__all__", ()):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
