"""``medplib ground IMAGE TEXT [TEXT ...]``: segment structures in a 2D image or one slice of a volume.

Texts are structure names (``liver``; ``"liver, tumour"`` names two) or full requests; a name becomes the request
the model was trained on ("Please segment the liver."). Several texts share one label map by the volume rule
(:func:`~monai_medplib.pipeline.results.label_from_probs`): a pixel goes to the text with the highest probability
where that probability passes the release threshold 0.1. Written to ``--out``: one mask PNG per text (0 / 255),
an overlay PNG (a colour per text, with a legend) and a JSON report; printed: per text, found or not, how many
pixels, and the model's words.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..transforms.planes import AXES
from ..user_input import UserInputError
from ._common import (
    add_generation_arguments,
    add_model_arguments,
    check_device,
    check_model_folder,
    check_out_dir,
    check_out_file,
    check_outputs_spare_inputs,
    generation_kwargs,
    load_pipeline,
    require_path,
    split_texts,
    text_slug,
)
from ._report import image_lines, print_report

NAME = "ground"
HELP = "segment structures in an image or a volume slice (pixel grounding); writes mask PNGs, an overlay, a report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="image (PNG, JPEG, single DICOM) or volume (NIfTI, NRRD, DICOM folder)")
    parser.add_argument(
        "text",
        nargs="+",
        help='structure names or requests: liver | "liver, tumour" | "Please segment the liver."',
    )
    parser.add_argument("--out", default=".", help="output folder (default: here)")
    add_slice_arguments(parser)
    parser.add_argument("--mask-out", help="mask PNG of a single text (default: OUT/<stem>_mask.png)")
    parser.add_argument("--overlay-out", help="overlay PNG (default: OUT/<stem>_overlay.png)")
    parser.add_argument("--force-seg", action="store_true", help="force the answer <SEG></s> (always a mask)")
    parser.add_argument(
        "--all-seg", action="store_true", help="decode every <SEG> (extra masks as *_mask_<k>.png)"
    )
    parser.add_argument(
        "--seg-rule", choices=("release", "clean"), default="release", help="[SEG] state selection"
    )
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    add_model_arguments(parser)
    add_generation_arguments(parser)


def add_slice_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("volumes (NIfTI, NRRD, DICOM folder or multi-frame DICOM)")
    group.add_argument("--axis", choices=AXES, default=None, help="plane to cut (default: axial)")
    group.add_argument(
        "--slice",
        type=int,
        default=None,
        dest="slice_index",
        help="slice index along --axis (default: the middle)",
    )


def run(args: argparse.Namespace) -> int:
    texts = split_texts(args.text)
    require_path(args.image)
    out = check_out_dir(args.out)
    if args.mask_out and len(texts) > 1:
        raise UserInputError(f"--mask-out names one file but {len(texts)} texts were given; use --out")
    for option, path in (("--mask-out", args.mask_out), ("--overlay-out", args.overlay_out)):
        if path:
            check_out_file(path, option)
            if Path(path).suffix.lower() not in ("", ".png"):
                raise UserInputError(f"{option} {path}: written as a PNG; give a name ending in .png")
    check_model_folder(args)
    check_device(args)

    import numpy as np
    import torch

    from ..io.outputs import save_mask_png, save_overlay_png, write_json
    from ._inputs import read_model_image

    image = read_model_image(args.image, args.slice_index, args.axis)
    stem = image.stem
    check_outputs_spare_inputs(  # before the model loads
        args.image,
        {
            "--mask-out": args.mask_out or out / f"{stem}_mask.png",
            "--overlay-out": args.overlay_out or out / f"{stem}_overlay.png",
            "the report": out / f"{stem}_ground.json",
        },
    )

    from ..pipeline.results import label_from_probs
    from ..tokenization import grounding_prompt, plain_answer

    requests = {t: grounding_prompt(t) for t in texts}
    pipe = load_pipeline(args)
    results = pipe.ground_batch(
        [image.pixels] * len(texts),
        list(requests.values()),
        force_seg=args.force_seg,
        all_seg=args.all_seg,
        seg_rule=args.seg_rule,
        **generation_kwargs(args),
    )
    label = label_from_probs(torch.stack([torch.from_numpy(r.probs) for r in results])).numpy()
    names = {t: n + 1 for n, t in enumerate(texts)}

    outputs: dict[str, str] = {}
    targets = {}
    for (text, value), result in zip(names.items(), results):
        mask = label == value
        if len(texts) == 1:
            path = Path(args.mask_out) if args.mask_out else out / f"{stem}_mask.png"
        else:
            path = out / f"{stem}_{value}_{text_slug(text)}_mask.png"
        outputs[f"mask {text}" if len(texts) > 1 else "mask"] = str(save_mask_png(mask, path))
        for k, extra in enumerate(result.all_masks[1:], start=1):
            outputs[f"mask {text} #{k}"] = str(save_mask_png(extra, path.with_name(f"{path.stem}_{k}.png")))
        targets[text] = {
            "label": value,
            "request": requests[text],
            "found": bool(mask.any()),
            "pixels": int(mask.sum()),
            "own_pixels": int(np.count_nonzero(result.mask)),  # before the overlap rule
            "has_seg": result.has_seg,
            "answer": plain_answer(result.answer),
        }
    overlay = Path(args.overlay_out) if args.overlay_out else out / f"{stem}_overlay.png"
    outputs["overlay"] = str(save_overlay_png(image.rgb, label, overlay, label_names=names))
    report_path = out / f"{stem}_ground.json"
    outputs["report"] = str(report_path)
    report = {
        "image": image.source,
        "shape": list(label.shape),
        "targets": targets,
        "outputs": outputs,
    }
    write_json(report_path, report)
    print_report(image_lines(report), report, args.json)
    return 0
