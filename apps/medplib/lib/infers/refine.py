"""``medplib_refine``: positive / negative clicks refine a grounded mask (SAM-Med2D prompt encoder)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..engine import MedPLIBEngine
from ..prompts import bad_request, clicks, refine_target, slice_index
from .base import MedPLIBInferTask


class MedPLIBRefine(MedPLIBInferTask):
    """Click refinement of the grounding of ``text`` on the clicked slice.

    The grounding (cached per image, slice and text; computed now if missing) is the mask prior; the
    clicks go through SAM-Med2D's prompt encoder on the cached image embedding, so a click costs one
    mask-decoder pass, not an LLM run. A ``deepgrow`` 2D model: Slicer and OHIF send the clicks of the
    current slice.
    """

    def __init__(self, engine: MedPLIBEngine, text: str = "liver") -> None:
        super().__init__(
            engine,
            type="deepgrow",
            labels=["refined"],
            dimension=2,
            description="MedPLIB click refinement: positive / negative clicks refine the grounding of 'text'",
            config={"text": text},
        )

    def run(self, request: dict[str, Any], volume: Any) -> tuple[np.ndarray, dict[str, Any]]:
        shape = tuple(volume.shape[1:])
        fg, bg = clicks(request, shape)
        if not fg and not bg:
            raise bad_request("no clicks given: add foreground (and background) points on a slice")
        index = slice_index(request, shape, fg, bg)
        fg = [p for p in fg if p[2] == index]
        bg = [p for p in bg if p[2] == index]
        if not fg and not bg:
            raise bad_request(f"no clicks on slice {index}")
        text = refine_target(request)
        axis = self.engine.slice_axis(volume)
        mask = self.engine.refine(volume, index, fg, bg, axis, text)
        name = (
            request.get("label")
            if isinstance(request.get("label"), str) and request.get("label")
            else "refined"
        )
        return mask.astype(np.uint8), {
            "label_names": {name: 1},
            "medplib": {
                "task": "refine",
                "text": text,
                "slice": index,
                "axis": axis,
                "foreground": [list(p) for p in fg],
                "background": [list(p) for p in bg],
                "voxels": int(mask.sum()),
            },
        }
