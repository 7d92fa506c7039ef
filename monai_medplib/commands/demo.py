"""``medplib demo``: the README's main job — ground structures by name in a real CT and a real MR with the demo model.

* CT: LiTS case 117 from the ``liver-ct-segmentation-package`` wheel (128^3, liver / tumour label), written as
  NIfTI and as a DICOM series; "liver" and "tumour" grounded on every slice into one two-label volume, saved as
  NIfTI and as a DICOM-SEG referencing that series.
* MR: the MNI ICBM152 2009a T1 from the ``nilearn`` wheel's files (192^3, grey / white matter maps at p >= 0.5),
  written as NIfTI; "grey matter", "white matter" and "liver" grounded: the liver is not in a brain, so the model
  should say so and the report says "not found".

Each volume gets an overlay PNG; the JSON report holds per text found / where / how much / the model's words and
the 3D Dice against the volume's reference label (None for a structure the volume does not contain).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..transforms.planes import AXES
from ._common import add_model_arguments, check_device, check_model_folder, check_out_dir, load_pipeline
from ._report import print_report, volume_lines

NAME = "demo"
HELP = "ground liver + tumour in the LiTS CT and grey / white matter (and an absent liver) in the MNI152 MR"


@dataclass(frozen=True)
class DemoCase:
    """One demo volume: what is asked, and the reference label values of each text it contains."""

    key: str
    stem: str
    texts: tuple[str, ...]
    reference: dict[str, tuple[int, ...]]  # text -> reference label values (texts not listed are absent)
    window: str | None  # overlay display: a CT window preset, or None for the model's own normalisation


CASES = (
    DemoCase("ct", "lits_117_ct", ("liver", "tumour"), {"liver": (1, 2), "tumour": (2,)}, "abdomen"),
    DemoCase(
        "mr",
        "mni152_t1",
        ("grey matter", "white matter", "liver"),
        {"grey matter": (1,), "white matter": (2,)},
        None,
    ),
)


_FILE_KEYS = {"nifti": "label"}  # report key suffix of write_label_volume's outputs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    parser.add_argument("--axis", default="axial", choices=AXES)
    parser.add_argument("--fast", action="store_true", help="one-prefill <SEG> shortcut (checked per slice)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    add_model_arguments(parser)


def _write_inputs(out: Path) -> dict[str, tuple[Any, Any, Path | None]]:
    """Write both volumes (and the CT's DICOM series); ``key -> (image path, label array, DICOM folder)``."""
    from ..data.lits import load_lits_case
    from ..data.mni import load_mni_case
    from ..io import save_nifti, write_dicom_series

    lits, mni = load_lits_case(), load_mni_case()
    series_dir = out / "lits_117_dicom"
    write_dicom_series(lits.image, lits.affine, series_dir, series_description="LiTS 117 CT")
    return {
        "ct": (
            save_nifti(lits.image, out / "lits_117_ct.nii.gz", affine=lits.affine, dtype=None),
            lits.label,
            series_dir,
        ),
        "mr": (
            save_nifti(mni.image, out / "mni152_t1.nii.gz", affine=mni.affine, dtype=None),
            mni.label,
            None,
        ),
    }


def _ground_case(
    pipeline: Any, case: DemoCase, image_path: Path, reference: Any, dicom: Path | None, args, out: Path
):
    import numpy as np
    import torch
    from monai.data import MetaTensor

    from ..io import load_volume
    from ..io.outputs import save_overlay_montage, write_label_volume
    from ..metrics import dice_3d

    volume = load_volume(image_path)
    started = time.perf_counter()
    result = pipeline.ground_volume(volume, list(case.texts), axis=args.axis, fast=args.fast)
    seconds = time.perf_counter() - started
    paths = write_label_volume(result.label, result.label_names, out, f"{case.key}_label", dicom_source=dicom)
    # the reference in the grounded label's values: each text's reference voxels get that text's value
    ref = np.zeros(reference.shape, dtype=np.uint8)
    for text, values in case.reference.items():
        ref[np.isin(reference, values)] = result.label_names[text]
    dice = dice_3d(result.label, ref, labels={t: result.label_names[t] for t in case.reference})
    overlay, shown = save_overlay_montage(
        volume,
        result.label,
        out / f"{case.key}_overlay.png",
        axis=args.axis,
        reference=MetaTensor(torch.from_numpy(ref[None]), affine=volume.affine),
        window=case.window,
        label_names=result.label_names,
    )
    summary = result.summary()
    for text, target in summary["targets"].items():
        target["dice_3d"] = dice.get(text)  # None: the volume has no such structure
        target["in_reference"] = text in case.reference
    files = {
        f"{case.key}_image": str(image_path),
        **({f"{case.key}_dicom_series": str(dicom)} if dicom is not None else {}),
        **{f"{case.key}_{_FILE_KEYS.get(kind, kind)}": str(path) for kind, path in paths.items()},
        f"{case.key}_overlay": str(overlay),
    }
    return {**summary, "seconds": round(seconds, 2), "overlay_slices": shown}, files


def run(args: argparse.Namespace) -> int:
    out = check_out_dir(args.out)
    check_model_folder(args)
    check_device(args)

    from ..io.outputs import write_json

    inputs = _write_inputs(out)
    pipeline = load_pipeline(args)
    report: dict[str, Any] = {"model": str(args.model), "volumes": {}, "outputs": {}}
    lines: list[str] = []
    for case in CASES:
        image_path, reference, dicom = inputs[case.key]
        summary, files = _ground_case(pipeline, case, image_path, reference, dicom, args, out)
        report["volumes"][case.key] = summary
        report["outputs"].update(files)
        lines.append(f"{case.key.upper()} ({image_path.name}, {len(summary['slices'])} {args.axis} slices):")
        lines += [f"  {line}" for line in volume_lines(summary)]
        for text, target in summary["targets"].items():
            if target["dice_3d"] is not None:
                lines.append(f"  3D Dice ({text} vs the reference label): {target['dice_3d']:.4f}")
            else:
                lines.append(f"  ({text} is not in this volume: 'not found' is the right answer)")
    report["outputs"]["report"] = str(out / "report.json")
    write_json(out / "report.json", report)
    print_report(lines, report, args.json)
    return 0
