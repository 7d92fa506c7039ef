"""``medplib_region_vqa``: a question about a region marked with clicks, an ROI or a scribble."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np

from ..engine import MedPLIBEngine, load_label
from ..prompts import bad_request, clicks, json_value, question_text, roi_box, slice_index
from .base import MedPLIBInferTask

REGION_VALUE = 1
_TMP = os.path.realpath(tempfile.gettempdir())


class MedPLIBRegionVQA(MedPLIBInferTask):
    """Region VQA from what the viewers send.

    * 3D Slicer: ``foreground`` / ``background`` clicks (IJK), ``roi`` = [i0, i1, j0, j1, k0, k1], and a
      scribble labelmap uploaded as ``label`` (with ``label_info`` / ``selected_label_name``).
    * OHIF v3: ``foreground`` / ``background`` (deepgrow type) or ``points`` + ``point_labels``.

    Priority when several are given: scribble, then ROI, then foreground clicks (background clicks do not
    mark a region). The answer is ``result["answer"]``; the region comes back as label 1 on its slice.
    """

    def __init__(self, engine: MedPLIBEngine, question: str = "What is the object in this region?") -> None:
        super().__init__(
            engine,
            type="deepgrow",
            labels=["region"],
            dimension=2,
            description="MedPLIB region VQA: mark a region (clicks, ROI or scribble) and ask about it",
            config={"question": question},
        )

    def run(self, request: dict[str, Any], volume: Any) -> tuple[np.ndarray, dict[str, Any]]:
        shape = tuple(volume.shape[1:])
        question = question_text(request)
        fg, _bg = clicks(request, shape)
        roi = roi_box(json_value(request, "roi"), shape)
        scribble = scribble_mask(request, shape)
        index = slice_index(request, shape, fg)
        if scribble is None and roi is None and not fg:
            raise bad_request("no region given: add foreground clicks, an ROI or a scribble label")

        prompt: dict[str, Any]
        if scribble is not None:
            if index is None:
                index = int(np.argmax(scribble.sum(axis=(0, 1))))
            on_slice = np.zeros_like(scribble)
            on_slice[:, :, index] = scribble[:, :, index]
            if not on_slice.any():
                raise bad_request(f"the scribble label has no voxels on slice {index}")
            prompt, kind = {"scribble": on_slice}, "scribble"
        elif roi is not None:
            index = (roi[4] + roi[5]) // 2 if index is None else index
            if not roi[4] <= index <= roi[5]:
                raise bad_request(f"slice {index} is outside the ROI's slices {roi[4]}..{roi[5]}")
            prompt, kind = {"roi": (roi[0], roi[1], roi[2], roi[3], index, index)}, "roi"
        else:
            on_slice_points = [p for p in fg if p[2] == index]
            prompt, kind = {"points": on_slice_points}, "points"

        axis = self.engine.slice_axis(volume)
        answer, region = self.engine.answer_region(volume, question, axis, **prompt)
        if region is None:
            region = prompt_region(shape, **prompt)
        label = np.where(region, REGION_VALUE, 0).astype(np.uint8)
        name = request.get("label")
        name = name if isinstance(name, str) and name and not _is_upload(name) else "region"
        return label, {
            "label_names": {name: REGION_VALUE},
            "answer": answer,
            "medplib": {
                "task": "region_vqa",
                "question": question,
                "prompt": kind,
                "slice": index,
                "axis": axis,
                "region_voxels": int(region.sum()),
                "answer": answer,
            },
        }


def scribble_mask(request: dict[str, Any], shape: tuple[int, ...]) -> np.ndarray | None:
    """The uploaded scribble label (``label`` file) as a boolean volume, or None if none was uploaded.

    Slicer uploads every segment in one labelmap and names them in ``label_info`` ([{"name", "id"}]); the
    region is the ``selected_label_name`` segment if given, else every segment not named background.
    """
    path = request.get("label")
    if not isinstance(path, str) or not _is_upload(path):
        return None
    values = load_label(path, shape)
    info = json_value(request, "label_info") or []
    info = [i for i in info if isinstance(i, dict) and "id" in i] if isinstance(info, list) else []
    selected = request.get("selected_label_name")
    ids = [int(i["id"]) for i in info if selected and i.get("name") == selected]
    if ids:
        mask = np.isin(values, ids)
    else:
        background = [int(i["id"]) for i in info if "background" in str(i.get("name", "")).lower()]
        mask = (values > 0) & ~np.isin(values, background)
    if not mask.any():
        raise bad_request("the uploaded scribble label is empty (no voxels in the selected segment)")
    return mask


def prompt_region(
    shape: tuple[int, ...],
    points: list | None = None,
    roi: tuple[int, ...] | None = None,
    scribble: np.ndarray | None = None,
) -> np.ndarray:
    """The marked region as voxels, when the pipeline does not return the one it used."""
    region = np.zeros(shape, dtype=bool)
    if scribble is not None:
        region |= scribble
    if roi is not None:
        region[roi[0] : roi[1] + 1, roi[2] : roi[3] + 1, roi[4] : roi[5] + 1] = True
    for i, j, k in points or []:
        region[i, j, k] = True
    return region


def _is_upload(path: str) -> bool:
    """True for a file MONAI Label saved from the request's ``label`` part (a temp file), never a server path."""
    return bool(path) and os.path.isfile(path) and os.path.dirname(os.path.realpath(path)) == _TMP
