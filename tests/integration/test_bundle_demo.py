"""The bundle with its defaults (the embedded demo model) on real CT, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from monai_medplib.data.lits import load_lits_case
from monai_medplib.io import save_nifti, write_dicom_series
from tests.support.paths import REPO

SLICES = [40, 64, 88]


@pytest.mark.slow
def test_default_bundle_grounds_the_liver_by_name_on_nifti_and_dicom(tmp_path: Path) -> None:
    case = load_lits_case()
    ct = save_nifti(case.image, tmp_path / "ct.nii.gz", affine=case.affine, dtype=None)
    series = tmp_path / "ct_dicom"
    write_dicom_series(case.image, case.affine, series)
    liver = case.label >= 1
    labels = {}
    # the NIfTI once more with the opt-in one-prefill grounding: the same label
    for image, extra in ((ct, []), (series, []), (ct, ["--fast_grounding", "True"])):
        out = tmp_path / f"out_{image.name}_{len(extra)}"
        input_dict = {"image": str(image), "text": "liver", "slices": SLICES, "id": "study"}
        run = subprocess.run(
            [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"]
            + ["--input_dict", json.dumps(input_dict), "--output_dir", str(out), *extra],
            cwd=REPO / "bundle",
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        report = json.loads((out / "study" / "study_answer.json").read_text())
        targets = report["grounding"]["targets"]
        assert {t: v["label"] for t, v in targets.items()} == {"liver": 1}  # the user's name, not the request
        assert targets["liver"]["slices_with_seg"] == report["grounding"]["slices"]
        label = nib.load(report["outputs"]["label"])
        np.testing.assert_allclose(label.affine, case.affine, atol=1e-4)
        grounded = np.asarray(label.dataobj) > 0
        labels[(image, bool(extra))] = grounded
        paths = report["grounding"]["paths"]
        assert (paths["shortcut"], paths["generate"]) == ((3, 0) if extra else (0, 3))
        ref = np.zeros_like(liver)
        ref[..., SLICES] = liver[..., SLICES]
        dice = 2 * (grounded & ref).sum() / (grounded.sum() + ref.sum())
        assert dice >= 0.85, f"{image.name}: liver Dice {dice:.3f}"
        if image == series:
            assert Path(report["outputs"]["dicom_seg"]).is_file()
    assert np.array_equal(labels[(ct, True)], labels[(ct, False)])
