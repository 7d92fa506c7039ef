"""Invertible 3D -> 2D slice extraction along a named anatomical axis.

Conventions (one home for them; the prompt mapping in ``prompts.py`` uses the same geometry):

* Input volumes are channel-first ``(C, X, Y, Z)`` with a voxel -> world affine. The world is RAS+
  (x grows towards the patient's Right, y towards Anterior, z towards Superior), as MONAI's readers
  produce by default; a ``MetaTensor`` whose ``meta["space"]`` is ``"LPS"`` is converted to RAS first.
* The voxel axis normal to the requested plane is the one whose direction is closest to the plane's
  world normal (``nibabel.orientations.io_orientation``): "axial" always cuts across the
  superior-inferior axis, "coronal" across anterior-posterior, "sagittal" across left-right, whatever
  the voxel order (RAS, LPS, permuted, flipped) and for mildly oblique volumes (nearest axis, no
  resampling, so an oblique volume gives its slices as stored).
* In-plane orientation follows the radiological display convention (the 2D array is ``(C, H, W)``,
  row 0 at the top of the displayed image, column 0 at its left):

  ===========  =================================  ==================================
  plane        rows (top -> bottom)               columns (left -> right)
  ===========  =================================  ==================================
  axial        anterior -> posterior              patient right -> patient left
  coronal      superior -> inferior               patient right -> patient left
  sagittal     superior -> inferior               anterior -> posterior
  ===========  =================================  ==================================

  i.e. axial slices are seen from the feet, coronal slices from the front, sagittal slices from the
  patient's left with the face on the image left: what a radiologist sees in a PACS or 3D Slicer's
  default views, and how CT slices (DICOM row/column order) are usually stored and shown.
* The slice index is the voxel index along the source volume's own axis (not a re-sorted index), so
  a 3D Slicer IJK voxel ``(i, j, k)`` on an axial slice of a volume with z as the third axis has slice
  index ``k``. Each 2D result carries ``meta["slice_origin"]`` (world position of pixel (0, 0)) so
  slices of differently stored volumes can be matched by position.
* 2D pixel coordinates are given as ``(x, y)`` = ``(column, row)``, the SAM convention.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform, Transform
from monai.transforms.traits import MultiSampleTrait
from monai.utils import SpaceKeys, TransformBackends, convert_to_tensor
from nibabel.orientations import io_orientation

from .planes import AXES, PLANES

__all__ = [
    "AXES",
    "PLANES",
    "SliceGeometry",
    "slice_geometry",
    "plane_along_voxel_axis",
    "volume_affine_ras",
    "check_volume",
    "ExtractSlice",
    "ExtractSliced",
    "ExtractSliceD",
    "ExtractSliceDict",
    "ExtractSlices",
    "slices_to_volume",
]


def _plane(axis: str) -> tuple[int, tuple[int, int], tuple[int, int]]:
    if axis not in PLANES:
        raise ValueError(f"unknown slice axis {axis!r}; expected one of {sorted(PLANES)}")
    return PLANES[axis]


def check_volume(img: torch.Tensor | np.ndarray, name: str = "image") -> None:
    """Raise a ValueError unless ``img`` is a channel-first 3D volume ``(C, X, Y, Z)`` with finite size."""
    shape = tuple(img.shape)
    if len(shape) == 3:
        raise ValueError(
            f"{name} has shape {shape}: expected a channel-first 3D volume (C, X, Y, Z); this looks like a "
            "2D image with channels or a 3D volume without a channel dimension (add one with EnsureChannelFirst)"
        )
    if len(shape) != 4:
        raise ValueError(
            f"{name} has shape {shape} ({len(shape) - 1} spatial dims after the channel): expected a "
            "channel-first 3D volume (C, X, Y, Z); split 4D / time series into 3D volumes first"
        )
    if min(shape) < 1:
        raise ValueError(f"{name} has an empty dimension: shape {shape}")


def volume_affine_ras(img: torch.Tensor | np.ndarray, affine: np.ndarray | None = None) -> np.ndarray:
    """The 4x4 voxel -> RAS world affine of a volume (``affine`` wins over ``img.affine``; identity if none)."""
    if affine is None and isinstance(img, MetaTensor):
        affine = img.affine
        if img.meta.get("space", SpaceKeys.RAS) == SpaceKeys.LPS:
            affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)
    if affine is None:
        return np.eye(4)
    affine = np.asarray(affine.cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"expected a 4x4 voxel-to-world affine for a 3D volume, got shape {affine.shape}")
    return affine


@dataclass(frozen=True)
class SliceGeometry:
    """Where the rows, columns and slices of one anatomical plane lie in a volume's voxel grid.

    Attributes:
        axis: "axial", "coronal" or "sagittal".
        spatial_shape: the volume's (X, Y, Z).
        slice_dim: voxel axis (0-2) the slice index runs along.
        row_dim: voxel axis the 2D rows run along.
        col_dim: voxel axis the 2D columns run along.
        row_flip: True where row 0 is the last voxel along ``row_dim``.
        col_flip: True where column 0 is the last voxel along ``col_dim``.
    """

    axis: str
    spatial_shape: tuple[int, int, int]
    slice_dim: int
    row_dim: int
    col_dim: int
    row_flip: bool
    col_flip: bool

    @property
    def num_slices(self) -> int:
        return self.spatial_shape[self.slice_dim]

    @property
    def slice_shape(self) -> tuple[int, int]:
        """(H, W) of every 2D slice."""
        return self.spatial_shape[self.row_dim], self.spatial_shape[self.col_dim]

    def check_index(self, index: int) -> int:
        if isinstance(index, bool | str) or not float(index).is_integer():
            raise ValueError(f"{self.axis} slice index must be an integer, got {index!r}")
        index = int(index)
        if not 0 <= index < self.num_slices:
            raise ValueError(
                f"{self.axis} slice index {index} is outside the volume: valid 0..{self.num_slices - 1} "
                f"(voxel axis {self.slice_dim} of shape {self.spatial_shape})"
            )
        return index

    def pixel_to_voxel_matrix(self, index: int) -> np.ndarray:
        """4x4 matrix mapping homogeneous (row, col, 0, 1) on slice ``index`` to voxel (i, j, k, 1)."""
        m = np.zeros((4, 4))
        m[3, 3] = 1.0
        n_rows, n_cols = self.slice_shape
        m[self.row_dim, 0] = -1.0 if self.row_flip else 1.0
        m[self.row_dim, 3] = n_rows - 1 if self.row_flip else 0.0
        m[self.col_dim, 1] = -1.0 if self.col_flip else 1.0
        m[self.col_dim, 3] = n_cols - 1 if self.col_flip else 0.0
        m[self.slice_dim, 2] = 1.0
        m[self.slice_dim, 3] = index
        return m

    def voxel_to_pixel(self, ijk: Sequence[float]) -> tuple[int, float, float]:
        """Voxel (i, j, k) -> (slice index, x = column, y = row). Integer voxels give integer pixels."""
        v = [ijk[0], ijk[1], ijk[2]]
        n_rows, n_cols = self.slice_shape
        row = n_rows - 1 - v[self.row_dim] if self.row_flip else v[self.row_dim]
        col = n_cols - 1 - v[self.col_dim] if self.col_flip else v[self.col_dim]
        return int(round(v[self.slice_dim])), col, row

    def pixel_to_voxel(self, index: int, x: float, y: float) -> tuple[float, float, float]:
        """(slice index, x = column, y = row) -> voxel (i, j, k)."""
        v = self.pixel_to_voxel_matrix(index) @ np.array([y, x, 0.0, 1.0])
        return tuple(float(c) for c in v[:3])  # type: ignore[return-value]

    def take(self, volume: torch.Tensor, index: int) -> torch.Tensor:
        """The 2D slice ``(C, H, W)`` of a ``(C, X, Y, Z)`` tensor in the display orientation."""
        index = self.check_index(index)
        plane = volume.select(self.slice_dim + 1, index)
        # remaining spatial dims keep their order; put rows first
        remaining = [d for d in range(3) if d != self.slice_dim]
        if remaining.index(self.row_dim) == 1:
            plane = plane.transpose(1, 2)
        flips = [dim for dim, flip in ((1, self.row_flip), (2, self.col_flip)) if flip]
        return plane.flip(flips) if flips else plane

    def put(self, volume: torch.Tensor, plane: torch.Tensor, index: int) -> None:
        """Write a display-oriented ``(C, H, W)`` slice into ``volume`` ``(C, X, Y, Z)`` at ``index``."""
        index = self.check_index(index)
        if tuple(plane.shape[1:]) != self.slice_shape:
            raise ValueError(
                f"2D {self.axis} result has spatial shape {tuple(plane.shape[1:])}, expected {self.slice_shape} "
                "(undo resizing / padding before putting it back into the volume)"
            )
        flips = [dim for dim, flip in ((1, self.row_flip), (2, self.col_flip)) if flip]
        plane = plane.flip(flips) if flips else plane
        remaining = [d for d in range(3) if d != self.slice_dim]
        if remaining.index(self.row_dim) == 1:
            plane = plane.transpose(1, 2)
        volume.select(self.slice_dim + 1, index).copy_(plane)


def slice_geometry(affine: np.ndarray, spatial_shape: Sequence[int], axis: str) -> SliceGeometry:
    """Geometry of the named plane for a volume with a voxel -> RAS ``affine`` and ``spatial_shape`` (X, Y, Z)."""
    normal, (row_world, row_sign), (col_world, col_sign) = _plane(axis)
    affine = np.asarray(affine, dtype=np.float64)
    if (
        affine.shape != (4, 4)
        or not np.all(np.isfinite(affine))
        or abs(np.linalg.det(affine[:3, :3])) < 1e-12
    ):
        raise ValueError(f"the volume's affine must be an invertible 4x4 matrix, got\n{affine}")
    ornt = io_orientation(affine)  # per voxel axis: (world axis, +1 / -1 = voxel index grows towards +world)
    world_to_voxel = {int(world): (dim, int(sign)) for dim, (world, sign) in enumerate(ornt)}
    row_dim, row_voxel_sign = world_to_voxel[row_world]
    col_dim, col_voxel_sign = world_to_voxel[col_world]
    return SliceGeometry(
        axis=axis,
        spatial_shape=tuple(int(s) for s in spatial_shape),  # type: ignore[arg-type]
        slice_dim=world_to_voxel[normal][0],
        row_dim=row_dim,
        col_dim=col_dim,
        row_flip=row_voxel_sign != row_sign,
        col_flip=col_voxel_sign != col_sign,
    )


def plane_along_voxel_axis(img: torch.Tensor | np.ndarray, voxel_axis: int = 2) -> str:
    """The anatomical plane whose slices are indexed by spatial voxel axis ``voxel_axis`` of ``img``.

    3D Slicer's ``slice`` (and IJK ``k``) runs along voxel axis 2: "axial" for the usual axially stored
    CT / MR, "coronal" for a coronally stored volume.
    """
    check_volume(img)
    affine = volume_affine_ras(img)
    for axis in PLANES:
        if slice_geometry(affine, img.shape[1:], axis).slice_dim == voxel_axis:
            return axis
    raise ValueError(f"no anatomical plane runs along voxel axis {voxel_axis} of shape {tuple(img.shape)}")


def _geometry_of(img: torch.Tensor, axis: str) -> tuple[SliceGeometry, np.ndarray]:
    check_volume(img)
    affine = volume_affine_ras(img)
    return slice_geometry(affine, img.shape[1:], axis), affine


def _slice_affines(geometry: SliceGeometry, affine: np.ndarray, index: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact 4x4 (row, col, 0) -> world affine of a slice, and the 3x3 in-plane affine MONAI expects for 2D.

    The 3x3 drops the slice column and the world row of the plane normal, as ``SqueezeDim(update_meta=True)``
    would.
    """
    full = affine @ geometry.pixel_to_voxel_matrix(index)
    normal = PLANES[geometry.axis][0]
    keep = [r for r in range(3) if r != normal] + [3]
    return full, full[np.ix_(keep, [0, 1, 3])]


