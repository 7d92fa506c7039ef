"""Read 3D volumes (NIfTI, NRRD, DICOM series folders, multi-frame DICOM) as channel-first MetaTensors.

Everything goes through MONAI's ``LoadImage``: ITK for DICOM and NRRD (GDCM sorts the slices and reads
the geometry), nibabel for NIfTI. The result is ``(1, X, Y, Z)`` float32 with a voxel -> RAS affine and
the voxel order of the file (no reorientation: ``transforms.slicing`` finds the anatomical axes).
For DICOM, X runs along the image columns, Y along the rows and Z across the slices.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import torch
from isal import igzip  # ISA-L: twice zlib's speed, the same bytes
from monai.config import KeysCollection
from monai.data import ITKReader, MetaTensor, NibabelReader, PydicomReader
from monai.transforms import LoadImage, MapTransform, Transform
from pydicom.errors import InvalidDicomError

from ..user_input import UserInputError

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_VOXELS",
    "IMAGE_2D_SUFFIXES",
    "NIFTI_SUFFIXES",
    "VOLUME_SUFFIXES",
    "VolumeHeader",
    "VolumeLimits",
    "VolumeTooLarge",
    "file_stem",
    "find_dicom_series",
    "load_volume",
    "probe_volume",
    "LoadVolume",
    "LoadVolumed",
    "LoadVolumeD",
    "LoadVolumeDict",
]

# File kinds by name, the one home of these lists (lower case; DICOM series also come as folders).
IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIX = ".dcm"  # a DICOM file: one frame is a 2D image, several a volume (io/dicom_image.py)
VOLUME_SUFFIXES = (*NIFTI_SUFFIXES, ".nrrd", ".mha", ".mhd", DICOM_SUFFIX)


def file_stem(path: str | Path) -> str:
    """``path``'s name without its image suffix (``case7.arterial.nii.gz`` -> ``case7.arterial``); a folder (a DICOM
    series, often named by its UID ``1.2.840...``) keeps its whole name. Outputs named from two inputs must differ.
    """
    name = Path(path).name
    if not Path(path).is_dir():
        lower = name.lower()
        for suffix in sorted((*VOLUME_SUFFIXES, *IMAGE_2D_SUFFIXES), key=len, reverse=True):
            if lower.endswith(suffix) and len(name) > len(suffix):
                return name[: len(name) - len(suffix)]
    return name


# Size limits checked from the file header, before anything is decoded: a small compressed file can expand to
# gigabytes. 2**28 voxels is 512 x 512 x 1024, more than a CT / MR series holds; 1 GiB is that volume as float32.
DEFAULT_MAX_VOXELS = 2**28
DEFAULT_MAX_BYTES = 2**30
DECODED_ITEMSIZE = 4  # load_volume decodes every value to float32


class VolumeTooLarge(UserInputError):
    """A volume's header says it exceeds a :class:`VolumeLimits` limit."""


@dataclass(frozen=True)
class VolumeHeader:
    """What a file's header says about its data, read without decoding it.

    Attributes:
        shape: the spatial size in file order (2 or 3 numbers; more for 4D+ files).
        components: values per voxel (colour channels, vector components).
    """

    shape: tuple[int, ...]
    components: int = 1
    data_file: str | None = (
        None  # where a MetaImage / NRRD header puts its voxels when not in the file itself
    )

    @property
    def voxels(self) -> int:
        count = 1
        for n in self.shape:
            count *= int(n)
        return count

    def check_label(self, name: str) -> None:
        """Refuse a label file with more than one value per voxel, naming ``name``.

        3D Slicer writes a segmentation whose segments overlap as one layer per segment (a ``.seg.nrrd`` read as
        a vector image); a label here is one whole number per voxel.
        """
        if self.components > 1:
            raise UserInputError(
                f"label {name!r} holds {self.components} values per voxel (layers of overlapping segments, as 3D "
                "Slicer saves them); save the segmentation as a labelmap with one value per voxel"
            )

    @property
    def decoded_bytes(self) -> int:
        """Bytes of the data once :func:`load_volume` has decoded it (float32)."""
        return self.voxels * self.components * DECODED_ITEMSIZE


