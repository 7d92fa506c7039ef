"""Files in and out: NIfTI / NRRD / DICOM series in; NIfTI, DICOM series, DICOM-SEG, PNG and JSON out, geometry
preserved and every write atomic.

Names load on first use: ``monai_medplib.io.atomic`` (used by the checkpoint writer) must not pull in ITK and
highdicom.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from typing import Any

# MONAI's LoadImage builds every default reader on each construction, the GPU DICOM decoder (nvImageCodec)
# included; without that optional package it logs a warning and warns again, on every volume read. We never pick
# that reader, so both lines are noise for every command, bundle run and server request.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings(
    "ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register"
)
# highdicom logs about ten INFO lines per DICOM-SEG it builds (each module copied from the source series): noise
# wherever logging runs at INFO (the bundle, MONAI Label). Its warnings and errors still show.
logging.getLogger("highdicom").setLevel(logging.WARNING)

_EXPORTS = {
    "ALGORITHM_NAME": "dicom_seg",
    "source_frames": "dicom_seg",
    "write_dicom_seg": "dicom_seg",
    "dicom_frame_count": "dicom_image",
    "read_dicom_image": "dicom_image",
    "choose_rescale": "dicom_series",
    "write_dicom_series": "dicom_series",
    "save_nifti": "nifti",
    "LoadVolume": "readers",
    "LoadVolumeD": "readers",
    "LoadVolumeDict": "readers",
    "LoadVolumed": "readers",
    "find_dicom_series": "readers",
    "load_volume": "readers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
