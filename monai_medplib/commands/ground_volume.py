"""``medplib ground-volume VOLUME TEXT [TEXT ...]``: ground structures on every slice of a CT / MR volume.

Writes the label volume as NIfTI in the input's geometry (and a DICOM-SEG for a DICOM series folder), an overlay
PNG of representative slices (a colour per text, with a legend) and a JSON report
(:meth:`~monai_medplib.pipeline.results.VolumeGroundingResult.summary`); prints per text whether it was found,
where, how much (voxels, mL) and what the model said. Several texts share one label volume: a voxel goes to the
text with the highest probability where that probability passes the release threshold 0.1.

``--keyframes K`` (opt-in, beyond the release) runs the language model on key slices only
(:mod:`~monai_medplib.pipeline.keyframes`); the command prints how many language-model passes ran and the JSON
report holds them (``paths.llm_passes``, ``paths.keyframes``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..transforms.planes import AXES
from ..user_input import RECOMMENDED_KEYFRAMES, UserInputError, parse_keyframes, parse_slice_selection
from ._common import (
    add_model_arguments,
    check_device,
    check_model_folder,
    check_out_dir,
    check_outputs_spare_inputs,
    load_pipeline,
    require_path,
    split_texts,
)
from ._report import passes_line, print_report, volume_lines

NAME = "ground-volume"
HELP = "ground one or several structures in a volume (NIfTI, NRRD, DICOM folder) -> NIfTI / DICOM-SEG"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("volume", help="NIfTI / NRRD file or DICOM series folder")
    parser.add_argument(
        "text",
        nargs="+",
        help='structure names or requests: liver tumour | "liver, tumour" | "Please segment ..."',
    )
    parser.add_argument("--out", default="outputs/ground_volume", help="output folder")
    parser.add_argument("--axis", default="axial", choices=AXES)
    parser.add_argument(
        "--slices",
        nargs="*",
        default=None,
        help="slice indices or ranges along --axis: 60 61 | 60-67 (default: all)",
    )
    parser.add_argument("--fast", action="store_true", help="one-prefill <SEG> shortcut (checked per slice)")
    parser.add_argument(
        "--keyframes",
        metavar="K",
        default=None,
        help="opt-in: run the language model on every K-th slice (plus the range's ends and the slices the "
        "adaptive check adds) and decode the others with their neighbouring key's <SEG> prompt "
        f"(default: off, every slice, the release's way; {RECOMMENDED_KEYFRAMES} is the measured recommendation)",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    texts = split_texts(args.text)
    require_path(args.volume)
    if args.batch_size < 1:
        raise UserInputError(f"--batch-size must be >= 1, got {args.batch_size}")
    keyframes = (
        None if args.keyframes is None else parse_keyframes(args.keyframes, "--keyframes", allow_off=False)
    )
    check_outputs_spare_inputs(args.volume, {"--out": args.out})
    out = check_out_dir(args.out)
    check_model_folder(args)
    check_device(args)

    from ._inputs import check_input, read_volume

    if check_input(args.volume) == "image":
        raise UserInputError(f"{args.volume}: a 2D image, not a volume; use medplib ground")

    from ..io.dicom_seg import check_seg_source
    from ..io.outputs import save_overlay_montage, write_json, write_label_volume
    from ..io.readers import file_stem
    from ..transforms.slicing import slice_geometry, volume_affine_ras

    source = Path(args.volume)
    volume = read_volume(source)
    if source.is_dir():  # a series its DICOM-SEG cannot describe is refused before the model runs, not after
        check_seg_source(source)
    num_slices = slice_geometry(volume_affine_ras(volume), volume.shape[1:], args.axis).num_slices
    slices = (
        None if args.slices is None else parse_slice_selection(",".join(args.slices), num_slices, "--slices")
    )
    pipeline = load_pipeline(args)
    result = pipeline.ground_volume(
        volume,
        texts,
        axis=args.axis,
        slices=slices,
        fast=args.fast,
        batch_size=args.batch_size,
        keyframes=keyframes,
    )
    names = result.label_names
    stem = file_stem(source)
    paths = write_label_volume(
        result.label, names, out, f"{stem}_medplib", dicom_source=source if source.is_dir() else None
    )
    overlay, shown = save_overlay_montage(
        volume, result.label, out / f"{stem}_overlay.png", axis=args.axis, window=None, label_names=names
    )
    report_path = out / f"{stem}_medplib.json"
    report = {
        "volume": str(source),
        **result.summary(),
        "outputs": {
            **{k: str(v) for k, v in paths.items()},
            "overlay": str(overlay),
            "report": str(report_path),
        },
        "overlay_slices": shown,
    }
    write_json(report_path, report)
    print_report([*volume_lines(report), passes_line(report)], report, args.json)
    return 0
