"""``medplib_region_vqa``: a question about a region marked with clicks, an ROI or a scribble."""

from __future__ import annotations

from typing import Any

import numpy as np

from monai_medplib.user_input import UserInputError, parse_int

from ..engine import MedPLIBEngine, load_label
from ..prompts import bad_request, clicks, json_value, question_text, roi_box, slice_index
from .base import MedPLIBInferTask

REGION_VALUE = 1


class MedPLIBRegionVQA(MedPLIBInferTask):
    """Region VQA from what the viewers send.

    * 3D Slicer: ``foreground`` / ``background`` clicks (IJK), ``roi`` = [i0, i1, j0, j1, k0, k1], and a
      scribble labelmap uploaded as ``label`` (with ``label_info`` / ``selected_label_name``); the server hands
      the upload over as ``label_upload``, while ``label`` in the options is only a segment name.
    * OHIF v3: ``foreground`` / ``background`` (deepgrow type) or ``points`` + ``point_labels``.

    The question is asked on one slice: Slicer's ``slice``, else the clicks' slice, else the middle slice of
    the ROI or of the scribble. Without foreground clicks, a ``slice`` that misses the ROI and the scribble is
    not used: for an ROI alone Slicer sends the red view's offset in millimetres there, not a slice index.
    Whatever is given on that slice (foreground clicks, the ROI's box, the scribble) makes one region; background
    clicks do not mark a region. The answer is ``result["answer"]``;
    the region the model was given comes back as label 1 on its slice.
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
        scribble = scribble_mask(request, shape, self.engine.limits)
        if scribble is None and roi is None and not fg:
            raise bad_request("no region given: add foreground clicks, an ROI or a scribble label")
        index = region_slice(request, shape, fg, roi, scribble)
        points = [p for p in fg if p[2] == index]
        if not points and roi is None and scribble is None:
            raise bad_request(f"no foreground clicks on slice {index}")
        axis = self.engine.slice_axis(volume)
        result = self.engine.answer_region(
            volume, question, axis, index=index, points=points or None, roi=roi, scribble=scribble
        )
        given = {"points": bool(points), "roi": roi is not None, "scribble": scribble is not None}
        name = request.get("label")
        name = name if isinstance(name, str) and name else "region"
        return result.region.astype(np.uint8) * REGION_VALUE, {
            "label_names": {name: REGION_VALUE},
            "answer": result.answer,
            "medplib": {
                "task": "region_vqa",
                "question": question,
                "prompt": "+".join(kind for kind, present in given.items() if present),
                "slice": result.slice_index,
                "axis": axis,
                "region_voxels": int(result.region.sum()),
                "answer": result.answer,
            },
        }


def region_slice(
    request: dict[str, Any],
    shape: tuple[int, ...],
    fg: list,
    roi: tuple[int, ...] | None,
    scribble: np.ndarray | None,
) -> int | None:
    """The slice of a region question (``None``: the middle of the ROI or scribble, chosen by the pipeline).

    With foreground clicks this is :func:`slice_index`. Without them, ``slice`` is used only when the ROI or the
    scribble has that slice: 3D Slicer fills it, for an ROI alone, with ``round(abs(red view offset in mm))``.
    """
    if fg or (roi is None and scribble is None):
        return slice_index(request, shape, fg)
    value = request.get("slice")
    if value in (None, "", "auto"):
        return None
    try:
        k = parse_int(value, "'slice'")
    except UserInputError as e:
        raise bad_request(f"{e} (a slice index)") from e
    inside_roi = roi is not None and roi[4] <= k <= roi[5]
    inside_scribble = scribble is not None and 0 <= k < shape[2] and bool(scribble[..., k].any())
    return k if inside_roi or inside_scribble else None


def scribble_mask(request: dict[str, Any], shape: tuple[int, ...], limits: Any = None) -> np.ndarray | None:
    """The uploaded scribble label (``label_upload``, set by the server) as a boolean volume, or None.

    Slicer uploads every segment in one labelmap and names them in ``label_info`` ([{"name", "id"}]); the
    region is the ``selected_label_name`` segment if given, else every segment not named background.
    """
    path = request.get("label_upload")
    if not isinstance(path, str) or not path:
        return None
    values = load_label(path, shape, limits)
    info = json_value(request, "label_info") or []
    info = [i for i in info if isinstance(i, dict) and "id" in i] if isinstance(info, list) else []
    selected = request.get("selected_label_name")
    ids = [_segment_id(i) for i in info if selected and i.get("name") == selected]
    if ids:
        mask = np.isin(values, ids)
    else:
        background = [_segment_id(i) for i in info if "background" in str(i.get("name", "")).lower()]
        mask = (values > 0) & ~np.isin(values, background)
    if not mask.any():
        raise bad_request("the uploaded scribble label is empty (no voxels in the selected segment)")
    return mask


def _segment_id(info: dict[str, Any]) -> int:
    """The label value of one ``label_info`` entry (400 when it is not a whole number >= 0)."""
    try:
        return parse_int(info["id"], f"'label_info' id of {str(info.get('name'))[:40]!r}", minimum=0)
    except UserInputError as e:
        raise bad_request(str(e)) from e
