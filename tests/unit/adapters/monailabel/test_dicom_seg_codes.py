"""The DICOM-SEG that MONAI Label writes for the MedPLIB app (OHIF save, DICOMweb datastore, output=dicom_seg):
each segment named and coded from monai_medplib.io.coded_concepts, numbered 1..N, and valid for dciodvfy.

No server: the converter MONAI Label is rebound to (``nifti_to_dicom_seg_pydicom``) runs on a real DICOM series of
the LiTS CT; pydicom reads the result back.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pydicom
import pytest
import torch

from monai_medplib.adapters.monailabel import server
from monai_medplib.data.lits import load_lits_case
from monai_medplib.io import load_volume, save_nifti, write_dicom_series


@pytest.fixture(scope="module")
def series_and_label(tmp_path_factory):
    root = tmp_path_factory.mktemp("ml_seg")
    case = load_lits_case()
    series = root / "ct"
    write_dicom_series(case.image[:, :, 60:66], case.affine, series)
    volume = load_volume(series)  # the grid MONAI Label's loader sees
    label = torch.zeros(volume.shape[1:], dtype=torch.uint8)
    label[40:80, 40:80, 1:4] = 1  # "liver": 40 x 40 x 3 voxels minus the tumour
    label[50:60, 50:60, 2] = 3  # value 3: the 2nd text found nothing, so values have a gap
    path = save_nifti(label, root / "label.nii.gz", affine=volume.affine)
    return series, path


def _segments(path: str) -> dict[int, tuple]:
    seg = pydicom.dcmread(path)
    voxels: dict[int, int] = {}
    for frame, item in zip(seg.pixel_array, seg.PerFrameFunctionalGroupsSequence):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        voxels[number] = voxels.get(number, 0) + int(np.count_nonzero(frame))
    return {
        int(s.SegmentNumber): (
            s.SegmentLabel,
            s.SegmentedPropertyCategoryCodeSequence[0].CodeValue,
            s.SegmentedPropertyTypeCodeSequence[0].CodeValue,
            [r.CodeValue for r in s.get("AnatomicRegionSequence", [])],
            voxels.get(int(s.SegmentNumber), 0),
        )
        for s in seg.SegmentSequence
    }


def test_segments_are_coded_and_numbered_without_gaps(series_and_label):
    series, label = series_and_label
    info = [{"name": "liver", "id": 1}, {"name": "spleen", "id": 2}, {"name": "liver tumour", "id": 3}]
    out = server.nifti_to_dicom_seg_pydicom(str(series), str(label), info)
    assert _segments(out) == {
        1: ("liver", "91723000", "10200004", [], 40 * 40 * 3 - 100),
        2: ("liver tumour", "49755003", "108369006", ["10200004"], 100),
    }
    if shutil.which("dciodvfy"):  # the dciodvfy conformance test itself requires it in CI
        run = subprocess.run(["dciodvfy", out], capture_output=True, text=True)
        assert run.returncode == 0 and "Error" not in run.stderr, run.stderr


def test_positional_label_info_and_unknown_names(series_and_label):
    series, label = series_and_label
    # MONAI Label's own pairing: the i-th entry names the i-th value present; a name outside the table is Tissue
    out = server.nifti_to_dicom_seg_pydicom(
        str(series), str(label), [{"name": "kidney"}, {"name": "zorbulon"}]
    )
    segments = _segments(out)
    assert [s[:3] for s in segments.values()] == [
        ("kidney", "91723000", "64033007"),
        ("zorbulon", "85756007", "85756007"),
    ]


@pytest.mark.parametrize(
    "label_info, words",
    [
        ({"a": 1}, "must be a list of objects"),
        (5, "must be a list of objects"),
        ([{"id": "abc"}], "'label_info' entry 0 id"),
        ([{"id": None}], "'label_info' entry 0 id"),
        ([{"id": -1}], "'label_info' entry 0 id"),
        (
            [{"name": "liver", "id": 1}, {"id": 2, "color": "red"}],
            "entry 1 color must be three whole numbers",
        ),
        ([{"id": 1, "color": [1e400, 0, 0]}], "color must be three whole numbers 0-255"),
        ([{"id": 1, "color": [300, 0, 0]}], "color must be three whole numbers 0-255"),
        ([{"id": 1, "name": 7}], "entry 0 name must be text"),
    ],
)
def test_a_client_label_info_that_cannot_name_segments_is_a_user_error(series_and_label, label_info, words):
    """A client sends label_info with output=dicom_seg or a DICOMweb label save: a 400 naming it, not a 500."""
    from monai_medplib.user_input import UserInputError

    series, label = series_and_label
    with pytest.raises(UserInputError, match=words):
        server.nifti_to_dicom_seg_pydicom(str(series), str(label), label_info)
