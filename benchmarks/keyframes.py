"""Keyframe grounding (``ground_volume(keyframes=k)``) against exact grounding: quality and speed, in one run.

    python benchmarks/keyframes.py                      # quality table + demo speed + release-size speed
    python benchmarks/keyframes.py --release-slices 0   # skip the full-size model (it takes ~40 min on 2 cores)

1. Quality, on the demo model: liver and tumour on the LiTS CT, grey and white matter on the MNI152 MR, each on
   all three planes of its volume, for k = 4, 8, 16 and nearest / linear prompt interpolation: 3D Dice against
   exact grounding and against the reference label, per-slice Dice against exact (minimum and 5th percentile over
   slices where either mask has a voxel), false-positive voxels on slices where exact grounding is empty, and
   the LLM passes. Control: every slice decoded with a zero prompt embedding (no LLM at all); keyframe figures
   mean something only where the control is clearly worse.
2. Speed, exact vs keyframe (k = 8) with fresh caches: the demo model on the 128-slice LiTS CT, and the
   full-size 7b-2e architecture with random weights (shared LLM layers, fp32, forced ``<SEG>``) on a short
   synthetic CT; plus the 300-slice figure projected from the measured per-network costs.

The last line is one JSON object. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
from datetime import datetime, timezone

import numpy as np
import torch
from common import (
    TINY,
    build_random_release_model,
    dice,
    keyframe_row,
    lits_volume,
    network_floor,
    synthetic_ct,
    timed,
    zero_prompt_label,
)
from monai.data import MetaTensor

from monai_medplib.data.lits import load_lits_case
from monai_medplib.data.mni import load_mni_case
from monai_medplib.pipeline import MedPLIBPipeline
from monai_medplib.tokenization import MedPLIBTokenizer
from monai_medplib.transforms.planes import AXES
from monai_medplib.transforms.slicing import slice_geometry, volume_affine_ras

KS = (4, 8, 16)
INTERPOLATIONS = ("nearest", "linear")


def targets() -> list[tuple[str, MetaTensor, np.ndarray]]:
    """``(text, volume, reference mask)`` of every target the quality table covers."""
    lits = load_lits_case()
    ct = MetaTensor(torch.from_numpy(lits.image)[None], affine=torch.from_numpy(lits.affine))
    lits_label = lits.label
    mni = load_mni_case()
    mr = MetaTensor(torch.from_numpy(mni.image)[None], affine=torch.from_numpy(mni.affine))
    return [
        ("liver", ct, lits_label >= 1),
        ("tumour", ct, lits_label == 2),
        ("grey matter", mr, mni.label == 1),
        ("white matter", mr, mni.label == 2),
    ]


def quality(pipe: MedPLIBPipeline, texts: list[str] | None = None) -> list[dict]:
    rows = []
    for text, volume, reference in targets():
        if texts and text not in texts:
            continue
        for axis in AXES:
            slice_dim = slice_geometry(volume_affine_ras(volume), volume.shape[1:], axis).slice_dim
            exact = pipe.ground_volume(volume, text, axis=axis, progress=False, keep_slice_results=False)
            exact_mask = exact.label[0].numpy() > 0
            base = {
                "text": text,
                "axis": axis,
                "exact_dice_vs_reference": round(dice(exact_mask, reference), 4),
            }
            control = keyframe_row(exact_mask, zero_prompt_label(pipe, volume, axis), reference, slice_dim)
            rows.append({**base, "mode": "zero_prompt", **control, "llm_passes": 0})
            for k in KS:
                for interpolation in INTERPOLATIONS:
                    keyed = pipe.ground_volume(
                        volume,
                        text,
                        axis=axis,
                        progress=False,
                        keep_slice_results=False,
                        keyframes=k,
                        keyframe_interpolation=interpolation,
                    )
                    row = keyframe_row(exact_mask, keyed.label[0].numpy() > 0, reference, slice_dim)
                    passes = keyed.paths["llm_passes"]
                    rows.append({**base, "mode": f"k{k}_{interpolation}", **row, "llm_passes": passes})
            rows[-1 - 2 * len(KS)]["exact_llm_passes"] = exact.paths["llm_passes"]
            print(json.dumps(rows[-1 - 2 * len(KS)]), flush=True)
    return rows


def speed(
    pipe: MedPLIBPipeline, volume: MetaTensor, text: str, k: int, labels: dict | None = None, **grounding
) -> dict:
    """Exact vs keyframe grounding of ``volume`` with empty caches, in one process; ``labels`` (if given) receives
    the two bool label volumes as ``"exact"`` and ``"keyframe"``."""
    pipe.feature_cache.clear()
    pipe.volume_cache.clear()
    exact_s, exact = timed(lambda: pipe.ground_volume(volume, text, progress=False, **grounding))
    pipe.feature_cache.clear()
    pipe.volume_cache.clear()
    keyed_s, keyed = timed(lambda: pipe.ground_volume(volume, text, progress=False, keyframes=k, **grounding))
    a, b = exact.label[0].numpy() > 0, keyed.label[0].numpy() > 0
    if labels is not None:
        labels.update(exact=a, keyframe=b)
    return {
        "slices": len(exact.slices),
        "k": k,
        "exact_seconds": round(exact_s, 2),
        "keyframe_seconds": round(keyed_s, 2),
        "speedup": round(exact_s / keyed_s, 2),
        "llm_passes": [exact.paths["llm_passes"], keyed.paths["llm_passes"]],
        "dice_vs_exact": round(dice(a, b), 4),
    }


def projected(floor: dict[str, float], slices: int, k: int, checks: int) -> dict:
    """Exact vs keyframe time of a ``slices``-slice volume from per-slice network costs (no bisection)."""
    keys = math.ceil((slices - 1) / k) + 1
    exact = slices * sum(floor.values())
    keyed = keys * (floor["clip"] + floor["prefill"]) + slices * floor["sam_encoder"]
    keyed += (slices + 2 * checks) * floor["sam_decoder"]
    return {
        "slices": slices,
        "k": k,
        "keys": keys,
        "exact_hours": round(exact / 3.6e6, 2),
        "keyframe_hours": round(keyed / 3.6e6, 2),
        "speedup": round(exact / keyed, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--release-slices", type=int, default=33, help="0 skips the full-size model")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--texts", nargs="*", help="quality table for these targets only (several runs in parallel)"
    )
    parser.add_argument("--skip-demo-speed", action="store_true")
    parser.add_argument(
        "--model", default="demo", help="model folder of the quality table (default: the demo model)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    results: dict = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    demo = MedPLIBPipeline.from_pretrained(args.model, device="cpu")
    if not args.skip_quality:
        results["quality"] = quality(demo, args.texts)
    if not args.skip_demo_speed:
        results["demo_speed"] = speed(demo, lits_volume(128), "liver", 8, fast=True)
    if args.release_slices:
        model = build_random_release_model("cpu", torch.float32, share_llm_layers=True)
        tokenizer = MedPLIBTokenizer.from_pretrained(TINY)  # its ids are valid in the 32k release vocabulary
        release = MedPLIBPipeline(model, tokenizer)
        volume = synthetic_ct(args.release_slices)
        results["release_speed"] = speed(release, volume, "Please segment the liver.", 8, force_seg=True)
        floor = network_floor(model, tokenizer, volume, "Please segment the liver.", [0, 1])
        results["release_floor_ms"] = {name: round(ms, 1) for name, ms in floor.items()}
        results["release_projected_300"] = projected(floor, 300, 8, checks=37)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
