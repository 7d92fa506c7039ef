"""Write a 3D volume as a classic single-frame DICOM series (CT or MR) with exact geometry.

Used to wrap volumes that come without DICOM (the LiTS CT, demo data) for tests, the MONAI Label app and
the DICOM-SEG round trip. Voxel ``[i, j, k]`` of the volume becomes pixel (row ``j``, column ``i``) of
file ``k``; ImageOrientationPatient, ImagePositionPatient, PixelSpacing and SliceThickness come from the
voxel -> RAS affine (converted to DICOM's LPS). Intensities are stored as int16 with a RescaleSlope that,
when possible, is a power of two small enough to store every value exactly (e.g. 1/8 HU).
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path

import numpy as np
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from .. import __version__
from .atomic import atomic_path

__all__ = ["write_dicom_series", "choose_rescale"]

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_SOP_CLASSES = {"CT": CTImageStorage, "MR": MRImageStorage}
# ImageType value 3 (a defined term per IOD): a CT cross-section is "AXIAL" whatever its plane (the other CT
# term is LOCALIZER); MR has no term for a resampled slice other than "OTHER".
_IMAGE_TYPE_3 = {"CT": "AXIAL", "MR": "OTHER"}
_INT16 = np.iinfo(np.int16)


def choose_rescale(volume: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) storing ``volume`` in int16: exact when a power-of-two slope allows it."""
    finite = volume[np.isfinite(volume)]
    if finite.size != volume.size:
        raise ValueError("cannot store NaN or infinite voxels in a DICOM series")
    low, high = float(finite.min()), float(finite.max())
    for exponent in range(0, 9):  # slopes 1, 1/2, ..., 1/256
        scale = 2.0**exponent
        # whole intercepts that keep both ends in int16; the one nearest the midpoint (a full 0..65535 range fits
        # only with 32768, which floor(midpoint) misses by one)
        lowest, highest = np.ceil(high - _INT16.max / scale), np.floor(low - _INT16.min / scale)
        if lowest > highest:
            break
        intercept = float(np.clip(np.floor((low + high) / 2), lowest, highest))
        stored = (finite.astype(np.float64) - intercept) * scale
        if np.all(stored == np.round(stored)):
            return 1.0 / scale, intercept
    # Lossy fallback: centre the range on the exact midpoint so both ends fit int16.
    half_span = max((high - low) / 2, 1e-6)
    return half_span / (_INT16.max - 1), (low + high) / 2


def _geometry(affine: np.ndarray) -> tuple[list[float], list[float], float, np.ndarray]:
    lps = _RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)
    col_step, row_step, slice_step = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    col_spacing, row_spacing = float(np.linalg.norm(col_step)), float(np.linalg.norm(row_step))
    along_row, along_col = col_step / col_spacing, row_step / row_spacing
    if abs(float(along_row @ along_col)) > 1e-4:
        raise ValueError(
            "the affine's first two voxel axes are not orthogonal; DICOM pixels must be rectangular"
        )
    normal = np.cross(along_row, along_col)
    if np.linalg.norm(np.cross(normal, slice_step)) > 1e-4 * np.linalg.norm(slice_step):
        raise ValueError(
            "the affine's slice axis is not perpendicular to its slices (sheared); cannot write DICOM"
        )
    orientation = [round(float(v), 8) for v in (*along_row, *along_col)]
    return orientation, [row_spacing, col_spacing], float(np.linalg.norm(slice_step)), lps


