"""The real LiTS abdominal CT (case 117) shipped in the ``liver-ct-segmentation-package`` wheel.

The package stores a 128^3 crop around the liver as two MRC files (1024-byte header, no extended
header, mode 2 = float32 for the CT in Hounsfield units, mode 6 = uint16 for the label 0 = background,
1 = liver, 2 = tumour). MRC keeps no voxel spacing or orientation, so this module fixes them:

* Array order ``[i, j, k]`` = the MRC data block read in C order (section, row, column). Read from the
  anatomy (liver on the patient's right and anterior, spine posterior, kidney inferior to the liver):
  ``i`` grows towards the patient's **Left**, ``j`` towards **Posterior**, ``k`` towards **Superior**,
  i.e. the LPS voxel order a DICOM-derived NIfTI usually has.
* Spacing: not stored; :data:`LITS_SPACING_MM` = 1.5 mm isotropic, estimated from the anatomy (vertebral
  body and kidney sizes). Use it as a plausible value, not a measurement.

:func:`lits_affine` gives the matching voxel -> RAS affine (``diag(-1.5, -1.5, 1.5)``), the one real
scanners' DICOM-to-NIfTI conversion would produce for this voxel order.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

__all__ = ["LITS_SPACING_MM", "LITS_LABELS", "LiTSCase", "lits_affine", "load_lits_case", "read_mrc"]

LITS_SPACING_MM = 1.5
LITS_LABELS = {0: "background", 1: "liver", 2: "tumour"}
_MRC_HEADER_BYTES = 1024
_MRC_DTYPES = {0: np.int8, 1: np.int16, 2: np.float32, 6: np.uint16}


@dataclass(frozen=True)
class LiTSCase:
    """CT in HU (float32) and label (uint8) as ``[i, j, k]`` arrays, with their voxel -> RAS affine."""

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray


def read_mrc(path: str | Path) -> np.ndarray:
    """Read an MRC 2014 volume (modes 0, 1, 2, 6; standard axis mapping) as a (sections, rows, columns) array."""
    path = Path(path)
    raw = path.read_bytes()
    if len(raw) < _MRC_HEADER_BYTES:
        raise ValueError(f"{path} is too short to be an MRC file ({len(raw)} bytes)")
    header = np.frombuffer(raw[:_MRC_HEADER_BYTES], dtype="<i4")
    nx, ny, nz, mode = (int(v) for v in header[:4])
    axis_map = tuple(int(v) for v in header[16:19])
    extended = int(header[23])
    if mode not in _MRC_DTYPES:
        raise ValueError(f"{path}: unsupported MRC mode {mode} (supported: {sorted(_MRC_DTYPES)})")
    if axis_map != (1, 2, 3):
        raise ValueError(f"{path}: MRC axis mapping {axis_map} is not the standard (1, 2, 3)")
    dtype = np.dtype(_MRC_DTYPES[mode]).newbyteorder("<")
    offset = _MRC_HEADER_BYTES + extended
    expected = nx * ny * nz * dtype.itemsize
    if len(raw) - offset != expected:
        raise ValueError(
            f"{path}: header says {nx}x{ny}x{nz} mode {mode} ({expected} bytes) but has {len(raw) - offset}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(nz, ny, nx).astype(dtype.newbyteorder("="))


def lits_affine(spacing: float = LITS_SPACING_MM) -> np.ndarray:
    """Voxel -> RAS affine for the ``[i, j, k]`` = (Left, Posterior, Superior) order of :func:`load_lits_case`."""
    return np.diag([-spacing, -spacing, spacing, 1.0])


def _data_dir() -> Path:
    try:
        return Path(str(resources.files("liver_ct_segmentation_package") / "data"))
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "the LiTS example needs the 'liver-ct-segmentation-package' wheel: "
            "pip install --no-deps liver-ct-segmentation-package==1.6.0"
        ) from err


def load_lits_case() -> LiTSCase:
    """Load LiTS case 117: CT (HU, float32) and liver/tumour label (uint8), both 128^3, with its affine."""
    data = _data_dir()
    image = read_mrc(data / "img_117.mrc").astype(np.float32)
    label = read_mrc(data / "lab_117.mrc")
    if image.shape != label.shape:
        raise ValueError(f"LiTS image {image.shape} and label {label.shape} shapes differ")
    return LiTSCase(image=image, label=label.astype(np.uint8), affine=lits_affine())
