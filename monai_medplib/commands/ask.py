"""``medplib ask IMAGE QUESTION``: answer a question about an image, or about a region of it."""

from __future__ import annotations

import argparse

from ._common import add_generation_arguments, add_model_arguments, generation_kwargs, load_pipeline

NAME = "ask"
HELP = "answer a question about an image (VQA), or about a region given by points, a box or a mask"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="image file (PNG, JPEG, ...)")
    parser.add_argument("question", help="the question; mark the region's place with <region> if you like")
    region = parser.add_argument_group("region (region VQA; give one kind)")
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
        raise ValueError(f"give one region prompt, got {', '.join(sorted(region))}")
    pipe = load_pipeline(args)
    if region:
        text = pipe.answer_region(
            args.image,
            args.question,
            official_eval_region=args.official_eval_region,
            **region,
            **generation_kwargs(args),
        )
    else:
        text = pipe.answer(args.image, args.question, **generation_kwargs(args))
    print(text)
    return 0
