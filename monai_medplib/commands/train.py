"""``medplib train``: one MedPLIB training stage (one CPU, one GPU, or many processes under torchrun)."""

from __future__ import annotations

from ..training.__main__ import HELP, add_arguments, run

NAME = "train"
__all__ = ["NAME", "HELP", "add_arguments", "run"]
