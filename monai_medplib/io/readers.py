"""Read 3D volumes (NIfTI, NRRD, DICOM series folders, multi-frame DICOM) as channel-first MetaTensors.

Everything goes through MONAI's ``LoadImage``: ITK for DICOM and NRRD (GDCM sorts the slices and reads
the geometry), nibabel for NIfTI. The result is ``(1, X, Y, Z)`` float32 with a voxel -> RAS affine and
the voxel order of the file (no reorientation: ``transforms.slicing`` finds the anatomical axes).
For DICOM, X runs along the image columns, Y along the rows and Z across the slices.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
import pydicom
import torch
from monai.config import KeysCollection
from monai.data import ITKReader, MetaTensor, NibabelReader, PydicomReader
from monai.transforms import LoadImage, MapTransform, Transform
from pydicom.errors import InvalidDicomError

__all__ = [
    "IMAGE_2D_SUFFIXES",
    "NIFTI_SUFFIXES",
    "VOLUME_SUFFIXES",
    "find_dicom_series",
    "load_volume",
    "LoadVolume",
    "LoadVolumed",
    "LoadVolumeD",
    "LoadVolumeDict",
]

# File kinds by name, the one home of these lists (lower case; DICOM series also come as folders).
IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
VOLUME_SUFFIXES = (*NIFTI_SUFFIXES, ".nrrd", ".mha", ".mhd", ".dcm")


def find_dicom_series(folder: str | Path) -> dict[str, list[Path]]:
    """Image files in ``folder`` (not its sub-folders) grouped by SeriesInstanceUID; non-DICOM files are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"DICOM folder not found: {folder}")
    series: dict[str, list[Path]] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        if "SeriesInstanceUID" not in ds or "Rows" not in ds:  # DICOMDIR, reports, ... are not images
            continue
        series.setdefault(str(ds.SeriesInstanceUID), []).append(path)
    return series


def _series_files(folder: Path, series_uid: str | None) -> list[Path]:
    series = find_dicom_series(folder)
    if not series:
        raise FileNotFoundError(f"no DICOM image files in folder {folder}")
    if series_uid is not None:
        if series_uid not in series:
            raise ValueError(f"series {series_uid} not in {folder}; it holds {sorted(series)}")
        return series[series_uid]
    if len(series) > 1:
        listing = ", ".join(f"{uid} ({len(files)} files)" for uid, files in sorted(series.items()))
        raise ValueError(
            f"folder {folder} mixes {len(series)} DICOM series: {listing}; pass series_uid= to pick one"
        )
    return next(iter(series.values()))


def _loader(reader: str | None, path: Path) -> LoadImage:
    name = reader or ("NibabelReader" if path.name.lower().endswith(NIFTI_SUFFIXES) else "ITKReader")
    readers = {"ITKReader": ITKReader, "NibabelReader": NibabelReader, "PydicomReader": PydicomReader}
    if name not in readers:
        raise ValueError(f"unknown reader {name!r}; expected one of {sorted(readers)}")
    return LoadImage(reader=readers[name](), image_only=True, ensure_channel_first=True, dtype=np.float32)


def _check_3d(img: MetaTensor, path: Path) -> MetaTensor:
    spatial = tuple(img.shape[1:])
    if len(spatial) == 2 or (len(spatial) == 3 and (img.affine.shape[-1] == 3 or 1 in spatial)):
        raise ValueError(f"{path} is a 2D image (a single slice) of size {spatial}; a 3D volume is needed")
    if len(spatial) != 3:
        raise ValueError(f"{path} has {len(spatial)} spatial dimensions {spatial}; a 3D volume is needed")
    if img.shape[0] != 1:
        raise ValueError(
            f"{path} holds {img.shape[0]} volumes (a 4D / multi-channel image, shape {tuple(img.shape)}); "
            "a single 3D volume is needed: split it first"
        )
    return img


def load_volume(path: str | Path, series_uid: str | None = None, reader: str | None = None) -> MetaTensor:
    """Load one 3D volume as a ``(1, X, Y, Z)`` float32 MetaTensor with a voxel -> RAS affine.

    Args:
        path: a NIfTI / NRRD / single (multi-frame) DICOM file, or a folder holding one DICOM series.
        series_uid: the SeriesInstanceUID to read from a folder that holds several series.
        reader: force a MONAI reader ("ITKReader", "NibabelReader", "PydicomReader"); default by file type.

    Raises:
        FileNotFoundError: the path does not exist, or a folder holds no DICOM image.
        ValueError: a folder mixes series and ``series_uid`` is None; the image is 2D or 4D.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image not found: {path}")
    loader = _loader(reader, path)
    if not path.is_dir():
        return _check_3d(loader(str(path)), path)
    files = _series_files(path, series_uid)
    if len(files) == len([p for p in path.iterdir() if p.is_file()]):
        return _check_3d(loader(str(path)), path)
    # the folder holds other files too: hand the reader a folder with just this series
    with tempfile.TemporaryDirectory(prefix="medplib_series_") as tmp:
        for n, file in enumerate(files):
            os.symlink(file.resolve(), Path(tmp) / f"{n:05d}_{file.name}")
        img = loader(tmp)
    img.meta["filename_or_obj"] = str(path)
    return _check_3d(img, path)


class LoadVolume(Transform):
    """Array-style wrapper of :func:`load_volume` (a path in, a ``(1, X, Y, Z)`` MetaTensor out)."""

    def __init__(self, series_uid: str | None = None, reader: str | None = None) -> None:
        self.series_uid = series_uid
        self.reader = reader

    def __call__(self, path: str | Path) -> MetaTensor:
        return load_volume(path, series_uid=self.series_uid, reader=self.reader)


class LoadVolumed(MapTransform):
    """Dictionary version of :class:`LoadVolume`: replaces each path under ``keys`` with its volume."""

    def __init__(
        self,
        keys: KeysCollection,
        series_uid: str | None = None,
        reader: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadVolume(series_uid, reader)

    def __call__(self, data: Mapping[Hashable, str | Path]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d


LoadVolumeD = LoadVolumeDict = LoadVolumed