def write_dicom_series(
    volume: np.ndarray | torch.Tensor,
    affine: np.ndarray,
    out_dir: str | Path,
    *,
    modality: str = "CT",
    rescale: tuple[float, float] | None = None,
    series_description: str = "monai-medplib volume",
    patient_id: str = "MEDPLIB0001",
    patient_name: str = "MedPLIB^Test",
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    series_number: int = 1,
    body_part: str | None = None,
    patient_position: str = "",
) -> list[Path]:
    """Write ``volume`` ``(X, Y, Z)`` (or ``(1, X, Y, Z)``) as one DICOM file per slice ``k``.

    Args:
        volume: intensities (HU for CT) in voxel order ``[i, j, k]``.
        affine: voxel -> RAS affine; its first two axes must be orthogonal (any orientation, flips allowed).
        out_dir: folder to create; files are named ``slice_0000.dcm`` ...
        modality: "CT" (CT Image Storage) or "MR" (MR Image Storage).
        rescale: (RescaleSlope, RescaleIntercept); default :func:`choose_rescale`.
        series_description, patient_id, patient_name, study_instance_uid, series_instance_uid,
            series_number: identifying attributes (UIDs are generated when None).
        body_part: BodyPartExamined (a DICOM defined term such as "ABDOMEN", "HEAD"); None writes no body part
            and marks the images as of an unpaired region (ImageLaterality "U"), so no Laterality is needed.
        patient_position: PatientPosition ("HFS", "FFS", ...); empty (the default) means unknown, as for a
            volume read from NIfTI.

    Returns:
        The written file paths, in slice order ``k``.
    """
    array = volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"write_dicom_series needs a 3D volume (X, Y, Z), got shape {array.shape}")
    if modality not in _SOP_CLASSES:
        raise ValueError(f"modality must be one of {sorted(_SOP_CLASSES)}, got {modality!r}")
    if body_part is not None and not re.fullmatch(r"[A-Z0-9_ ]{1,16}", body_part):
        raise ValueError(
            f"body_part must be an upper-case DICOM term of at most 16 characters, got {body_part!r}"
        )
    orientation, pixel_spacing, thickness, lps = _geometry(affine)
    slope, intercept = rescale if rescale is not None else choose_rescale(array)
    stored = np.round((array.astype(np.float64) - intercept) / slope)
    if stored.min() < _INT16.min or stored.max() > _INT16.max:
        raise ValueError(f"rescale slope {slope} / intercept {intercept} overflow int16 for this volume")
    stored = stored.astype(np.int16)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now()
    study_uid = study_instance_uid or generate_uid()
    series_uid = series_instance_uid or generate_uid()
    frame_uid = generate_uid()
    paths = []
    for k in range(array.shape[2]):
        position = lps @ np.array([0.0, 0.0, k, 1.0])
        ds = _slice_dataset(modality, study_uid, series_uid, frame_uid, now)
        ds.PatientPosition = patient_position
        if body_part is None:
            ds.ImageLaterality = "U"
        else:
            ds.BodyPartExamined = body_part
        if not all(str(t).isascii() for t in (patient_name, patient_id, series_description, body_part or "")):
            ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: the default repertoire is ASCII only
        ds.PatientName, ds.PatientID = patient_name, patient_id
        ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = series_description, series_number, k + 1
        ds.ImageOrientationPatient = orientation
        ds.ImagePositionPatient = [round(float(v), 6) for v in position[:3]]
        ds.PixelSpacing = [round(v, 8) for v in pixel_spacing]
        ds.SliceThickness = round(thickness, 8)
        ds.SpacingBetweenSlices = round(thickness, 8)
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", f"{intercept:.10g}"
        frame = np.ascontiguousarray(stored[:, :, k].T)  # rows = j, columns = i
        ds.Rows, ds.Columns = frame.shape
        ds.PixelData = frame.tobytes()
        path = out_dir / f"slice_{k:04d}.dcm"
        with atomic_path(path) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
        paths.append(path)
    return paths


def _slice_dataset(
    modality: str, study_uid: str, series_uid: str, frame_uid: str, now: datetime.datetime
) -> Dataset:
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _SOP_CLASSES[modality]
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = _SOP_CLASSES[modality], sop_uid
    ds.Modality = modality
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.Manufacturer, ds.SoftwareVersions = "monai-medplib", __version__
    ds.PositionReferenceIndicator = ""
    ds.ImageType = ["DERIVED", "SECONDARY", _IMAGE_TYPE_3[modality]]
    ds.AcquisitionNumber = None  # Type 2: present, empty (a derived volume has no acquisition of its own)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    if modality == "CT":
        ds.KVP = ""
    else:
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "RM", "NONE", "", "3D"
        ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength = "", "", ""
    return ds
