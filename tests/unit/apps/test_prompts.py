"""Fast tests of the MONAI Label app's request parsing (apps/medplib/lib/prompts.py): no server, no model."""

from __future__ import annotations

import sys

import pytest

from tests.support.paths import REPO

APP_DIR = REPO / "apps" / "medplib"
sys.path.insert(0, str(APP_DIR))

from fastapi import HTTPException  # noqa: E402
from lib import prompts  # noqa: E402

SHAPE = (48, 40, 12)


def _status_and_detail(call):
    with pytest.raises(HTTPException) as info:
        call()
    return info.value.status_code, info.value.detail


def test_grounding_texts_split_on_commas_and_semicolons():
    assert prompts.grounding_texts({"text": " liver, spleen ;kidney,, "}) == ["liver", "spleen", "kidney"]
    assert prompts.grounding_texts({"text": '["left kidney", "aorta"]'}) == ["left kidney", "aorta"]


@pytest.mark.parametrize("request_", [{}, {"text": ""}, {"text": " , ;"}, {"text": 3}])
def test_grounding_texts_missing_is_400(request_):
    status, detail = _status_and_detail(lambda: prompts.grounding_texts(request_))
    assert status == 400 and "'text'" in detail


def test_question_limits():
    assert prompts.question_text({"question": "  What organ is this? "}) == "What organ is this?"
    assert _status_and_detail(lambda: prompts.question_text({}))[0] == 400
    status, detail = _status_and_detail(lambda: prompts.question_text({"question": "x" * 10_000}))
    assert status == 400 and "10000 characters" in detail


def test_points_inside_are_rounded_and_outside_rejected():
    assert prompts.voxel_points([[1.4, 2.6, 3], [47, 39, 11]], SHAPE, "foreground") == [
        (1, 3, 3),
        (47, 39, 11),
    ]
    for bad in ([[48, 0, 0]], [[0, -1, 0]], [[0, 0, 12]]):
        status, detail = _status_and_detail(lambda b=bad: prompts.voxel_points(b, SHAPE, "foreground"))
        assert status == 400 and "outside the volume" in detail and "'foreground'" in detail
    assert _status_and_detail(lambda: prompts.voxel_points([[1, 2]], SHAPE, "background"))[0] == 400
    assert _status_and_detail(lambda: prompts.voxel_points("1,2,3", SHAPE, "background"))[0] == 400


def test_ohif_points_split_by_label():
    fg, bg = prompts.clicks({"points": [[1, 1, 1], [2, 2, 1], [3, 3, 1]], "point_labels": [1, 0, 1]}, SHAPE)
    assert fg == [(1, 1, 1), (3, 3, 1)] and bg == [(2, 2, 1)]
    status, _ = _status_and_detail(lambda: prompts.clicks({"points": [[1, 1, 1]], "point_labels": []}, SHAPE))
    assert status == 400


def test_roi_corners_in_either_order_are_sorted_and_clipped():
    # Slicer's RAS->IJK can swap a min/max pair; corners beyond the volume are clipped.
    assert prompts.roi_box([30, 10, 5, 25, 7, 2], SHAPE) == (10, 30, 5, 25, 2, 7)
    assert prompts.roi_box([-5, 60, 0, 3, 0, 20], SHAPE) == (0, 47, 0, 3, 0, 11)
    assert prompts.roi_box(None, SHAPE) is None


@pytest.mark.parametrize(
    "roi, words",
    [([3, 3, 5, 9, 1, 2], "empty"), ([50, 60, 0, 3, 0, 1], "does not overlap"), ([1, 2, 3], "[i0, i1")],
)
def test_bad_roi_is_400(roi, words):
    status, detail = _status_and_detail(lambda: prompts.roi_box(roi, SHAPE))
    assert status == 400 and words in detail


def test_slice_index_prefers_slice_then_last_click():
    assert prompts.slice_index({"slice": 4}, SHAPE, [(1, 1, 9)]) == 4
    # Slicer sends slice None on slice 0: fall back to the clicks
    assert prompts.slice_index({"slice": None}, SHAPE, [(1, 1, 0), (1, 1, 7)]) == 7
    assert prompts.slice_index({}, SHAPE) is None
    assert _status_and_detail(lambda: prompts.slice_index({"slice": 12}, SHAPE))[0] == 400
    assert _status_and_detail(lambda: prompts.slice_index({"slice": "top"}, SHAPE))[0] == 400


def test_slice_selection_forms():
    assert prompts.slice_selection("all", 12) is None
    assert prompts.slice_selection("", 12) is None
    assert prompts.slice_selection("3", 12) == [3]
    assert prompts.slice_selection("2-4, 9", 12) == [2, 3, 4, 9]
    assert prompts.slice_selection([5, 1], 12) == [1, 5]
    assert _status_and_detail(lambda: prompts.slice_selection("10-14", 12))[0] == 400
    assert _status_and_detail(lambda: prompts.slice_selection("middle", 12))[0] == 400
