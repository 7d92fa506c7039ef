"""The inference wing: a runner (model, tokenizer, caches, batched primitives), the calls built on it, and
:class:`MedPLIBPipeline`, their one-line public face. Modules import only downward:
options / cache / features / results -> runner -> grounding -> keyframes -> image -> refinement -> volume
-> medplib.

Names load on first use, so that light modules (``options``) can be imported without torch and the model code.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AnswerOptions": "options",
    "GroundingOptions": "options",
    "GroundingResult": "results",
    "PathCounts": "results",
    "SliceGrounding": "results",
    "VolumeGroundingResult": "results",
    "VolumeRegionAnswer": "results",
    "ImageFeatures": "features",
    "MedPLIBRunner": "runner",
    "MedPLIBPipeline": "medplib",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
