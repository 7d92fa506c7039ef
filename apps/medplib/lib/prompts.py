"""Parse and validate what 3D Slicer and OHIF send, in voxel (IJK) terms.

Every function raises ``fastapi.HTTPException`` (400) with a message naming the bad key and value, so a
bad request never reaches the model and the server answers 4xx instead of 500.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from fastapi import HTTPException

from monai_medplib.user_input import UserInputError, parse_int, parse_json, parse_slice_selection

MAX_TEXT_CHARS = 2000  # a question longer than this is not a question (the model context is 2048 tokens)
MAX_TEXTS = 8  # grounding targets per request
Point = tuple[int, int, int]


def bad_request(message: str, status: int = 400) -> HTTPException:
    """The exception MONAI Label's FastAPI routes turn into an HTTP 4xx with ``{"detail": message}``."""
    return HTTPException(status_code=status, detail=message)


def json_value(request: dict[str, Any], key: str, default: Any = None) -> Any:
    """``request[key]``, decoding it when a client sent a JSON string (config cells are strings)."""
    value = request.get(key, default)
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            return parse_json(value, f"'{key}'")
        except UserInputError as e:
            raise bad_request(f"{e} ({value[:80]!r})") from e
    return value


def question_text(request: dict[str, Any], key: str = "question") -> str:
    """The free-text question; required, at most ``MAX_TEXT_CHARS`` characters."""
    value = request.get(key)
    if value is not None and not isinstance(value, str):
        raise bad_request(f"'{key}' must be text (a question in words), got {str(value)[:80]}")
    if not isinstance(value, str) or not value.strip():
        raise bad_request(f"'{key}' is missing or empty: give the question as text")
    value = value.strip()
    if len(value) > MAX_TEXT_CHARS:
        raise bad_request(f"'{key}' has {len(value)} characters; at most {MAX_TEXT_CHARS} are accepted")
    return value


def grounding_texts(request: dict[str, Any], key: str = "text") -> list[str]:
    """What to ground: one text, or several separated by commas or semicolons (or a JSON list)."""
    value = json_value(request, key)
    if isinstance(value, str):
        texts = [t.strip() for t in value.replace(";", ",").split(",")]
    elif isinstance(value, list) and all(isinstance(t, str) for t in value):
        texts = [t.strip() for t in value]
    elif value is None:
        raise bad_request(f'\'{key}\' is missing: give what to segment, e.g. "liver" or "liver, spleen"')
    else:
        raise bad_request(f'\'{key}\' must be text (e.g. "liver" or "liver, spleen"), got {str(value)[:80]}')
    texts = [t for t in texts if t]
    if not texts:
        raise bad_request(f"'{key}' is empty: give what to segment, e.g. \"liver\"")
    if len(texts) > MAX_TEXTS:
        raise bad_request(f"'{key}' names {len(texts)} targets; at most {MAX_TEXTS} per request")
    for t in texts:
        if len(t) > MAX_TEXT_CHARS:
            raise bad_request(f"'{key}' entry has {len(t)} characters; at most {MAX_TEXT_CHARS}")
    return texts


def refine_target(request: dict[str, Any], key: str = "text") -> str | None:
    """The one structure whose grounding click refinement starts from; None when the request names none."""
    value = request.get(key)
    if value is None or isinstance(value, str) and not value.strip():
        return None
    texts = grounding_texts(request, key)
    if len(texts) > 1:
        raise bad_request(f"'{key}' names {len(texts)} targets; refinement starts from one (e.g. \"liver\")")
    return texts[0]


def voxel_points(value: Any, shape: Sequence[int], key: str) -> list[Point]:
    """``[[i, j, k], ...]`` voxel indices (Slicer rounds RAS->IJK; OHIF rounds world->index), all inside."""
    if value in (None, "", []):
        return []
    if not isinstance(value, list) or not all(isinstance(p, list | tuple) for p in value):
        raise bad_request(f"'{key}' must be a list of [i, j, k] voxel indices, got {str(value)[:80]}")
    points = []
    for p in value:
        if len(p) != 3 or not all(_is_number(c) for c in p):
            raise bad_request(f"'{key}' point {p} is not [i, j, k] (three finite numbers)")
        ijk = tuple(int(round(c)) for c in p)
        if not all(0 <= c < n for c, n in zip(ijk, shape[:3])):
            raise bad_request(f"'{key}' point {list(ijk)} is outside the volume of shape {list(shape[:3])}")
        points.append(ijk)
    return points


