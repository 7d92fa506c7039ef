"""``medplib demo``: the README's main job — ground the liver in a real CT with the demo model.

The CT is LiTS case 117 from the ``liver-ct-segmentation-package`` wheel (128^3, with a liver / tumour
label). It is written as NIfTI and as a DICOM series, grounded slice by slice, and the 3D mask is saved as
NIfTI and as a DICOM-SEG referencing that series, with an overlay PNG and a JSON report including the 3D
Dice against the reference liver label.
"""

from __future__ import annotations

import argparse
import time

from ..transforms.planes import AXES
from ._common import add_model_arguments, check_device, check_model_folder, check_out_dir, load_pipeline
from ._report import print_report, volume_lines

NAME = "demo"
HELP = "ground the liver in the LiTS CT with the demo model: NIfTI + DICOM-SEG + overlay + 3D Dice"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    parser.add_argument("--text", default="liver", help="what to ground (default: liver)")
    parser.add_argument("--axis", default="axial", choices=AXES)
    parser.add_argument("--fast", action="store_true", help="one-prefill <SEG> shortcut (checked per slice)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    out = check_out_dir(args.out)
    check_model_folder(args)
    check_device(args)

    import torch
    from monai.data import MetaTensor

    from ..data.lits import LITS_LABELS, load_lits_case
    from ..io import load_volume, save_nifti, write_dicom_series
    from ..io.outputs import save_overlay_montage, write_json, write_label_volume
    from ..metrics import dice_3d

    case = load_lits_case()
    ct_path = save_nifti(case.image, out / "lits_117_ct.nii.gz", affine=case.affine, dtype=None)
    series_dir = out / "lits_117_dicom"
    write_dicom_series(case.image, case.affine, series_dir, series_description="LiTS 117 CT")
    volume = load_volume(ct_path)

    started = time.perf_counter()
    pipeline = load_pipeline(args)
    result = pipeline.ground_volume(volume, args.text, axis=args.axis, fast=args.fast)
    seconds = time.perf_counter() - started

    paths = write_label_volume(
        result.label, {args.text: 1}, out, f"{args.text}_mask", dicom_source=series_dir
    )
    reference_value = {name: value for value, name in LITS_LABELS.items()}.get(args.text)
    reference = None
    dice = None
    if reference_value is not None:
        # LiTS marks tumour inside the liver with its own value: the liver is every labelled voxel.
        target = case.label >= reference_value if args.text == "liver" else case.label == reference_value
        reference = MetaTensor(torch.from_numpy(target[None].astype("uint8")), affine=volume.affine)
        dice = dice_3d(result.label > 0, reference > 0, labels=[1])["1"]
    overlay, shown = save_overlay_montage(
        volume,
        result.label,
        out / f"{args.text}_overlay.png",
        axis=args.axis,
        reference=reference,
        label_names=result.label_names,
    )
    report = {
        "model": str(args.model),
        **result.summary(),
        "dice_3d": dice,
        "seconds": round(seconds, 2),
        "outputs": {
            "ct_nifti": str(ct_path),
            "ct_dicom_series": str(series_dir),
            **{k: str(v) for k, v in paths.items()},
            "overlay": str(overlay),
            "report": str(out / "report.json"),
        },
        "overlay_slices": shown,
    }
    write_json(out / "report.json", report)
    print_report(volume_lines(report), report, args.json)
    if dice is not None and not args.json:
        print(f"3D Dice ({args.text} vs the LiTS label): {dice:.4f}")
    return 0
