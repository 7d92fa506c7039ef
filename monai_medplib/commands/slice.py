"""``medplib slice VOLUME --axis axial --index 64 --out slice.png``: one slice of a volume as the model sees it.

The volume is normalised the model's way (SA-Med2D: the 0.5 / 99.5 percentiles of the whole volume stretched to
0-255, the pipeline's volume path) and the plane is cut in the display orientation, so the PNG is exactly what
``medplib ask`` / ``ground VOLUME --slice`` and the volume calls give the model. A user's own windowed PNG is not:
the model was trained on SA-Med2D's normalisation, and grounds less well on other mappings.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..transforms.planes import AXES
from ..user_input import UserInputError
from ._common import check_out_file, check_outputs_spare_inputs, require_path

NAME = "slice"
HELP = (
    "write one slice of a volume (NIfTI, NRRD, DICOM) as the model-ready 8-bit PNG (SA-Med2D normalisation)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("volume", help="NIfTI / NRRD file, DICOM series folder or multi-frame DICOM file")
    parser.add_argument("--axis", choices=AXES, default="axial", help="plane to cut (default: axial)")
    parser.add_argument(
        "--index", type=int, default=None, help="slice index along --axis (default: the middle)"
    )
    parser.add_argument(
        "--out", default=None, help="PNG to write (default: <volume stem>_<axis><index>.png here)"
    )


def run(args: argparse.Namespace) -> int:
    require_path(args.volume)
    if args.out is not None:
        check_out_file(args.out)
        if Path(args.out).suffix.lower() not in ("", ".png"):
            raise UserInputError(
                f"--out {args.out}: the slice is written as a PNG; give a name ending in .png"
            )
        check_outputs_spare_inputs(args.volume, {"--out": args.out})

    from ..io.outputs import save_png
    from ._inputs import check_input, read_volume, volume_slice

    if check_input(args.volume) == "image":
        raise UserInputError(f"{args.volume}: a 2D image, not a volume")
    image = volume_slice(read_volume(args.volume), args.volume, args.axis, args.index, option="--index")
    path = save_png(image.pixels, args.out or f"{image.stem}.png")
    source = image.source
    print(
        f"{path}: {source['axis']} slice {source['slice']} of {source['slices']}, "
        f"{image.pixels.shape[1]}x{image.pixels.shape[0]} pixels (width x height)"
    )
    return 0
