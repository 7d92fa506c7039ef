"""``medplib_grounding``: text -> label, on the current slice or the whole volume."""

from __future__ import annotations

from typing import Any

import numpy as np

from monai_medplib.user_input import parse_keyframes

from ..engine import MedPLIBEngine
from ..prompts import grounding_texts, slice_index, slice_selection
from .base import MedPLIBInferTask


class MedPLIBGrounding(MedPLIBInferTask):
    """Ground one or several texts (``text``: "liver" or "liver, spleen") as labels 1..n.

    Runs on the slice Slicer sends (``slice``), else on the ``slices`` option ("all", "k", "a-b",
    "a,b,c"). Listed as a ``segmentation`` model so Slicer's Auto Segmentation panel and OHIF's
    segmentation panel show it with the ``text`` option as a free-text field.
    """

    def __init__(self, engine: MedPLIBEngine, text: str = "liver") -> None:
        super().__init__(
            engine,
            type="segmentation",
            labels=["grounded"],
            dimension=3,
            description="MedPLIB pixel grounding: type what to segment (several: 'liver, spleen')",
            config={"text": text, "slices": "all", "keyframes": "default"},
        )

    def run(self, request: dict[str, Any], volume: Any) -> tuple[np.ndarray, dict[str, Any]]:
        shape = tuple(volume.shape[1:])
        texts = grounding_texts(request)
        current = slice_index(request, shape)
        slices = [current] if current is not None else slice_selection(request.get("slices"), shape[2])
        axis = self.engine.slice_axis(volume)
        keyframes = request.get("keyframes", "default")
        if keyframes != "default":
            keyframes = parse_keyframes(keyframes, "'keyframes'")
        label, names, summary = self.engine.ground(volume, texts, slices, axis, keyframes)
        return label, {"label_names": names, "medplib": {"task": "grounding", "texts": texts, **summary}}