class ExtractSlice(InvertibleTransform):
    """Cut one 2D slice along a named anatomical plane from a channel-first 3D volume.

    The output is a ``(C, H, W)`` MetaTensor in the radiological display orientation documented in this
    module, with a 3x3 in-plane affine and ``meta`` keys ``slice_axis``, ``slice_index``, ``slice_affine``
    (exact 4x4 (row, col, 0) -> RAS world) and ``slice_origin``. The inverse puts a 2D result (any channel
    count) back at its slice in a zero volume of the original shape and affine, so ``Invertd`` works.

    Args:
        axis: "axial", "coronal" or "sagittal".
        index: slice index along the source voxel axis; None = the middle slice.
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, axis: str = "axial", index: int | None = None) -> None:
        _plane(axis)
        self.axis = axis
        self.index = index

    def __call__(self, img: torch.Tensor | np.ndarray, index: int | None = None) -> torch.Tensor:
        img = convert_to_tensor(img, track_meta=True)
        geometry, affine = _geometry_of(img, self.axis)
        index = self.index if index is None else index
        index = geometry.num_slices // 2 if index is None else geometry.check_index(index)
        plane = geometry.take(img.as_tensor() if isinstance(img, MetaTensor) else img, index).clone()
        full, in_plane = _slice_affines(geometry, affine, index)
        out = MetaTensor(plane, affine=torch.as_tensor(in_plane, dtype=torch.float64))
        if isinstance(img, MetaTensor):
            out.meta = dict(img.meta)
            out.applied_operations = list(img.applied_operations)
        out.meta["space"] = SpaceKeys.RAS
        out.meta.update(
            slice_axis=self.axis,
            slice_index=index,
            slice_affine=full,
            slice_origin=full[:3, 3].copy(),
        )
        out.affine = torch.as_tensor(in_plane, dtype=torch.float64)
        self.push_transform(
            out,
            orig_size=tuple(geometry.spatial_shape),
            extra_info={
                "axis": self.axis,
                "index": index,
                "slice_dim": geometry.slice_dim,
                "row_dim": geometry.row_dim,
                "col_dim": geometry.col_dim,
                "row_flip": geometry.row_flip,
                "col_flip": geometry.col_flip,
                "affine": affine,
                # the input's own affine and space (LPS from ITK readers), restored by the inverse
                "input_affine": np.asarray(img.affine, dtype=np.float64)
                if isinstance(img, MetaTensor)
                else None,
                "input_space": str(img.meta.get("space", SpaceKeys.RAS))
                if isinstance(img, MetaTensor)
                else None,
            },
        )
        return out

    def inverse(self, data: torch.Tensor) -> torch.Tensor:
        transform = self.pop_transform(data)
        geometry, affine, index = _geometry_from_trace(transform)
        data = convert_to_tensor(data, track_meta=True)
        if data.ndim != 3:
            raise ValueError(
                f"inverse of ExtractSlice expects a (C, H, W) 2D result, got shape {tuple(data.shape)}"
            )
        raw = data.as_tensor() if isinstance(data, MetaTensor) else data
        volume = torch.zeros((raw.shape[0], *geometry.spatial_shape), dtype=raw.dtype, device=raw.device)
        geometry.put(volume, raw, index)
        out = MetaTensor(volume)
        if isinstance(data, MetaTensor):
            out.meta = {k: v for k, v in data.meta.items() if not str(k).startswith("slice_")}
            out.applied_operations = list(data.applied_operations)
        _restore_input_geometry(out, transform, affine)
        return out


def _restore_input_geometry(out: MetaTensor, transform: Mapping, affine_ras: np.ndarray) -> None:
    """The affine and space the sliced volume had (its RAS form for traces of older versions)."""
    info = transform["extra_info"]
    given = info.get("input_affine")
    out.affine = torch.as_tensor(affine_ras if given is None else np.asarray(given), dtype=torch.float64)
    out.meta["space"] = info.get("input_space") or SpaceKeys.RAS


def _geometry_from_trace(transform: Mapping) -> tuple[SliceGeometry, np.ndarray, int]:
    info = transform["extra_info"]
    geometry = SliceGeometry(
        axis=info["axis"],
        spatial_shape=tuple(int(s) for s in transform["orig_size"]),  # type: ignore[arg-type]
        slice_dim=int(info["slice_dim"]),
        row_dim=int(info["row_dim"]),
        col_dim=int(info["col_dim"]),
        row_flip=bool(info["row_flip"]),
        col_flip=bool(info["col_flip"]),
    )
    return geometry, np.asarray(info["affine"], dtype=np.float64), int(info["index"])


class ExtractSlices(Transform, MultiSampleTrait):
    """Every slice (or the listed ``indices``) along a plane, as a list of ``ExtractSlice`` outputs.

    Each element carries its own inverse record, so each can be put back with ``ExtractSlice.inverse`` or
    all at once, cheaply, with :func:`slices_to_volume`.
    """

    backend = ExtractSlice.backend

    def __init__(self, axis: str = "axial", indices: Sequence[int] | None = None) -> None:
        self.extractor = ExtractSlice(axis)
        self.indices = indices

    def __call__(self, img: torch.Tensor | np.ndarray) -> list[torch.Tensor]:
        img = convert_to_tensor(img, track_meta=True)
        geometry, _ = _geometry_of(img, self.extractor.axis)
        indices = range(geometry.num_slices) if self.indices is None else self.indices
        return [self.extractor(img, index=i) for i in indices]

    def inverse(self, data: torch.Tensor) -> torch.Tensor:
        return self.extractor.inverse(data)


def slices_to_volume(slices: Sequence[torch.Tensor], fill: float = 0) -> MetaTensor:
    """Assemble 2D results of ``ExtractSlice`` (same volume, same plane) into one volume.

    Each slice must still carry its ``ExtractSlice`` record as the last applied operation (undo any later
    resizing first). Slices not given stay ``fill``; a slice given twice keeps the last one.
    """
    if not slices:
        raise ValueError("slices_to_volume needs at least one slice")
    volume: torch.Tensor | None = None
    reference: tuple | None = None
    for n, plane in enumerate(slices):
        if not isinstance(plane, MetaTensor) or not plane.applied_operations:
            raise ValueError(f"slice {n} has no ExtractSlice record (was it produced by ExtractSlice?)")
        transform = plane.applied_operations[-1]
        if transform.get("class") != ExtractSlice.__name__:
            raise ValueError(
                f"slice {n}: last applied operation is {transform.get('class')}, not ExtractSlice"
            )
        geometry, affine, index = _geometry_from_trace(transform)
        key = (geometry.axis, geometry.spatial_shape, affine.tobytes())
        if reference is None:
            reference = key
            volume = torch.full((plane.shape[0], *geometry.spatial_shape), fill, dtype=plane.dtype)
        elif key != reference:
            raise ValueError(f"slice {n} comes from a different volume or plane than slice 0")
        geometry.put(volume, plane.as_tensor(), index)  # type: ignore[arg-type]
    out = MetaTensor(volume)
    out.meta = {k: v for k, v in slices[0].meta.items() if not str(k).startswith("slice_")}
    out.applied_operations = list(slices[0].applied_operations[:-1])
    _restore_input_geometry(out, slices[0].applied_operations[-1], affine)
    return out


class ExtractSliced(MapTransform, InvertibleTransform):
    """Dictionary version of :class:`ExtractSlice`.

    Args:
        keys: keys of the volumes to slice (all must share one grid).
        axis: "axial", "coronal" or "sagittal".
        index: fixed slice index; None = ``d[index_key]`` if given, else the middle slice.
        index_key: key holding the slice index per sample (e.g. from a prompt).
        allow_missing_keys: don't raise if a key is missing.
    """

    backend = ExtractSlice.backend

    def __init__(
        self,
        keys: KeysCollection,
        axis: str = "axial",
        index: int | None = None,
        index_key: Hashable | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.extractor = ExtractSlice(axis, index)
        self.index_key = index_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        index = None
        if self.extractor.index is None and self.index_key is not None:  # a fixed index wins (see Args)
            if self.index_key not in d:
                raise KeyError(f"slice index key {self.index_key!r} not found in the data (keys: {list(d)})")
            index = d[self.index_key]  # checked by the extractor: 4.7 is refused, not truncated to 4
        for key in self.key_iterator(d):
            d[key] = self.extractor(d[key], index=index)
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.extractor.inverse(d[key])
        return d


ExtractSliceD = ExtractSliceDict = ExtractSliced
