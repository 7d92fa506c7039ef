"""``medplib ground IMAGE TEXT``: segment what the text asks for; writes the mask and an overlay PNG."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._common import add_generation_arguments, add_model_arguments, generation_kwargs, load_pipeline

NAME = "ground"
HELP = "segment what a text asks for (pixel grounding); writes the mask PNG and an overlay PNG"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="image file (PNG, JPEG, ...)")
    parser.add_argument("text", help='what to segment, e.g. "Please segment the liver."')
    parser.add_argument("--mask-out", help="mask PNG (0/255); default: <image stem>_mask.png here")
    parser.add_argument("--overlay-out", help="overlay PNG; default: <image stem>_overlay.png here")
    parser.add_argument("--force-seg", action="store_true", help="force the answer <SEG></s> (always a mask)")
    parser.add_argument(
        "--all-seg", action="store_true", help="decode every <SEG> (extra masks as *_mask_<k>.png)"
    )
    parser.add_argument(
        "--seg-rule", choices=("release", "clean"), default="release", help="[SEG] state selection"
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_model_arguments(parser)
    add_generation_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..io.outputs import save_mask_png, save_overlay_png
    from ..processing import load_rgb

    rgb = load_rgb(args.image)
    pipe = load_pipeline(args)
    result = pipe.ground(
        rgb,
        args.text,
        force_seg=args.force_seg,
        all_seg=args.all_seg,
        seg_rule=args.seg_rule,
        **generation_kwargs(args),
    )
    stem = Path(args.image).stem
    mask_path = save_mask_png(result.mask, args.mask_out or f"{stem}_mask.png")
    overlay_path = save_overlay_png(rgb, result.mask, args.overlay_out or f"{stem}_overlay.png")
    extra = [
        str(save_mask_png(mask, mask_path.with_name(f"{mask_path.stem}_{k}{mask_path.suffix}")))
        for k, mask in enumerate(result.all_masks[1:], start=1)
    ]
    summary = {
        "answer": result.answer,
        "has_seg": result.has_seg,
        "foreground_pixels": int(result.mask.sum()),
        "mask": str(mask_path),
        "overlay": str(overlay_path),
        "extra_masks": extra,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            if value != []:
                print(f"{key}: {value}")
    return 0
