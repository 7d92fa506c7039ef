"""``medplib ground-volume VOLUME TEXT [TEXT ...]``: ground structures on every slice of a CT / MR volume."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..transforms.planes import AXES
from ._common import add_model_arguments, load_pipeline

NAME = "ground-volume"
HELP = "ground one or several structures in a volume (NIfTI, NRRD, DICOM folder) -> NIfTI / DICOM-SEG"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("volume", help="NIfTI / NRRD file or DICOM series folder")
    parser.add_argument("text", nargs="+", help='structures or requests, e.g. "liver" "liver tumour"')
    parser.add_argument("--out", default="outputs/ground_volume", help="output folder")
    parser.add_argument("--axis", default="axial", choices=AXES)
    parser.add_argument("--slices", type=int, nargs="*", default=None, help="slice indices (default: all)")
    parser.add_argument("--fast", action="store_true", help="one-prefill <SEG> shortcut (checked per slice)")
    parser.add_argument("--batch-size", type=int, default=8)
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..io import load_volume
    from ..io.outputs import save_overlay_montage, write_json, write_label_volume

    source = Path(args.volume)
    if not source.exists():
        raise FileNotFoundError(f"volume not found: {source}")
    volume = load_volume(source)
    pipeline = load_pipeline(args)
    result = pipeline.ground_volume(
        volume, args.text, axis=args.axis, slices=args.slices, fast=args.fast, batch_size=args.batch_size
    )
    names = result.label_names
    stem = source.name.split(".")[0] or "volume"
    paths = write_label_volume(
        result.label, names, args.out, f"{stem}_medplib", dicom_source=source if source.is_dir() else None
    )
    overlay, shown = save_overlay_montage(
        volume, result.label, Path(args.out) / f"{stem}_overlay.png", axis=args.axis
    )
    report = {
        "volume": str(source),
        **result.summary(),
        "outputs": {**{k: str(v) for k, v in paths.items()}, "overlay": str(overlay)},
        "overlay_slices": shown,
    }
    write_json(Path(args.out) / f"{stem}_medplib.json", report)
    print(json.dumps(report, indent=2))
    return 0
