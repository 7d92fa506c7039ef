"""Prompts (points, boxes, scribbles) between volume voxels / world points and 2D slice pixels.

Uses the slice geometry of ``slicing.py`` (radiological display orientation; slice index = voxel index
along the source axis). 2D points are ``(x, y)`` = (column, row) and boxes ``(x0, y0, x1, y1)`` with
inclusive pixel corners, as SAM-family models and MedPLIB's demo expect.

3D Slicer conventions: a click arrives as an IJK voxel ``(i, j, k)`` of the volume as loaded (same voxel
order as the file, which is what MONAI's readers keep), an ROI as ``[i0, i1, j0, j1, k0, k1]`` with
corners rounded to voxels (either order; inclusive). World points are RAS millimetres (Slicer's world)
unless ``space="LPS"`` (DICOM patient coordinates).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from monai_medplib.transforms.slicing import SliceGeometry, check_volume, slice_geometry, volume_affine_ras

__all__ = [
    "geometry_for",
    "voxel_to_slice_point",
    "slice_point_to_voxel",
    "world_to_voxel",
    "voxel_to_world",
    "world_to_slice_point",
    "roi_to_slice_boxes",
    "scribbles_to_slice_masks",
    "MapPromptsToSliced",
    "MapPromptsToSliceD",
    "MapPromptsToSliceDict",
]

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def geometry_for(img: torch.Tensor, axis: str) -> SliceGeometry:
    """Slice geometry of a channel-first volume (MetaTensor affine) for the named plane."""
    check_volume(img)
    return slice_geometry(volume_affine_ras(img), img.shape[1:], axis)


def _check_inside(ijk: Sequence[float], shape: Sequence[int], what: str) -> None:
    if len(ijk) != 3:
        raise ValueError(f"{what} {tuple(ijk)} must have 3 coordinates")
    outside = [d for d in range(3) if not -0.5 <= ijk[d] < shape[d] - 0.5]
    if outside:
        raise ValueError(
            f"{what} {tuple(float(c) for c in ijk)} is outside the volume of shape {tuple(shape)}"
        )


def voxel_to_slice_point(geometry: SliceGeometry, ijk: Sequence[float]) -> tuple[int, int, int]:
    """IJK voxel -> (slice index, x, y) on the geometry's plane. Raises ValueError naming an outside point."""
    if len(ijk) != 3:
        raise ValueError(f"voxel point {tuple(ijk)} must have 3 coordinates (i, j, k)")
    _check_inside(ijk, geometry.spatial_shape, "voxel point")
    index, x, y = geometry.voxel_to_pixel([round(float(c)) for c in ijk])
    return index, int(x), int(y)


def slice_point_to_voxel(geometry: SliceGeometry, index: int, x: int, y: int) -> tuple[int, int, int]:
    """(slice index, x, y) -> IJK voxel. Raises ValueError naming a point outside the slice or volume."""
    rows, cols = geometry.slice_shape
    if not (0 <= x < cols and 0 <= y < rows):
        raise ValueError(
            f"slice point (x={x}, y={y}) is outside the {geometry.axis} slice of size {cols}x{rows} (WxH)"
        )
    geometry.check_index(index)
    return tuple(int(round(c)) for c in geometry.pixel_to_voxel(index, x, y))  # type: ignore[return-value]


def world_to_voxel(affine: np.ndarray, point: Sequence[float], space: str = "RAS") -> np.ndarray:
    """World point (mm, RAS or LPS) -> continuous voxel coordinates (i, j, k) for a voxel -> RAS ``affine``."""
    ras = _world_as_ras(point, space)
    return (np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ np.append(ras, 1.0))[:3]


def voxel_to_world(affine: np.ndarray, ijk: Sequence[float], space: str = "RAS") -> np.ndarray:
    """Voxel (i, j, k) -> world point (mm) in RAS or LPS."""
    ras = (np.asarray(affine, dtype=np.float64) @ np.append(np.asarray(ijk, dtype=np.float64), 1.0))[:3]
    return ras if space.upper() == "RAS" else (_LPS[:3, :3] @ ras)


def _world_as_ras(point: Sequence[float], space: str) -> np.ndarray:
    if len(point) != 3:
        raise ValueError(f"world point {tuple(point)} must have 3 coordinates")
    if space.upper() not in ("RAS", "LPS"):
        raise ValueError(f"world space must be 'RAS' or 'LPS', got {space!r}")
    p = np.asarray(point, dtype=np.float64)
    return p if space.upper() == "RAS" else _LPS[:3, :3] @ p


def world_to_slice_point(
    geometry: SliceGeometry, affine: np.ndarray, point: Sequence[float], space: str = "RAS"
) -> tuple[int, int, int]:
    """World point -> (slice index, x, y) of the nearest voxel. Raises ValueError naming an outside point."""
    ijk = world_to_voxel(affine, point, space)
    try:
        _check_inside(ijk, geometry.spatial_shape, "voxel")
    except ValueError as err:
        raise ValueError(
            f"world point {tuple(float(c) for c in point)} ({space}) is outside the volume: {err}"
        ) from None
    return voxel_to_slice_point(geometry, ijk)


