"""``medplib bundle export DIR``: write a runnable copy of the MedPLIB MONAI Bundle (the one the package ships).

The copy is the bundle as MONAI expects it (``configs/``, ``docs/``, ``schema/``, ``large_files.yml``, ``LICENSE``),
without run-time folders; run it from there with ``python -m monai.bundle run --config_file configs/inference.json``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

NAME = "bundle"
HELP = "write a runnable copy of the MedPLIB MONAI Bundle: medplib bundle export DIR"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="bundle_action", metavar="ACTION", required=True)
    export = actions.add_parser("export", help="copy the bundle to DIR (a new or empty folder)")
    export.add_argument("dir", help="destination folder (created; must be empty if it exists)")


def export_bundle(destination: str | Path) -> Path:
    """Copy the shipped bundle into ``destination`` (created, or an existing empty folder) and return it.

    Raises:
        UserInputError: ``destination`` is a file or a folder that is not empty.
    """
    from ..adapters.shipped import EXCLUDED, shipped_dir
    from ..user_input import UserInputError

    source = shipped_dir("bundle")
    target = Path(destination).expanduser()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserInputError(
            f"{target} exists and is not an empty folder; choose a new folder for the bundle"
        )
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*EXCLUDED), dirs_exist_ok=True)
    return target


def run(args: argparse.Namespace) -> int:
    target = export_bundle(args.dir).resolve()
    print(f"MedPLIB bundle written to {target}")
    from .demo import CT_NIFTI, DEFAULT_OUT

    # the suggested image is the one `medplib demo` writes, so the line runs as printed after the README's main job
    example = (DEFAULT_OUT / CT_NIFTI).resolve()
    print(
        f"run it on a volume (`medplib demo` writes {example}): cd {target} && python -m monai.bundle run "
        f"--config_file configs/inference.json --input_dict \"{{'image': '{example}', "
        "'text': 'Please segment the liver.'}\""
    )
    return 0
