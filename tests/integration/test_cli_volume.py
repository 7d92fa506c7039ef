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
from PIL import Image

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


def test_ground_volume_refuses_a_series_its_dicom_seg_cannot_describe_before_the_model_runs(
    lits, tmp_path, capsys, monkeypatch
):
    series = tmp_path / "series"
    for path in write_dicom_series(lits.image[:, :, 60:63], lits.affine, series):
        ds = pydicom.dcmread(path)
        del ds.FrameOfReferenceUID  # Type 1: a SEG must copy it
        ds.save_as(path)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded for a series the DICOM-SEG refuses")

    monkeypatch.setattr("monai_medplib.commands.ground_volume.load_pipeline", no_model)
    assert main(["ground-volume", str(series), "liver", "--out", str(tmp_path / "out")]) == 2
    assert "no FrameOfReferenceUID" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_ground_volume_missing_file_is_a_clear_error(tmp_path, capsys):
    assert main(["ground-volume", str(tmp_path / "nope.nii.gz"), "liver"]) == 2
    assert "nope.nii.gz" in capsys.readouterr().err


@pytest.fixture(scope="module")
def ct_file(lits, tmp_path_factory):
    return save_nifti(lits.image, tmp_path_factory.mktemp("ct") / "ct.nii.gz", affine=lits.affine, dtype=None)


