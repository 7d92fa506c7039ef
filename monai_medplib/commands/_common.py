"""Arguments shared by the model-running sub-commands."""

from __future__ import annotations

import argparse
from typing import Any

from ..devices import DTYPE_NAMES
from ..pipeline.options import MAX_NEW_TOKENS


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="demo", help="MedPLIB model directory, or 'demo' (default)")
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    group.add_argument(
        "--dtype", choices=DTYPE_NAMES, default=None, help="default: float32 on CPU, bfloat16 on CUDA"
    )
    group.add_argument(
        "--template",
        default="vicuna_v1",
        choices=("vicuna_v1", "llava_v1"),
        help="conversation template: vicuna_v1 (official evaluation) or llava_v1 (training / demo)",
    )


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation (default: greedy, as the official evaluation)")
    group.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS["image"])
    group.add_argument("--temperature", type=float, default=0.0, help="< 1e-4 means greedy")
    group.add_argument("--seed", type=int, default=None, help="seed for sampling")


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "seed": args.seed}


def load_pipeline(args: argparse.Namespace):
    from ..pipeline import MedPLIBPipeline

    return MedPLIBPipeline.from_pretrained(
        args.model, device=args.device, dtype=args.dtype, template=args.template
    )
