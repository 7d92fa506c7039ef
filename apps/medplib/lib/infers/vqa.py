"""``medplib_vqa``: a question about the current slice; the answer in the result JSON."""

from __future__ import annotations

from typing import Any

from ..engine import MedPLIBEngine
from ..prompts import question_text, slice_index
from .base import MedPLIBInferTask


class MedPLIBVQA(MedPLIBInferTask):
    """Visual question answering on one slice (``slice``; default the middle slice).

    The answer is ``result["answer"]``; no label is written (3D Slicer shows no segment, and the reply carries
    the JSON alone).
    """

    def __init__(self, engine: MedPLIBEngine, question: str = "What modality is this image?") -> None:
        super().__init__(
            engine,
            type="segmentation",
            labels=[],
            dimension=2,
            description="MedPLIB VQA: ask about the current slice; the answer is in the result JSON",
            config={"question": question, "slice": ""},
        )

    def run(self, request: dict[str, Any], volume: Any) -> tuple[None, dict[str, Any]]:
        shape = tuple(volume.shape[1:])
        question = question_text(request)
        index = slice_index(request, shape)
        index = shape[2] // 2 if index is None else index
        axis = self.engine.slice_axis(volume)
        answer = self.engine.answer(volume, question, index, axis)
        return None, {
            "label_names": {},
            "answer": answer,
            "medplib": {"task": "vqa", "question": question, "slice": index, "axis": axis, "answer": answer},
        }
