"""What `medplib demo` writes as DICOM, checked by an independent validator: dicom3tools' ``dciodvfy``.

The demo's CT series (the whole LiTS case 117, written as the demo writes it) and a DICOM-SEG written through the
demo's writer (``io.outputs.write_label_volume``) from the case's reference liver and tumour labels must give no
``Error`` line; an MR series, no error either (its Modality LUT warnings are the MR IOD's, not ours). The SEG's
segments carry the SNOMED CT codes of monai_medplib.io.coded_concepts.

dciodvfy comes from Debian's ``dicom3tools`` (scripts/install_e2e.sh installs it as root); without it the test
is skipped locally and fails under ``MEDPLIB_E2E_REQUIRED=1`` (CI), like the other tests of installed tools.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from monai.data import MetaTensor

from monai_medplib.data.lits import load_lits_case
from monai_medplib.io import write_dicom_series
from monai_medplib.io.outputs import write_label_volume


@pytest.fixture(scope="module")
def dciodvfy() -> str:
    tool = shutil.which("dciodvfy")
    if tool is None:
        reason = "dciodvfy not installed (Debian dicom3tools: sudo bash scripts/install_e2e.sh)"
        if os.environ.get("MEDPLIB_E2E_REQUIRED") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return tool


def _verify(tool: str, path: Path) -> tuple[str, list[str]]:
    """(the IOD dciodvfy recognised, its Error lines) for one file; dciodvfy reports on stderr."""
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    assert (run.returncode != 0) == bool(errors), run  # dciodvfy exits 1 exactly when it found an error
    iod = next((line for line in lines if line and not line.startswith(("Error", "Warning"))), "")
    return iod, errors


def test_the_demo_ct_series_and_its_seg_pass_dciodvfy(dciodvfy, tmp_path):
    case = load_lits_case()
    series = tmp_path / "lits_117_dicom"
    files = write_dicom_series(
        case.image, case.affine, series, series_description="LiTS 117 CT"
    )  # as the demo
    assert len(files) == case.image.shape[2] == 128
    for path in files:
        iod, errors = _verify(dciodvfy, path)
        assert iod == "CTImage" and errors == [], (path.name, errors)
    ds = pydicom.dcmread(files[0])
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"] and ds.ImageLaterality == "U"

    label = MetaTensor(
        torch.from_numpy(case.label[None].astype(np.uint8)), affine=torch.as_tensor(case.affine)
    )
    paths = write_label_volume(
        label, {"liver": 1, "liver tumour": 2}, tmp_path, "reference", dicom_source=series
    )
    iod, errors = _verify(dciodvfy, paths["dicom_seg"])
    assert iod == "Segmentation" and errors == []
    seg = pydicom.dcmread(paths["dicom_seg"])
    codes = {
        s.SegmentLabel: (
            s.SegmentedPropertyCategoryCodeSequence[0].CodeValue,
            s.SegmentedPropertyTypeCodeSequence[0].CodeValue,
        )
        for s in seg.SegmentSequence
    }
    assert codes == {"liver": ("91723000", "10200004"), "liver tumour": ("49755003", "108369006")}
    assert seg.SegmentSequence[1].AnatomicRegionSequence[0].CodeValue == "10200004"


def test_an_mr_series_with_a_body_part_passes_dciodvfy(dciodvfy, tmp_path):
    case = load_lits_case()
    volume = case.image[:, :, 60:64]
    for name, kwargs in {
        "mr": {"modality": "MR"},
        "ct_abdomen": {"body_part": "ABDOMEN", "patient_position": "HFS"},
    }.items():
        files = write_dicom_series(volume, case.affine, tmp_path / name, **kwargs)
        iod, errors = _verify(dciodvfy, files[1])
        assert iod == ("MRImage" if name == "mr" else "CTImage") and errors == [], (name, errors)
    ds = pydicom.dcmread(tmp_path / "ct_abdomen" / "slice_0000.dcm")
    assert ds.BodyPartExamined == "ABDOMEN" and "ImageLaterality" not in ds and ds.PatientPosition == "HFS"
    with pytest.raises(ValueError, match="body_part"):
        write_dicom_series(volume, case.affine, tmp_path / "bad", body_part="Abdomen")
