"""Real test volumes in several storage orientations (same anatomy, same world positions).

``lits_variant(name)`` returns the LiTS CT / label re-stored with a different voxel order and the affine
that keeps every voxel at the same RAS position, so an anatomical slice must come out identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from monai_medplib.data.lits import load_lits_case

# name -> (axis permutation of the stored array, axes flipped after permuting, extra world rotation in degrees)
VARIANTS: dict[str, tuple[tuple[int, int, int], tuple[int, ...], tuple[float, float]]] = {
    "lps": ((0, 1, 2), (), (0.0, 0.0)),  # as DICOM-derived NIfTI usually are
    "ras": ((0, 1, 2), (0, 1), (0.0, 0.0)),  # canonical RAS voxel order
    "permuted_flipped": ((2, 0, 1), (0,), (0.0, 0.0)),  # slices first, stored superior -> inferior
    "oblique": ((0, 1, 2), (), (8.0, 5.0)),  # LPS grid tilted 8 deg about z and 5 deg about x
}


@dataclass(frozen=True)
class Variant:
    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    to_native: np.ndarray  # 4x4: this variant's voxel -> the native (LPS) voxel


def _rotation(about_z: float, about_x: float) -> np.ndarray:
    z, x = np.deg2rad(about_z), np.deg2rad(about_x)
    rz = np.array([[np.cos(z), -np.sin(z), 0, 0], [np.sin(z), np.cos(z), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    rx = np.array([[1, 0, 0, 0], [0, np.cos(x), -np.sin(x), 0], [0, np.sin(x), np.cos(x), 0], [0, 0, 0, 1]])
    return rz @ rx


# a non-cubic crop, so that swapped rows / columns / slices cannot go unnoticed
NATIVE_CROP = (slice(0, 124), slice(4, 120), slice(10, 128))


def lits_variant(name: str) -> Variant:
    case = load_lits_case()
    perm, flips, (about_z, about_x) = VARIANTS[name]
    native_image, native_label = case.image[NATIVE_CROP], case.label[NATIVE_CROP]
    native_affine = case.affine.copy()
    native_affine[:3, 3] = case.affine[:3, :3] @ np.array([s.start for s in NATIVE_CROP], dtype=np.float64)
    shape = native_image.shape
    to_native = np.zeros((4, 4))
    to_native[3, 3] = 1.0
    for new_axis, old_axis in enumerate(perm):
        flipped = new_axis in flips
        to_native[old_axis, new_axis] = -1.0 if flipped else 1.0
        to_native[old_axis, 3] = shape[old_axis] - 1 if flipped else 0.0

    def restore(array: np.ndarray) -> np.ndarray:
        out = np.transpose(array, perm)
        return np.ascontiguousarray(np.flip(out, flips) if flips else out)

    affine = _rotation(about_z, about_x) @ native_affine @ to_native
    return Variant(restore(native_image), restore(native_label), affine, to_native)