def roi_to_slice_boxes(geometry: SliceGeometry, roi: Sequence[float]) -> dict[int, tuple[int, int, int, int]]:
    """Slicer ROI ``[i0, i1, j0, j1, k0, k1]`` -> ``{slice index: (x0, y0, x1, y1)}`` for every slice it covers.

    Corners are inclusive; the ROI is clipped to the volume (Slicer ROIs often overhang it). An ROI that does
    not overlap the volume is a ValueError naming it.
    """
    if len(roi) != 6:
        raise ValueError(f"ROI {list(roi)} must be [i0, i1, j0, j1, k0, k1]")
    bounds = []
    for d in range(3):
        low, high = sorted((round(float(roi[2 * d])), round(float(roi[2 * d + 1]))))
        low, high = max(low, 0), min(high, geometry.spatial_shape[d] - 1)
        if low > high:
            raise ValueError(f"ROI {list(roi)} does not overlap the volume of shape {geometry.spatial_shape}")
        bounds.append((low, high))
    corners = [
        geometry.voxel_to_pixel([bounds[0][a], bounds[1][b], bounds[2][c]])
        for a in (0, 1)
        for b in (0, 1)
        for c in (0, 1)
    ]
    xs = [int(c[1]) for c in corners]
    ys = [int(c[2]) for c in corners]
    box = (min(xs), min(ys), max(xs), max(ys))
    low, high = bounds[geometry.slice_dim]
    return {index: box for index in range(low, high + 1)}


def scribbles_to_slice_masks(
    geometry: SliceGeometry, scribbles: torch.Tensor | np.ndarray, label: int | None = None
) -> dict[int, np.ndarray]:
    """Scribble label volume ``(X, Y, Z)`` or ``(1, X, Y, Z)`` -> ``{slice index: bool (H, W) mask}``.

    Only slices with a scribble are returned. ``label`` keeps one scribble value; None keeps every non-zero.
    """
    array = scribbles.detach().cpu().numpy() if isinstance(scribbles, torch.Tensor) else np.asarray(scribbles)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if tuple(array.shape) != geometry.spatial_shape:
        raise ValueError(
            f"scribble volume shape {array.shape} differs from the image's {geometry.spatial_shape}"
        )
    marked = array != 0 if label is None else array == label
    volume = torch.from_numpy(marked[None])
    present = marked.any(axis=tuple(d for d in range(3) if d != geometry.slice_dim))
    return {int(i): geometry.take(volume, int(i))[0].numpy() for i in np.flatnonzero(present)}


class MapPromptsToSliced(MapTransform):
    """Map a Slicer-style prompt of the volume under ``ref_key`` to one slice of the named plane.

    Reads, when present, ``points_key`` (list of IJK voxels), ``roi_key`` (``[i0, i1, j0, j1, k0, k1]``) and
    ``scribbles_key`` (label volume); writes ``slice_key`` (the slice index: ``d[slice_key]`` if already set,
    else the first point's slice, else the ROI's middle slice, else the scribbles' middle slice), and on that
    slice ``points_2d`` (``(x, y)`` list), ``box_2d`` (``(x0, y0, x1, y1)``) and ``mask_2d`` (bool H x W).
    Points on other slices are a ValueError naming them.
    """

    def __init__(
        self,
        keys: KeysCollection = ("points", "roi", "scribbles"),
        ref_key: Hashable = "image",
        axis: str = "axial",
        slice_key: Hashable = "slice_index",
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ref_key, self.axis, self.slice_key = ref_key, axis, slice_key
        self.points_key, self.roi_key, self.scribbles_key = (tuple(self.keys) + (None, None, None))[:3]

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        if self.ref_key not in d:
            raise KeyError(f"reference image key {self.ref_key!r} not in the data (keys: {list(d)})")
        geometry = geometry_for(d[self.ref_key], self.axis)  # type: ignore[arg-type]
        given = d.get(self.points_key)  # a list, an array or a tensor of (i, j, k) voxels
        points = [voxel_to_slice_point(geometry, p) for p in ([] if given is None else given)]
        boxes = roi_to_slice_boxes(geometry, d[self.roi_key]) if d.get(self.roi_key) is not None else {}
        masks = (
            scribbles_to_slice_masks(geometry, d[self.scribbles_key])
            if d.get(self.scribbles_key) is not None
            else {}
        )
        index = d.get(self.slice_key)
        if index is None:
            candidates = [p[0] for p in points] or sorted(boxes) or sorted(masks)
            if not candidates:
                raise ValueError(f"no prompt found under {self.keys} to choose a slice from")
            index = points[0][0] if points else candidates[len(candidates) // 2]
        index = geometry.check_index(int(index))  # type: ignore[arg-type]
        stray = [p for p in points if p[0] != index]
        if stray:
            raise ValueError(f"prompt points {stray} (slice, x, y) are not on {self.axis} slice {index}")
        d[self.slice_key] = index
        d["points_2d"] = [(x, y) for _, x, y in points]
        d["box_2d"] = boxes.get(index)
        d["mask_2d"] = masks.get(index, np.zeros(geometry.slice_shape, dtype=bool))
        return d


MapPromptsToSliceD = MapPromptsToSliceDict = MapPromptsToSliced
