"""The MNI ICBM152 2009a T1 template with its grey / white matter maps, as shipped inside the ``nilearn`` wheel.

nilearn carries three files of the symmetric 2009a release in ``nilearn/datasets/data/``:
``mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz`` (197 x 233 x 189 voxels of 1 mm, RAS, uint8). The
T1 is skull-stripped; the grey- and white-matter files are tissue probability maps stored as ``255 * p``. They
are read here directly with nibabel (nilearn itself is never imported, so only its data files are needed).

Labels: a voxel is grey matter (1) when its probability is at least :data:`TISSUE_THRESHOLD` (0.5), white matter
(2) likewise, background (0) otherwise; at 0.5 the two classes do not overlap in these maps. The volume is cut
(or zero-padded) to a :data:`MNI_CUBE`-voxel cube centred on the brain, so that every slice of every plane is
square: MedPLIB's mask post-processing (the release crop quirk in ``processing.postprocess_mask_logits``)
stretches the 64x64 mask over a non-square image, which a model trained on square slices never learned.

Licence: nilearn documents the template's licence as "unknown"; the notice of the original MNI archive
(:data:`MNI_NOTICE`) is a permissive copyright notice that must travel with every copy.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "MNI_CUBE",
    "MNI_FILES",
    "MNI_LABELS",
    "MNI_NOTICE",
    "TISSUE_THRESHOLD",
    "MNICase",
    "load_mni_case",
    "mni_data_dir",
]

MNI_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
MNI_LABELS = {0: "background", 1: "grey matter", 2: "white matter"}
TISSUE_THRESHOLD = 0.5  # probability at or above which a voxel belongs to the tissue
MNI_CUBE = 192  # voxels per side after cropping / padding around the brain (the brain spans at most 184)
_PROBABILITY_SCALE = 255.0  # the maps store round(255 * p) as uint8
MNI_NOTICE = (
    "Copyright (C) 1993-2004 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, "
    "McGill University. Permission to use, copy, modify, and distribute this software and its documentation "
    "for any purpose and without fee is hereby granted, provided that the above copyright notice appear in all "
    "copies. The authors and McGill University make no representations about the suitability of this software "
    'for any purpose. It is provided "as is" without express or implied warranty.'
)


@dataclass(frozen=True)
class MNICase:
    """T1 (float32, the template's 0-255 scale), tissue label (uint8, :data:`MNI_LABELS`) and voxel -> RAS affine."""

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray


def mni_data_dir() -> Path:
    """The ``nilearn/datasets/data`` folder of the installed wheel (found without importing nilearn)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the MNI152 example needs the files of the 'nilearn' wheel: pip install --no-deps nilearn"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    missing = [name for name in MNI_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"the nilearn wheel at {folder} lacks the MNI152 files {missing}")
    return folder


def _cube_window(length: int, low: int, high: int, size: int) -> tuple[int, int]:
    """``(start, pad_before)`` of a ``size`` window on an axis of ``length`` voxels centred on ``[low, high]``."""
    if length >= size:
        start = int(np.clip((low + high + 1) // 2 - size // 2, 0, length - size))
        return start, 0
    return 0, (size - length) // 2


def load_mni_case(size: int = MNI_CUBE) -> MNICase:
    """Load the template as a ``size``-voxel cube around the brain (1 mm, RAS) with its tissue label."""
    import nibabel as nib

    folder = mni_data_dir()
    images = {key: nib.load(str(folder / name)) for key, name in MNI_FILES.items()}
    t1 = np.asarray(images["t1"].dataobj, dtype=np.float32)
    grey = np.asarray(images["gm"].dataobj, dtype=np.float32) / _PROBABILITY_SCALE
    white = np.asarray(images["wm"].dataobj, dtype=np.float32) / _PROBABILITY_SCALE
    label = np.zeros(t1.shape, dtype=np.uint8)
    label[grey >= TISSUE_THRESHOLD] = 1
    label[white >= TISSUE_THRESHOLD] = 2  # disjoint from grey matter at 0.5 in these maps
    brain = np.argwhere(label > 0)
    low, high = brain.min(0), brain.max(0)
    image_out = np.zeros((size,) * 3, dtype=np.float32)
    label_out = np.zeros((size,) * 3, dtype=np.uint8)
    src, dst, shift = [], [], []
    for axis, length in enumerate(t1.shape):
        start, pad = _cube_window(length, int(low[axis]), int(high[axis]), size)
        count = min(size, length)
        src.append(slice(start, start + count))
        dst.append(slice(pad, pad + count))
        shift.append(start - pad)  # cube voxel 0 sits at source voxel start - pad
    image_out[tuple(dst)] = t1[tuple(src)]
    label_out[tuple(dst)] = label[tuple(src)]
    affine = np.asarray(images["t1"].affine, dtype=np.float64).copy()
    affine[:3, 3] = affine[:3, :3] @ np.asarray(shift, dtype=np.float64) + affine[:3, 3]
    return MNICase(image=image_out, label=label_out, affine=affine)
