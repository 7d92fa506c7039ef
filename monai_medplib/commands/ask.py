"""``medplib ask IMAGE QUESTION``: answer a question about an image or a volume slice, or about a region of it."""

from __future__ import annotations

import argparse

from ..user_input import UserInputError
from ._common import (
    add_generation_arguments,
    add_model_arguments,
    check_device,
    check_model_folder,
    generation_kwargs,
    load_pipeline,
    require_path,
)
from .ground import add_slice_arguments

NAME = "ask"
HELP = "answer a question about an image or a volume slice (VQA), or about a region (points, a box or a mask)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="image (PNG, JPEG, single DICOM) or volume (NIfTI, NRRD, DICOM folder)")
    parser.add_argument("question", help="the question; mark the region's place with <region> if you like")
    add_slice_arguments(parser)
    region = parser.add_argument_group(
        "region (region VQA; give one kind; pixels of the image, or of the slice as `medplib slice` writes it)"
    )
    region.add_argument(
        "--point",
        nargs=2,
        type=float,
        action="append",
        metavar=("X", "Y"),
        help="clicked pixel (column, row); repeatable; becomes a 41x41 px square around the median click",
    )
    region.add_argument(
        "--box", nargs=4, type=float, metavar=("X0", "Y0", "X1", "Y1"), help="box, corners inclusive"
    )
    region.add_argument("--region-mask", help="region mask image at the image's size (non-zero = region)")
    region.add_argument(
        "--official-eval-region",
        action="store_true",
        help="reproduce the official evaluation script, which drops the region feature",
    )
    add_model_arguments(parser)
    add_generation_arguments(parser)


def run(args: argparse.Namespace) -> int:
    region = {"points": args.point, "box": args.box, "mask": args.region_mask}
    region = {key: value for key, value in region.items() if value is not None}
    if len(region) > 1:
        raise UserInputError(f"give one region prompt, got {', '.join(sorted(region))}")
    require_path(args.image)
    if "mask" in region:
        require_path(region["mask"], "--region-mask")
    check_model_folder(args)
    check_device(args)

    from ._inputs import read_model_image, read_picture

    image = read_model_image(args.image, args.slice_index, args.axis)
    if "mask" in region:
        region["mask"] = read_picture(region["mask"], as_rgb=False)
    pipe = load_pipeline(args)
    if region:
        text = pipe.answer_region(
            image.pixels,
            args.question,
            official_eval_region=args.official_eval_region,
            **region,
            **generation_kwargs(args),
        )
    else:
        text = pipe.answer(image.pixels, args.question, **generation_kwargs(args))
    print(text)
    return 0