@dataclass(frozen=True)
class VolumeLimits:
    """How large a volume may be before it is decoded (see :data:`DEFAULT_MAX_VOXELS`, :data:`DEFAULT_MAX_BYTES`).

    Args:
        max_voxels: most voxels (the product of the spatial size).
        max_bytes: most bytes of the decoded data (voxels x components x 4 bytes of float32).

    Files read under limits come from someone else (a server's clients), so a header that keeps its voxels in
    another file is refused too: it could name any file on the server (``ElementDataFile = /etc/passwd``).
    """

    max_voxels: int = DEFAULT_MAX_VOXELS
    max_bytes: int = DEFAULT_MAX_BYTES

    def check(self, header: VolumeHeader, name: str) -> None:
        """Raise :class:`VolumeTooLarge` naming ``name`` when ``header`` exceeds a limit, and
        :class:`~monai_medplib.user_input.UserInputError` when it keeps its voxels in another file."""
        if header.data_file is not None:
            raise UserInputError(
                f"image {name!r} keeps its voxels in another file ({header.data_file!r}); send a single-file "
                "volume (NIfTI, NRRD or MetaImage .mha with the data inside)"
            )
        size = " x ".join(str(n) for n in header.shape)
        if header.voxels > self.max_voxels:
            raise VolumeTooLarge(
                f"image {name!r} has {size} = {header.voxels:,} voxels; the limit is {self.max_voxels:,} (max_voxels)"
            )
        if header.decoded_bytes > self.max_bytes:
            raise VolumeTooLarge(
                f"image {name!r} ({size} x {header.components} values) needs {header.decoded_bytes / 2**20:,.0f} MiB "
                f"once decoded; the limit is {self.max_bytes / 2**20:,.0f} MiB (max_bytes)"
            )