def test_slice_writes_the_model_ready_slice(lits, ct_file, tmp_path, monkeypatch, capsys):
    """``medplib slice`` = the SA-Med2D mapping of the whole volume (0.5 / 99.5 percentiles -> 0-255, rounded),
    cut in the display orientation (axial: rows anterior -> posterior, columns patient right -> left)."""
    out = tmp_path / "slice.png"
    assert main(["slice", str(ct_file), "--axis", "axial", "--index", "64", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    png = np.asarray(Image.open(out))
    ct = lits.image.astype(np.float64)
    low, high = np.percentile(ct, [0.5, 99.5])
    eight = np.rint(np.clip((ct - low) / (high - low), 0, 1) * 255).astype(np.uint8)
    # the LiTS affine is diag(-1.5, -1.5, 1.5): voxel x runs to the patient's left, y to posterior, z up; axial
    # slice k = eight[:, :, k], shown with rows along y (anterior first) and columns along x (patient right first)
    assert np.array_equal(png, eight[:, :, 64].T)
    monkeypatch.chdir(tmp_path)
    # default: the middle slice, named after the volume, plane and index; coronal rows run superior first
    assert main(["slice", str(ct_file), "--axis", "coronal"]) == 0
    coronal = np.asarray(Image.open(tmp_path / "ct_coronal64.png"))
    assert np.array_equal(coronal, eight[:, 64, :].T[::-1])


def test_ground_on_a_volume_slice_matches_ground_volume(ct_file, tmp_path, capsys):
    """``ground VOLUME --slice k`` grounds what ground-volume grounds on slice k (the same normalisation)."""
    out = tmp_path / "g"
    assert main(["ground", str(ct_file), "liver", "--slice", "64", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["image"] == {
        "file": str(ct_file),
        "kind": "volume",
        "axis": "axial",
        "slice": 64,
        "slices": 128,
    }
    mask = np.asarray(Image.open(out / "ct_axial64_mask.png")) > 0
    argv = ["ground-volume", str(ct_file), "liver", "--slices", "64", "--out", str(tmp_path / "v"), "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    label = np.asarray(nib.load(summary["outputs"]["nifti"]).dataobj)
    assert np.array_equal(mask, label[:, :, 64].T > 0)
    assert report["targets"]["liver"]["pixels"] == summary["targets"]["liver"]["voxels"] == int(mask.sum())
    assert report["targets"]["liver"]["found"] == summary["targets"]["liver"]["found"] == bool(mask.any())


def test_ground_volume_reports_each_text_and_draws_a_legend(ct_file, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["ground-volume", str(ct_file), "liver, tumour", "--slices", "60-63", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    report = json.loads((out / "ct_medplib.json").read_text())
    label = np.asarray(nib.load(report["outputs"]["nifti"]).dataobj)
    for line, (text, target) in zip(printed, report["targets"].items()):
        voxels = int((label == target["label"]).sum())
        assert target["voxels"] == voxels and target["found"] == (voxels > 0)
        assert target["volume_ml"] == pytest.approx(voxels * 1.5**3 / 1000, abs=1e-3)
        assert line.startswith(f"{text}: found, {voxels} voxels" if voxels else f"{text}: not found on the 4")
        assert "<SEG>" not in "".join(target["answers"])  # the model's words, without its tokens
    overlay = np.asarray(Image.open(out / "ct_overlay.png").convert("RGB"))
    assert overlay.shape[0] > 128  # slices, then the legend


def test_ground_volume_keyframes_runs_fewer_language_model_passes(lits, ct_file, tmp_path, capsys):
    """``--keyframes 4`` on 17 slices: the LLM runs on the keys (50, 54, 58, 62, 66) and the slices the check
    adds, not on all 17; the label has the exact run's grid, and on the initial keys (the exact path) the same
    mask. Weight-agnostic: it holds whatever the demo model finds."""
    common = ["ground-volume", str(ct_file), "liver", "--slices", "50-66"]
    assert main([*common, "--out", str(tmp_path / "exact")]) == 0
    exact_out = capsys.readouterr().out
    assert main([*common, "--keyframes", "4", "--out", str(tmp_path / "kf")]) == 0
    kf_out = capsys.readouterr().out
    exact = json.loads((tmp_path / "exact" / "ct_medplib.json").read_text())
    kf = json.loads((tmp_path / "kf" / "ct_medplib.json").read_text())

    assert exact["paths"]["llm_passes"] == 17 and "keyframes" not in exact["paths"]
    assert "language model passes: 17 for 17 slices x 1 text (exact: every slice)" in exact_out
    passes = kf["paths"]["llm_passes"]
    assert kf["paths"]["keyframes"] == 4
    paths = kf["targets"]["liver"]["slice_paths"]
    assert sum(paths.values()) == 17 and paths.get("key") == 5  # every slice has a path; 5 initial keys
    assert passes == paths["key"] + paths.get("bisected", 0) < 17  # one LLM pass per key slice only
    assert f"language model passes: {passes} for 17 slices x 1 text (keyframes every 4 slices)" in kf_out

    exact_nii, kf_nii = (nib.load(r["outputs"]["nifti"]) for r in (exact, kf))
    assert kf_nii.shape == exact_nii.shape == lits.image.shape
    np.testing.assert_allclose(kf_nii.affine, exact_nii.affine, atol=1e-6)
    np.testing.assert_allclose(kf_nii.affine, lits.affine, atol=1e-5)
    exact_label, kf_label = np.asarray(exact_nii.dataobj), np.asarray(kf_nii.dataobj)
    assert set(np.flatnonzero(kf_label.any(axis=(0, 1)))) <= set(range(50, 67))
    for key in (50, 54, 58, 62, 66):  # the same LLM pass and SAM decode as exact (batching may move a pixel)
        assert (kf_label[:, :, key] != exact_label[:, :, key]).mean() <= 0.005, key


@pytest.mark.slow
def test_demo_job_grounds_by_name_in_ct_and_mr(lits, tmp_path):
    """The README's main command on the embedded demo model, in a fresh process as a user runs it: liver and
    tumour in the CT (one two-label volume, NIfTI + DICOM-SEG on the CT's series), grey and white matter in the
    MR, an absent liver in the MR reported as not found, and each 3D Dice recomputed here from the files."""
    from monai_medplib.data.mni import load_mni_case

    out = tmp_path / "demo"
    run = subprocess.run(
        [sys.executable, "-m", "monai_medplib.cli", "demo", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    references = {
        "ct": (lits, {"liver": (1, 2), "tumour": (2,)}),
        "mr": (load_mni_case(), {"grey matter": (1,), "white matter": (2,)}),
    }
    for key, (case, reference) in references.items():
        mask = nib.load(report["outputs"][f"{key}_label"])
        np.testing.assert_allclose(mask.affine, case.affine, atol=1e-5)
        label = np.asarray(mask.dataobj)
        targets = report["volumes"][key]["targets"]
        for text, values in reference.items():
            grounded, truth = np.isin(label, targets[text]["label_values"]), np.isin(case.label, values)
            dice = 2 * (grounded & truth).sum() / (grounded.sum() + truth.sum())
            assert targets[text]["dice_3d"] == pytest.approx(dice, abs=1e-6), (key, text)
            assert f"3D Dice ({text} vs the reference label): {dice:.4f}" in run.stdout
        assert (out / f"{key}_overlay.png").is_file()
    ct, mr = report["volumes"]["ct"]["targets"], report["volumes"]["mr"]["targets"]
    assert ct["liver"]["dice_3d"] >= 0.85 and ct["tumour"]["dice_3d"] >= 0.5
    assert mr["white matter"]["dice_3d"] >= 0.8 and mr["grey matter"]["dice_3d"] >= 0.6
    assert not mr["liver"]["found"] and "liver: not found" in run.stdout  # there is no liver in a brain
    seg = hd.seg.segread(report["outputs"]["ct_dicom_seg"])
    series_uid = pydicom.dcmread(next((out / "lits_117_dicom").iterdir())).SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "tumour"]
