"""Volume I/O: NIfTI / NRRD / DICOM series in; NIfTI, DICOM series and DICOM-SEG out, geometry preserved."""

from monai_medplib.io.dicom_seg import ALGORITHM_NAME, source_frames, write_dicom_seg
from monai_medplib.io.dicom_series import choose_rescale, write_dicom_series
from monai_medplib.io.nifti import save_nifti
from monai_medplib.io.readers import (
    LoadVolume,
    LoadVolumeD,
    LoadVolumed,
    LoadVolumeDict,
    find_dicom_series,
    load_volume,
)

__all__ = [
    "ALGORITHM_NAME",
    "LoadVolume",
    "LoadVolumeD",
    "LoadVolumeDict",
    "LoadVolumed",
    "choose_rescale",
    "find_dicom_series",
    "load_volume",
    "save_nifti",
    "source_frames",
    "write_dicom_seg",
    "write_dicom_series",
]
