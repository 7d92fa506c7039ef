"""Write a 3D label volume as a DICOM Segmentation (highdicom) referencing its source DICOM series.

The label must lie on the voxel grid of the source series as :func:`monai_medplib.io.load_volume` reads
it (same shape and affine). Each source image's pixel grid is located in that voxel grid from its own
ImagePositionPatient / ImageOrientationPatient / PixelSpacing, so every SEG frame is cut from exactly the
voxels of the source instance it references, whatever order the reader sorted the slices in.
"""

from __future__ import annotations

import copy
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import torch
from pydicom.sr.codedict import codes

from .. import __version__
from ..transforms.slicing import volume_affine_ras
from ..user_input import UserInputError
from .atomic import atomic_path
from .coded_concepts import Code, coded_concept
from .readers import _SERIES_STEP_TOLERANCE, _series_files

__all__ = ["ALGORITHM_NAME", "check_seg_source", "segment_label", "write_dicom_seg", "source_frames"]

ALGORITHM_NAME = "MedPLIB"
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _source_voxel_grid(
    ds: pydicom.Dataset, lps_to_voxel: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel coordinates of pixel (0, 0) and the voxel steps of one column and one row of a source image."""
    origin = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
    iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    to_voxel = lps_to_voxel[:3, :3]
    start = (lps_to_voxel @ np.append(origin, 1.0))[:3]
    return start, to_voxel @ (iop[:3] * col_spacing), to_voxel @ (iop[3:] * row_spacing)


# how far (in voxels) a source pixel may lie from the label's voxel centre: the series reader accepts slice
# positions up to this share of a step off the regular grid (io/readers.py), so the SEG must take them too
_OFF_GRID_TOLERANCE = _SERIES_STEP_TOLERANCE


def source_frames(label: np.ndarray, affine: np.ndarray, datasets: Sequence[pydicom.Dataset]) -> np.ndarray:
    """The label's ``(rows, columns)`` frame for each source image, stacked in ``datasets`` order.

    Raises ValueError naming the SOP instance whose pixels do not fall on the label's voxel grid.
    """
    lps_to_voxel = np.linalg.inv(_RAS_TO_LPS @ affine)
    frames = []
    for ds in datasets:
        start, col_step, row_step = _source_voxel_grid(ds, lps_to_voxel)
        rows, cols = int(ds.Rows), int(ds.Columns)
        grid = (
            start[:, None, None]
            + row_step[:, None, None] * np.arange(rows)[None, :, None]
            + col_step[:, None, None] * np.arange(cols)[None, None, :]
        )
        index = np.round(grid).astype(np.int64)
        off_grid = np.abs(grid - index).max()
        outside = any((index[d].min() < 0 or index[d].max() >= label.shape[d]) for d in range(3))
        if off_grid > _OFF_GRID_TOLERANCE or outside:
            name = Path(ds.filename).name if isinstance(getattr(ds, "filename", None), str) else ""
            raise ValueError(
                f"source image {name or ds.SOPInstanceUID} does not lie on the label's voxel grid "
                f"(shape {label.shape}; off by {off_grid:.3g} voxel, outside={outside})"
            )
        frames.append(label[index[0], index[1], index[2]])
    return np.stack(frames)


# Display colours of segments 1, 2, ... (RGB): red, green, blue, yellow, magenta, cyan.
SEGMENT_COLOURS = (
    (220, 50, 50),
    (50, 200, 80),
    (60, 110, 230),
    (230, 200, 40),
    (200, 60, 200),
    (40, 200, 210),
)


# Type 1 attributes of the source that the SEG copies and cannot do without (the series reader needs the rest)
_REQUIRED_SOURCE = ("StudyInstanceUID", "FrameOfReferenceUID", "Modality")
# Type 2 attributes the SEG copies from the source: present, possibly empty. Anonymised exports often drop them.
_EMPTY_IF_ABSENT = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def check_seg_source(source: str | Path | pydicom.Dataset) -> None:
    """Raise ``ValueError`` naming what a DICOM-SEG of this series would lack (a file or folder of the series is
    read up to its pixels): callers check before the model runs, not after."""
    if not isinstance(source, pydicom.Dataset):
        path = Path(source)
        source = pydicom.dcmread(
            _series_files(path, None)[0] if path.is_dir() else path, stop_before_pixels=True
        )
    missing = [name for name in _REQUIRED_SOURCE if not str(source.get(name, "") or "").strip()]
    if missing:
        raise UserInputError(
            f"the DICOM series has no {', '.join(missing)}: a DICOM-SEG must copy "
            f"{'them' if len(missing) > 1 else 'it'} from its source"
        )


def _conformant_source(ds: pydicom.Dataset, ras: np.ndarray, own: bool) -> pydicom.Dataset:
    """``ds`` with the absent Type 2 attributes present and empty, and an absent or empty SliceThickness set to
    the step between slices (the SEG's pixel measures need one: a frame is as thick as the label voxel it was
    cut from). A dataset that is not ``own`` is copied first: the caller's are not changed."""
    absent = [name for name in _EMPTY_IF_ABSENT if name not in ds]
    thick = ds.get("SliceThickness") not in (None, "")
    if not absent and thick:
        return ds
    if not own:
        ds = copy.deepcopy(ds)  # a shallow copy shares pydicom's element dict
    for name in absent:
        setattr(ds, name, "")
    if not thick:
        iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
        normal = np.cross(iop[:3], iop[3:])
        ds.SliceThickness = f"{np.abs(normal @ (_RAS_TO_LPS @ ras)[:3, :3]).max():.6g}"
    return ds


def segment_label(text: str) -> str:
    """A segment's text as a SegmentLabel (LO): no backslash (the value separator), no control characters, at
    most 64 characters."""
    text = "".join(" " if unicodedata.category(c) == "Cc" else c for c in text.replace("\\", "/"))
    return " ".join(text.split())[:64]


def _hd_code(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)


def write_dicom_seg(
    label: np.ndarray | torch.Tensor,
    source: str | Path | Sequence[pydicom.Dataset],
    out_path: str | Path,
    segments: Mapping[int, str],
    affine: np.ndarray | None = None,
    series_description: str = "MedPLIB segmentation",
    series_number: int = 300,
    series_uid: str | None = None,
    colours: Mapping[int, Sequence[int]] | None = None,
) -> Path:
    """Save a label volume as a binary DICOM-SEG referencing the source series.

    Args:
        label: integer labels ``(X, Y, Z)`` or ``(1, X, Y, Z)`` on the source series' voxel grid.
        source: the source series folder (one series) or its datasets.
        out_path: the ``.dcm`` file to write.
        segments: label value -> segment label (e.g. the prompt text, ``{1: "liver", 2: "tumour"}``); each is
            coded by :func:`~monai_medplib.io.coded_concepts.coded_concept` (SNOMED CT category and type).
        affine: the label's voxel -> RAS affine; default ``label.affine`` (a MetaTensor from ``load_volume``).
        series_description, series_number, series_uid: identity of the new SEG series.
        colours: label value -> display RGB (0-255); default :data:`SEGMENT_COLOURS` by segment number.

    Returns:
        ``out_path``. Frames exist only for source images with a labelled pixel.
    """
    if affine is None and not hasattr(label, "affine"):
        raise ValueError("write_dicom_seg needs the label's affine (pass affine= or a MetaTensor)")
    ras = volume_affine_ras(label, None if affine is None else np.asarray(affine))
    array = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    array = array[0] if array.ndim == 4 and array.shape[0] == 1 else array
    if array.ndim != 3:
        raise ValueError(f"DICOM-SEG needs a 3D label volume, got shape {array.shape}")
    if not segments:
        raise ValueError("segments must name at least one label value")
    unknown = sorted(set(np.unique(array).tolist()) - {0} - set(segments))
    if unknown:
        raise ValueError(f"label values {unknown} have no segment name in segments={dict(segments)}")
    own = isinstance(source, (str, Path))
    if own:
        datasets = [pydicom.dcmread(p) for p in _series_files(Path(source), None)]
    else:
        datasets = list(source)
    check_seg_source(datasets[0])

    values = sorted(segments)
    frames = source_frames(array, ras, datasets)
    datasets = [_conformant_source(ds, ras, own) for ds in datasets]
    numbered = np.zeros(frames.shape, dtype=np.uint8)  # highdicom wants segment numbers 1..N
    for number, value in enumerate(values, start=1):
        numbered[frames == value] = number
    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME, family=codes.cid7162.ArtificialIntelligence, version=__version__
    )
    descriptions = []
    for number, value in enumerate(values, start=1):
        text = str(segments[value])
        concept = coded_concept(text)
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=segment_label(text),
            segmented_property_category=_hd_code(concept.category),
            segmented_property_type=_hd_code(concept.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            anatomic_regions=None if concept.region is None else [_hd_code(concept.region)],
            # Viewers (OHIF) warn and pick their own colour when a segment has none.
            display_color=hd.color.CIELabColor.from_rgb(
                *((colours or {}).get(value) or SEGMENT_COLOURS[(number - 1) % len(SEGMENT_COLOURS)])[:3]
            ),
        )
        if concept.modifier is not None:
            # the standard nests the laterality inside the type item (highdicom has no argument for it)
            type_item = description.SegmentedPropertyTypeCodeSequence[0]
            type_item.SegmentedPropertyTypeModifierCodeSequence = [_hd_code(concept.modifier)]
        descriptions.append(description)
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=numbered,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_uid or hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="monai-medplib",
        manufacturer_model_name=ALGORITHM_NAME,
        software_versions=__version__,
        device_serial_number="0",
        series_description=series_description,
    )
    texts = [seg.SeriesDescription, *(str(d.SegmentLabel) for d in descriptions)]
    if not all(t.isascii() for t in texts):
        # UTF-8 for the whole object: the source's own set (or none, ASCII) may not hold the segment names;
        # pydicom re-encodes every copied text on writing
        seg.SpecificCharacterSet = "ISO_IR 192"
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        seg.save_as(tmp)
    return out_path
