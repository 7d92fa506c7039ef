"""MedPLIB model code: pure torch + transformers (no files, no MONAI).

Names are imported lazily so that ``monai_medplib.config`` can import ``modeling.sam_med2d`` without a cycle.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MedPLIBForCausalLM": "medplib",
    "MedPLIBModel": "medplib",
    "GenerationOutput": "generation",
    "LLMOutput": "medplib",
    "TopOneMoE": "moe",
    "CLIPVisionTower": "vision",
    "SamMed2D": "sam_med2d",
    "SamMed2DConfig": "sam_med2d",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
