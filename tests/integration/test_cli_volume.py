"""``medplib ground-volume`` and the README's main job ``medplib demo`` on real CT."""

from __future__ import annotations

import json
import subprocess
import sys

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from monai_medplib.cli import main
from monai_medplib.data.lits import load_lits_case
from monai_medplib.io import save_nifti, write_dicom_series


@pytest.fixture(scope="module")
def lits():
    return load_lits_case()


def test_ground_volume_writes_label_in_the_source_geometry(lits, public_fixture, tmp_path, capsys):
    ct = save_nifti(lits.image, tmp_path / "ct.nii.gz", affine=lits.affine, dtype=None)
    argv = ["ground-volume", str(ct), "liver", "--slices", "60", "61", "--out", str(tmp_path / "out")]
    assert main([*argv, "--model", str(public_fixture / "model")]) == 0
    report = json.loads((tmp_path / "out" / "ct_medplib.json").read_text())
    label = nib.load(report["outputs"]["nifti"])
    assert label.shape == lits.image.shape
    np.testing.assert_allclose(label.affine, lits.affine, atol=1e-5)
    # random weights: a mask only where <SEG> was produced, and only on the two requested slices
    data = np.asarray(label.dataobj)
    assert set(np.flatnonzero(data.any(axis=(0, 1)))) <= {60, 61}
    assert {t: v["label"] for t, v in report["targets"].items()} == {"liver": 1}
    assert (tmp_path / "out" / "ct_overlay.png").is_file()


def test_ground_volume_on_a_dicom_folder_also_writes_dicom_seg(lits, public_fixture, tmp_path):
    series = tmp_path / "series"
    write_dicom_series(lits.image, lits.affine, series)
    argv = ["ground-volume", str(series), "liver", "--slices", "64", "--out", str(tmp_path / "out")]
    assert main([*argv, "--model", str(public_fixture / "model")]) == 0
    report = json.loads((tmp_path / "out" / "series_medplib.json").read_text())
    assert "dicom_seg" in report["outputs"] or report["targets"]["liver"]["voxels"] == 0


def test_ground_volume_missing_file_is_a_clear_error(tmp_path, capsys):
    assert main(["ground-volume", str(tmp_path / "nope.nii.gz"), "liver"]) == 2
    assert "nope.nii.gz" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_job_grounds_the_liver(lits, tmp_path):
    """The README's main command on the embedded demo model, in a fresh process as a user runs it."""
    out = tmp_path / "demo"
    run = subprocess.run(
        [sys.executable, "-m", "monai_medplib.cli", "demo", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert "3D Dice" in run.stdout
    mask = nib.load(report["outputs"]["nifti"])
    np.testing.assert_allclose(mask.affine, lits.affine, atol=1e-5)
    grounded = np.asarray(mask.dataobj) > 0
    liver = lits.label >= 1
    dice = 2 * (grounded & liver).sum() / (grounded.sum() + liver.sum())
    assert report["dice_3d"] == pytest.approx(dice, abs=1e-6)
    assert dice >= 0.8
    seg = hd.seg.segread(report["outputs"]["dicom_seg"])
    series_uid = pydicom.dcmread(next((out / "lits_117_dicom").iterdir())).SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    assert seg.SegmentSequence[0].SegmentLabel == "liver"
    assert (out / "liver_overlay.png").is_file()
