"""``medplib verify-parity FIXTURE_DIR``: compare this implementation with outputs of the original code."""

from __future__ import annotations

import argparse

from ._common import require_path

NAME = "verify-parity"
HELP = "run a golden fixture saved by the original MedPLIB code and compare every stored quantity"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "fixture_dir", help="fixture directory (model/, inputs/, expected/, tokenization.json)"
    )
    parser.add_argument("--device", default="cpu", help="where to run (fp32); the fixtures were made on CPU")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--failures-only", action="store_true", help="print only the rows that fail")


def run(args: argparse.Namespace) -> int:
    require_path(args.fixture_dir)

    import torch

    from ..parity import run_parity

    if args.threads:
        torch.set_num_threads(args.threads)
    report = run_parity(args.fixture_dir, device=args.device)
    print(report.format_table(failures_only=args.failures_only))
    print("PARITY OK" if report.ok else "PARITY FAILED")
    return 0 if report.ok else 1
