"""``medplib serve``: the MONAI Label server with the MedPLIB app (3D Slicer / OHIF)."""

from __future__ import annotations

import argparse

NAME = "serve"
HELP = "run the MONAI Label server with the MedPLIB app (grounding, VQA, region VQA, click refinement)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..adapters.monailabel.server import add_serve_arguments

    add_serve_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..adapters.monailabel.server import run_serve

    return run_serve(args)
