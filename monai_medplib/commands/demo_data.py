"""``medplib demo-data --out demo_data``: build the demo dataset, the on-ramp to ``medplib train`` and ``eval``.

Slices of the LiTS CT and the MNI152 MR shipped on PyPI, normalised the SA-Med2D way, with grounding, closed VQA
and region VQA conversations in the MeCoVQA layout (``images/``, ``masks/``, ``train/*.json``, ``test/*.json``,
``split.json``); what the demo model was trained and evaluated on (:mod:`monai_medplib.data.demo_dataset`).
"""

from __future__ import annotations

import argparse

from ._common import check_out_dir

NAME = "demo-data"
HELP = "build the demo dataset (LiTS CT + MNI152 MR slices, MeCoVQA layout) for medplib train / eval"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_data", help="dataset folder (default: demo_data)")
    parser.add_argument(
        "--splits", nargs="+", choices=("train", "test"), default=["train", "test"], help="default: both"
    )


def run(args: argparse.Namespace) -> int:
    import json

    out = check_out_dir(args.out)

    from ..data.demo_dataset import RECIPE_DATA, build_demo_dataset

    summary = build_demo_dataset(out, splits=tuple(args.splits), **RECIPE_DATA)
    for split, tasks in summary["counts"].items():
        counts = ", ".join(f"{task} {n}" for task, n in tasks.items())
        print(f"{out / split}: {counts}")
    print(f"split: {out / 'split.json'} ({json.dumps(summary.get('volumes', {}))})")
    return 0
