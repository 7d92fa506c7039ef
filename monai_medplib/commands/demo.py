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
    # True: each text lies inside the one before (LiTS: the tumour inside the liver); each is grounded on its own and
    # painted over the previous one, as LiTS labels them (1 liver, 2 tumour; the liver is every labelled voxel).
    # False: disjoint structures in one call, one label map by the most-probable rule.
    nested: bool = False


CASES = (
    DemoCase(
        "ct", "lits_117_ct", ("liver", "tumour"), {"liver": (1, 2), "tumour": (2,)}, "abdomen", nested=True
    ),
    DemoCase(
        "mr",
        "mni152_t1",
        ("grey matter", "white matter", "liver"),
        {"grey matter": (1,), "white matter": (2,)},
        None,
    ),
)


DEFAULT_OUT = Path("outputs") / "demo"
CT_NIFTI = (
    "lits_117_ct.nii.gz"  # the CT volume the demo writes; `medplib bundle export` suggests it as an input
)
_FILE_KEYS = {"nifti": "label"}  # report key suffix of write_label_volume's outputs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"output folder (default: {DEFAULT_OUT})")
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
            save_nifti(lits.image, out / CT_NIFTI, affine=lits.affine, dtype=None),
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
    label, label_names, summary, masks = _ground(pipeline, volume, case, args)
    seconds = time.perf_counter() - started
    paths = write_label_volume(label, label_names, out, f"{case.key}_label", dicom_source=dicom)
    # the reference in the grounded label's values (nested texts painted in order, as the label is)
    ref = np.zeros(reference.shape, dtype=np.uint8)
    for text in case.texts:
        if text in case.reference:
            ref[np.isin(reference, case.reference[text])] = label_names[text]
    for text, target in summary["targets"].items():
        truth = np.isin(reference, case.reference.get(text, ()))
        # None: the volume has no such structure
        target["dice_3d"] = dice_3d(masks[text], truth, labels=[1])["1"] if text in case.reference else None
        target["in_reference"] = text in case.reference
    overlay, shown = save_overlay_montage(
        volume,
        label,
        out / f"{case.key}_overlay.png",
        axis=args.axis,
        reference=MetaTensor(torch.from_numpy(ref[None]), affine=volume.affine),
        window=case.window,
        label_names=label_names,
    )
    files = {
        f"{case.key}_image": str(image_path),
        **({f"{case.key}_dicom_series": str(dicom)} if dicom is not None else {}),
        **{f"{case.key}_{_FILE_KEYS.get(kind, kind)}": str(path) for kind, path in paths.items()},
        f"{case.key}_overlay": str(overlay),
    }
    return {**summary, "seconds": round(seconds, 2), "overlay_slices": shown}, files


def _ground(pipeline: Any, volume: Any, case: DemoCase, args: argparse.Namespace):
    """``(label volume, {text: value}, summary, {text: bool mask})``; each summary target also names the label
    values that make up its mask (``label_values``)."""
    import numpy as np

    if not case.nested:
        result = pipeline.ground_volume(volume, list(case.texts), axis=args.axis, fast=args.fast)
        summary = result.summary()
        label = np.asarray(result.label[0])
        for target in summary["targets"].values():
            target["label_values"] = [target["label"]]
        masks = {text: label == value for text, value in result.label_names.items()}
        return result.label, dict(result.label_names), summary, masks
    label_names = {text: value for value, text in enumerate(case.texts, start=1)}
    results = {t: pipeline.ground_volume(volume, t, axis=args.axis, fast=args.fast) for t in case.texts}
    first = results[case.texts[0]]
    label = first.label.clone()
    label.zero_()
    for text, result in results.items():
        label[result.label > 0] = label_names[text]
    # each text is what the written label says it is: its value and the values painted over it
    array, per_voxel_ml = np.asarray(label[0]), first.voxel_ml()
    slice_dim = first.geometry.slice_dim
    other = tuple(d for d in range(3) if d != slice_dim)
    summary = {**first.summary(), "targets": {}, "paths": {}}
    masks = {}
    for text, result in results.items():
        values = [v for v in label_names.values() if v >= label_names[text]]
        masks[text] = region = np.isin(array, values)
        voxels = int(region.sum())
        target = result.summary()["targets"][text]
        target.update(
            label=label_names[text],
            label_values=values,
            found=voxels > 0,
            voxels=voxels,
            volume_ml=round(voxels * per_voxel_ml, 3),
            slices_with_mask=[int(i) for i in np.flatnonzero(region.any(axis=other))],
        )
        summary["targets"][text] = target
        for key, count in result.paths.items():
            summary["paths"][key] = summary["paths"].get(key, 0) + count
    return label, label_names, summary, masks


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
