"""Write 3D volumes (labels, predictions) as NIfTI with the source image's affine."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor

from ..transforms.slicing import volume_affine_ras
from .atomic import atomic_path

__all__ = ["save_nifti"]


def save_nifti(
    volume: np.ndarray | torch.Tensor,
    path: str | Path,
    affine: np.ndarray | torch.Tensor | None = None,
    dtype: np.dtype | type | None = np.uint8,
) -> Path:
    """Save a 3D volume ``(X, Y, Z)`` or ``(1, X, Y, Z)`` as NIfTI (sform and qform = the RAS ``affine``).

    Args:
        volume: the label / image in the voxel grid of its source volume.
        path: ``.nii`` or ``.nii.gz`` file to write (parent folders are created).
        affine: voxel -> RAS affine; default the MetaTensor's own (``meta["space"] == "LPS"`` converted).
        dtype: on-disk data type (``uint8`` for labels); None keeps the input's.
    """
    path = Path(path)
    if not path.name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"NIfTI output must end in .nii or .nii.gz: {path}")
    if affine is None and not isinstance(volume, MetaTensor):
        raise ValueError("save_nifti needs an affine for a plain array (pass the source image's affine)")
    ras = volume_affine_ras(volume, None if affine is None else np.asarray(affine))
    array = volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"save_nifti writes 3D volumes (X, Y, Z) or (1, X, Y, Z), got shape {array.shape}")
    if dtype is not None:
        array = array.astype(dtype)
    image = nib.Nifti1Image(array, ras)
    image.set_sform(ras, code=1)
    image.set_qform(ras, code=1)
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))
    return path