def probe_volume(path: str | Path, series_uid: str | None = None) -> VolumeHeader:
    """The size of the image at ``path`` from its header alone (NIfTI, NRRD / MetaImage, DICOM file or series
    folder, PNG / JPEG / TIFF): milliseconds, whatever the file expands to.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UserInputError: no header can be read (an empty, text or truncated-header file; a folder without DICOM).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image not found: {path}")
    name = path.name
    if path.is_dir():
        files = _series_files(path, series_uid)
        return _probe_dicom(files[0], name, count=len(files))
    if path.stat().st_size == 0:
        raise UserInputError(f"{name!r} is an empty file, not an image")
    lower = name.lower()
    try:
        if lower.endswith(NIFTI_SUFFIXES):
            import nibabel as nib

            header = nib.load(str(path)).header
            dims = tuple(int(n) for n in header.get_data_shape())
            return VolumeHeader(dims[:3] if len(dims) > 3 and all(n == 1 for n in dims[3:]) else dims)
        if lower.endswith(IMAGE_2D_SUFFIXES):
            from PIL import Image

            with Image.open(path) as im:  # lazy: reads the header only
                return VolumeHeader((im.size[0], im.size[1]), len(im.getbands()))
        if lower.endswith(".dcm"):
            return _probe_dicom(path, name, count=1)
        return _probe_itk(path)
    except UserInputError:
        raise
    except Exception as err:  # every library has its own error for a file that is not its format
        reason = str(err).replace(str(path), name)  # readers quote the full path; the user knows the name
        raise UserInputError(f"{name!r} is not a readable image ({type(err).__name__}: {reason})") from err


_HEADER_BYTES = 1 << 16  # MetaImage / NRRD text headers are a few hundred bytes


def _detached_data_file(path: Path) -> str | None:
    """The file a MetaImage (``ElementDataFile``) or NRRD (``data file``) header reads its voxels from, or None when
    they follow the header in ``path`` itself."""
    with path.open("rb") as f:
        head = f.read(_HEADER_BYTES)
    if head.startswith(b"NRRD"):
        text = head.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]  # the header ends at the first empty line
        for line in text.split(b"\n")[1:]:
            key, sep, value = line.partition(b":")
            if sep and key.strip().lower() in (b"data file", b"datafile"):
                return value.strip().decode("utf-8", "replace")
        return None
    for line in head.splitlines():
        key, sep, value = line.partition(b"=")
        if sep and key.strip() == b"ElementDataFile":  # MetaImage: always the last header line
            data = value.strip().decode("utf-8", "replace")
            return None if data.upper() == "LOCAL" else data
    return None


def _probe_itk(path: Path) -> VolumeHeader:
    import itk

    io = itk.ImageIOFactory.CreateImageIO(str(path), itk.CommonEnums.IOFileMode_ReadMode)
    if io is None:
        raise UserInputError(f"{path.name!r} is not a readable image (no reader recognises it)")
    io.SetFileName(str(path))
    io.ReadImageInformation()
    dims = tuple(int(io.GetDimensions(i)) for i in range(io.GetNumberOfDimensions()))
    return VolumeHeader(dims, int(io.GetNumberOfComponents()), _detached_data_file(path))


def _probe_dicom(file: Path, name: str, count: int) -> VolumeHeader:
    ds = pydicom.dcmread(file, stop_before_pixels=True)
    if "Rows" not in ds or "Columns" not in ds:
        raise UserInputError(f"{name!r} is a DICOM file without an image (no Rows / Columns)")
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    return VolumeHeader((int(ds.Columns), int(ds.Rows), frames * count), samples)


# objects with pixel rows that describe a series rather than image it: Segmentation, Surface Segmentation,
# Parametric Map, RT Dose (PACS exports and our own DICOM-SEG output put them beside the series)
_DERIVED_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.66.4",
        "1.2.840.10008.5.1.4.1.1.66.5",
        "1.2.840.10008.5.1.4.1.1.30",
        "1.2.840.10008.5.1.4.1.1.481.2",
    }
)
_DERIVED_MODALITIES = frozenset({"SEG", "RTDOSE", "RTSTRUCT"})


def find_dicom_series(folder: str | Path) -> dict[str, list[Path]]:
    """Image files in ``folder`` (not its sub-folders) grouped by SeriesInstanceUID; non-DICOM files and derived
    objects (a DICOM-SEG, a dose grid) are skipped."""
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
        if str(ds.get("SOPClassUID", "")) in _DERIVED_CLASSES or ds.get("Modality") in _DERIVED_MODALITIES:
            continue  # a segmentation or dose grid exported beside its series is not part of the volume
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
            f"folder {folder} mixes {len(series)} DICOM series: {listing}; put each series in a folder of its "
            "own (in Python, series_uid= picks one)"
        )
    return next(iter(series.values()))


# how far (as a share of the median step) one step between neighbouring slices of a series may be off: a missing
# slice doubles a step, rounded positions move one by well under 1 %
_SERIES_STEP_TOLERANCE = 0.1
_GEOMETRY_TAGS = ["ImagePositionPatient", "ImageOrientationPatient", "NumberOfFrames"]


def _check_series_geometry(files: Sequence[Path], name: str) -> None:
    """Refuse a series of single-frame files that does not tile one regular grid: ITK and pydicom would load it
    anyway and spread the slices evenly, so every mask written back would land off its true position.

    Checked: one orientation, one file per slice position, even steps between positions. Series without the
    position tags, and multi-frame files, are left to the reader.

    Raises:
        UserInputError: naming ``name``, the problem and the files involved.
    """
    if len(files) < 2:
        return
    positions, orientations = [], []
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_GEOMETRY_TAGS)
        if int(ds.get("NumberOfFrames", 1) or 1) > 1 or "ImagePositionPatient" not in ds:
            return
        if "ImageOrientationPatient" not in ds:
            return
        try:
            positions.append(np.asarray(ds.ImagePositionPatient, dtype=np.float64).reshape(3))
            orientations.append(np.asarray(ds.ImageOrientationPatient, dtype=np.float64).reshape(6))
        except (ValueError, TypeError):  # malformed tags: the reader's own error names them
            return
    if np.abs(np.stack(orientations) - orientations[0]).max() > 1e-3:
        raise UserInputError(f"DICOM series {name!r} mixes slice orientations: it is not one volume")
    normal = np.cross(orientations[0][:3], orientations[0][3:])
    along = np.array([pos @ normal for pos in positions])
    order = np.argsort(along)
    steps = np.diff(along[order])
    median = float(np.median(steps))
    same = np.flatnonzero(steps < max(1e-3, 0.01 * median))
    if same.size:
        k = int(same[0])
        raise UserInputError(
            f"DICOM series {name!r} has two files at one slice position ({files[order[k]].name!r} and "
            f"{files[order[k + 1]].name!r} at {along[order[k]]:.2f} mm along the slice normal): a slice sent twice?"
        )
    off = np.flatnonzero(np.abs(steps - median) > _SERIES_STEP_TOLERANCE * median)
    if off.size:
        k = int(off[0])
        raise UserInputError(
            f"DICOM series {name!r} is not evenly spaced: the step after {files[order[k]].name!r} is "
            f"{steps[k]:.3g} mm where the series steps {median:.3g} mm (a missing slice?); "
            f"{off.size} uneven step(s) in {len(files)} files"
        )


def _check_slice_count(img: MetaTensor, files: Sequence[Path], name: str) -> None:
    """A reader that skipped a file (ITK drops an unreadable slice without an error) loaded fewer voxels than
    the files hold."""
    first = pydicom.dcmread(
        files[0], stop_before_pixels=True, specific_tags=["Rows", "Columns", "NumberOfFrames"]
    )
    frames = int(first.get("NumberOfFrames", 1) or 1)
    if len(files) < 2 or frames > 1:
        return
    per_slice = int(first.Rows) * int(first.Columns)
    read = int(np.prod(img.shape[1:])) // per_slice
    if read != len(files):
        raise UserInputError(
            f"DICOM series {name!r} has {len(files)} slice files but {read} slices could be read: a file is "
            "truncated or corrupt"
        )


# slabs of the last axis per copy in :func:`_c_order_float32`: source and destination both stay in cache
_SLAB = 16
# deflate's densest stream inflates about 1032-fold (258 bytes from 2 bits); gzip framing only adds bytes
_DEFLATE_MAX_RATIO = 1032


def _c_order_float32(array: np.ndarray) -> np.ndarray:
    """``np.ascontiguousarray(array, dtype=np.float32)``, value for value, about twice as fast for Fortran-order data.

    A NIfTI volume decodes in Fortran order (x fastest) and MONAI hands it on in C order (z fastest): one big
    transposing copy walks one of the two arrays with a stride of a whole plane. Copying slabs of a few
    last-axis planes keeps both sides in cache; each element goes through numpy's own cast, as before.
    """
    if array.ndim < 2 or array.flags.c_contiguous:
        return np.ascontiguousarray(array, dtype=np.float32)
    # torch's allocator, not numpy's: numpy asks for transparent huge pages, and a kernel with THP defrag
    # "madvise" (the usual default) then compacts memory on the spot for each new array once a server holds
    # volumes (measured: 0.41 s instead of 0.19 s for this copy)
    out = torch.empty(array.shape, dtype=torch.float32).numpy()
    for start in range(0, array.shape[-1], _SLAB):
        out[..., start : start + _SLAB] = array[..., start : start + _SLAB]
    return out


class _NiftiReader(NibabelReader):
    """MONAI's ``NibabelReader`` returning the float32 C-order array that ``LoadImage(dtype=float32)`` would make
    from it (same values and metadata), faster: a cold server request waits on this read.

    A ``.nii.gz`` is inflated in one call, by ISA-L, up to the end of its voxels (nibabel streams it through
    zlib in thousands of small reads); nibabel scales the voxels from the inflated bytes as it would from the
    file; then :func:`_c_order_float32`.
    """

    def _get_array_data(self, img, filename):
        if self.to_gpu:
            return super()._get_array_data(img, filename)
        as_stored = isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)) and not self.as_closest_canonical
        if as_stored and str(filename).lower().endswith(".gz"):
            # inflate only what the header declares (header, extensions, voxels), as nibabel does: whatever
            # follows in the stream is never expanded, so a small header cannot smuggle in a huge payload
            size = img.dataobj.offset + math.prod(img.shape) * img.get_data_dtype().itemsize
            stored = os.path.getsize(filename)
            if size > stored * _DEFLATE_MAX_RATIO:  # refused before allocating what the header claims
                raise OSError(
                    f"{Path(filename).name}: the header declares {size} bytes of image, more than a {stored}-byte "
                    "gzip file can inflate to: the file is truncated or its header is wrong"
                )
            with igzip.open(filename, "rb") as handle:
                img = type(img).from_bytes(handle.read(size))
        return _c_order_float32(np.asanyarray(img.dataobj))


def _loader(reader: str | None, path: Path) -> LoadImage:
    name = reader or ("NibabelReader" if path.name.lower().endswith(NIFTI_SUFFIXES) else "ITKReader")
    readers = {"ITKReader": ITKReader, "NibabelReader": _NiftiReader, "PydicomReader": PydicomReader}
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


def load_volume(
    path: str | Path,
    series_uid: str | None = None,
    reader: str | None = None,
    limits: VolumeLimits | None = None,
) -> MetaTensor:
    """Load one 3D volume as a ``(1, X, Y, Z)`` float32 MetaTensor with a voxel -> RAS affine.

    Args:
        path: a NIfTI / NRRD / single (multi-frame) DICOM file, or a folder holding one DICOM series.
        series_uid: the SeriesInstanceUID to read from a folder that holds several series.
        reader: force a MONAI reader ("ITKReader", "NibabelReader", "PydicomReader"); default by file type.
        limits: size limits checked on the header before anything is decoded (servers pass them; None: none).

    Raises:
        FileNotFoundError: the path does not exist, or a folder holds no DICOM image.
        ValueError: a folder mixes series and ``series_uid`` is None; the image is 2D or 4D.
        UserInputError: (with ``limits``) the header is unreadable or the volume exceeds a limit; a DICOM series
            has a missing, repeated or unreadable slice, or mixes orientations.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image not found: {path}")
    if limits is not None:
        limits.check(probe_volume(path, series_uid), path.name)
    loader = _loader(reader, path)
    if not path.is_dir():
        return _check_3d(loader(str(path)), path)
    files = _series_files(path, series_uid)
    _check_series_geometry(files, path.name)
    if len(files) == len([p for p in path.iterdir() if p.is_file()]):
        img = loader(str(path))
    else:  # the folder holds other files too: hand the reader a folder with just this series
        with tempfile.TemporaryDirectory(prefix="medplib_series_") as tmp:
            for n, file in enumerate(files):
                os.symlink(file.resolve(), Path(tmp) / f"{n:05d}_{file.name}")
            img = loader(tmp)
        img.meta["filename_or_obj"] = str(path)
    _check_slice_count(img, files, path.name)
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
