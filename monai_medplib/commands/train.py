"""``medplib train``: one MedPLIB training stage (one CPU, one GPU, or many processes under torchrun).

The arguments are the training entry's (``python -m monai_medplib.training``); paths are checked here first, so a
wrong one is reported before torch and the model load.
"""

from __future__ import annotations

import argparse

from ..training.__main__ import HELP, add_arguments
from ._common import check_out_dir, require_path

NAME = "train"
__all__ = ["NAME", "HELP", "add_arguments", "run"]


def run(args: argparse.Namespace) -> int:
    require_path(args.data_root, "--data-root")
    check_out_dir(args.out)
    for option, value in (("--init", args.init), ("--grounding-init", args.grounding_init)):
        if value is not None and value != "demo":
            require_path(value, option)
    for option, value in (("--config", args.config), ("--tokenizer", args.tokenizer)):
        if value is not None:
            require_path(value, option)

    from ..training.__main__ import run as run_stage

    return run_stage(args)
