"""The DICOM-SEG that MONAI Label writes for the MedPLIB app (OHIF save, DICOMweb datastore, output=dicom_seg):
each segment named and coded from monai_medplib.io.coded_concepts, numbered 1..N, valid for dciodvfy, and true to
its source series (frame of reference, character set, patient text).

No server: the converter MONAI Label is rebound to (``seg_export.nifti_to_dicom_seg``) runs on a real DICOM series
of the LiTS CT; pydicom reads the result back.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch

from monai_medplib.adapters.monailabel import seg_export
from monai_medplib.data.lits import load_lits_case
from monai_medplib.io import load_volume, save_nifti, write_dicom_series
from monai_medplib.user_input import UserInputError


@pytest.fixture(scope="module")
def series_and_label(tmp_path_factory):
    root = tmp_path_factory.mktemp("ml_seg")
    case = load_lits_case()
    series = root / "ct"
    # a UTF-8 series (ISO_IR 192): MONAI Label's converter re-encoded its text as Latin-1 ("??")
    write_dicom_series(case.image[:, :, 60:66], case.affine, series, patient_name="山田^太郎")
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
    out = seg_export.nifti_to_dicom_seg(str(series), str(label), info)
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
    out = seg_export.nifti_to_dicom_seg(str(series), str(label), [{"name": "kidney"}, {"name": "zorbulon"}])
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
    series, label = series_and_label
    with pytest.raises(UserInputError, match=words):
        seg_export.nifti_to_dicom_seg(str(series), str(label), label_info)


def test_seg_keeps_the_series_frame_of_reference_text_and_provenance(series_and_label):
    """MONAI Label's pydicom-seg converter gave each SEG a new FrameOfReferenceUID (viewers that check it do not
    overlay the SEG), turned non-Latin-1 text into '?', and added a template's trial and reader attributes."""
    series, label = series_and_label
    source = pydicom.dcmread(sorted(series.iterdir())[0])
    info = [{"name": "liver", "id": 1, "color": [10, 200, 30]}, {"name": "Läsion", "id": 3}]
    out = seg_export.nifti_to_dicom_seg(str(series), str(label), info)
    seg = pydicom.dcmread(out)
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert (seg.SpecificCharacterSet, seg.PatientName) == ("ISO_IR 192", "山田^太郎")
    assert seg.PatientID == source.PatientID and seg.StudyInstanceUID == source.StudyInstanceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "Läsion"]
    assert not [e.keyword for e in seg if e.keyword.startswith("ClinicalTrial")]
    assert seg.get("ContentCreatorName", "") != "Reader1" and seg.Manufacturer == "monai-medplib"
    lab = seg.SegmentSequence[0].RecommendedDisplayCIELabValue  # the client's colour for segment 1
    assert tuple(lab) == tuple(hd.color.CIELabColor.from_rgb(10, 200, 30).value)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600  # patient data in a temp file: the server user only


def test_seg_is_written_in_the_save_folder_and_an_empty_label_has_none(series_and_label, tmp_path):
    series, label = series_and_label
    token = seg_export.SEG_FOLDER.set(tmp_path)
    try:
        out = seg_export.nifti_to_dicom_seg(str(series), str(label), None)
        assert Path(out).parent == tmp_path
        empty = save_nifti(
            torch.zeros(load_volume(label).shape[1:]),
            tmp_path / "empty.nii.gz",
            affine=load_volume(label).affine,
        )
        with pytest.raises(UserInputError, match="the label is empty"):
            seg_export.nifti_to_dicom_seg(str(series), str(empty), None)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.nii.gz", Path(out).name]
    finally:
        seg_export.SEG_FOLDER.reset(token)