def ohif_points(request: dict[str, Any], shape: Sequence[int]) -> tuple[list[Point], list[Point]]:
    """OHIF v3 (vista3d-style) ``points`` + ``point_labels`` (1 = foreground, 0 = background)."""
    points = voxel_points(json_value(request, "points"), shape, "points")
    labels = json_value(request, "point_labels") or []
    if not isinstance(labels, list) or len(labels) != len(points):
        raise bad_request(f"'point_labels' must give one label per point ({len(points)}), got {labels}")
    if any(label not in (0, 1, -1) for label in labels):
        raise bad_request(f"'point_labels' must be 1 (foreground), 0 (background) or -1 (ignore): {labels}")
    fg = [p for p, label in zip(points, labels) if label == 1]
    bg = [p for p, label in zip(points, labels) if label == 0]
    return fg, bg


def clicks(request: dict[str, Any], shape: Sequence[int]) -> tuple[list[Point], list[Point]]:
    """Foreground / background clicks from either client (Slicer/OHIF deepgrow keys or OHIF points)."""
    fg = voxel_points(json_value(request, "foreground"), shape, "foreground")
    bg = voxel_points(json_value(request, "background"), shape, "background")
    if request.get("points") not in (None, "", []):
        more_fg, more_bg = ohif_points(request, shape)
        fg, bg = fg + more_fg, bg + more_bg
    return fg, bg


def roi_box(value: Any, shape: Sequence[int]) -> tuple[int, int, int, int, int, int] | None:
    """Slicer's ROI ``[i0, i1, j0, j1, k0, k1]`` (corners per axis, either order) clipped to the volume.

    Slicer rounds both corners of the ROI after RAS->IJK, so a "min" may be larger than its "max"; the
    result is inclusive ``(i_min, i_max, j_min, j_max, k_min, k_max)``. ``None`` when no ROI was sent.
    """
    if value in (None, "", []):
        return None
    if not isinstance(value, list) or len(value) != 6 or not all(_is_number(c) for c in value):
        raise bad_request(
            f"'roi' must be [i0, i1, j0, j1, k0, k1] (six finite numbers), got {str(value)[:80]}"
        )
    box = []
    for axis in range(3):
        a, b = sorted(int(round(c)) for c in value[2 * axis : 2 * axis + 2])
        lo, hi = max(a, 0), min(b, shape[axis] - 1)
        if lo > hi:
            raise bad_request(f"'roi' {value} does not overlap the volume of shape {list(shape[:3])}")
        box += [lo, hi]
    if box[0] == box[1] or box[2] == box[3]:
        raise bad_request(f"'roi' {value} is empty in the slice plane (zero width or height)")
    return tuple(box)  # type: ignore[return-value]


def slice_index(request: dict[str, Any], shape: Sequence[int], *candidates: Sequence[Point]) -> int | None:
    """The axial (k) slice to work on: Slicer's ``slice``, else the k of the last click, else ``None``.

    Slicer sends ``slice: null`` when the current slice is 0 (it treats 0 as "no slice"), so the clicks
    are the fallback; OHIF never sends ``slice`` and the server derives it from the points.
    """
    value = request.get("slice")
    if value not in (None, "", "auto"):
        try:
            k = parse_int(value, "'slice'")
        except UserInputError as e:
            raise bad_request(f"{e} (a slice index)") from e
        if not 0 <= k < shape[2]:
            raise bad_request(f"'slice' {k} is outside the volume ({shape[2]} slices: 0-{shape[2] - 1})")
        return k
    for points in candidates:
        if points:
            return points[-1][2]
    return None


def slice_selection(value: Any, depth: int) -> list[int] | None:
    """Grounding's ``slices`` option: ``"all"`` / empty (every slice), ``"k"``, ``"a-b"`` or ``"a,b,c"``;
    bounded by the volume before any list is built."""
    if value == []:
        return None
    try:
        return parse_slice_selection(value, depth, "'slices'")
    except UserInputError as e:
        raise bad_request(str(e)) from e


def _is_number(value: Any) -> bool:
    """A finite int or float; booleans (JSON true / false) are not coordinates."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
