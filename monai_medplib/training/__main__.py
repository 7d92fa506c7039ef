"""``python -m monai_medplib.training`` (and ``medplib train``): run one MedPLIB training stage.

One CPU or GPU::

    python -m monai_medplib.training --stage stage0 --data-root DATA --out runs/stage0 \\
        --config demo_config.json --tokenizer TOKDIR --steps 1000 --batch-size 8
    python -m monai_medplib.training --stage stage2 --data-root DATA --out runs/stage2 --init runs/stage0/hf
    python -m monai_medplib.training --stage stage3 --data-root DATA --out runs/stage3 --init runs/stage2/hf
    python -m monai_medplib.training --stage stage4 --data-root DATA --out runs/stage4 \\
        --init runs/stage2/hf --grounding-init runs/stage3/hf

Many processes (DistributedDataParallel; gloo on CPU, nccl on GPU)::

    torchrun --nproc_per_node 4 -m monai_medplib.training --stage stage4 ...

A stage resumes from ``OUT/train_state.pt`` when it exists (``--no-resume`` starts over).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence

STAGE_NAMES = ("stage0", "stage2", "stage3", "stage4")

HELP = "Run one MedPLIB training stage (stage0 / stage2 / stage3 / stage4); torchrun for several processes."


def _whole(least: int):
    """An argparse type: a whole number >= ``least`` (a zero or negative count is refused as the option's error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
        return value

    return parse


def _positive_number(text: str) -> float:
    """An argparse type: a finite number > 0 (``inf`` / ``nan`` learning rates train a NaN model)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The training entry's parser (``medplib train`` adds the same arguments with :func:`add_arguments`)."""
    parser = argparse.ArgumentParser(prog="python -m monai_medplib.training", description=HELP)
    add_arguments(parser)
    return parser


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of the training entry (shared with ``medplib train``)."""
    p.add_argument("--stage", required=True, choices=[*STAGE_NAMES, "0", "2", "3", "4"])
    p.add_argument("--data-root", required=True, help="MeCoVQA root with images/, masks/, train/*.json")
    p.add_argument("--out", required=True, help="stage folder (train_state.pt, merged model in hf/)")
    p.add_argument("--config", help="stage0: config.json of the model to train from scratch (dense)")
    p.add_argument("--tokenizer", help="stage0: folder with tokenizer.model and added_tokens.json")
    p.add_argument(
        "--init",
        help="stages 2-4: merged model folder of the previous stage (stage4: stage II), or 'demo' (the embedded "
        "demo model, to fine-tune it)",
    )
    p.add_argument("--grounding-init", help="stage4: merged stage-III model folder, or 'demo'")
    p.add_argument("--steps", type=_whole(1), default=100, help="optimizer steps")
    p.add_argument(
        "--time-budget",
        type=_positive_number,
        default=None,
        help="seconds; the schedule follows elapsed time",
    )
    p.add_argument("--batch-size", type=_whole(1), default=8, help="samples per process and micro-batch")
    p.add_argument("--grad-accum", type=_whole(1), default=1)
    p.add_argument(
        "--lr", type=_positive_number, default=None, help="peak learning rate (default: the stage's)"
    )
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--save-every", type=_whole(0), default=0)
    p.add_argument("--log-every", type=_whole(1), default=10)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--repeat", nargs="*", default=[], help="task oversampling, e.g. grounding=2")
    p.add_argument("--max-length", type=_whole(1), default=2048)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=_whole(1), default=None, help="torch CPU threads per process")
    p.add_argument("--no-bf16", action="store_true", help="no bf16 autocast on GPU")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument(
        "--budget-clock",
        choices=("wall", "cpu"),
        default="wall",
        help="what --time-budget counts: wall seconds, or CPU seconds of rank 0 (a shared machine does not "
        "shorten the stage)",
    )
    p.add_argument(
        "--absent-masks",
        action="store_true",
        help="demo-only: decode the states of absent-structure answers towards empty masks (not in the release)",
    )
    p.add_argument(
        "--null-prompt",
        action="store_true",
        help="demo-only, with --absent-masks: also decode an all-zero text prompt per image towards an empty mask",
    )
    p.add_argument(
        "--freeze",
        nargs="*",
        default=[],
        metavar="REGEX",
        help="keep the parameters whose names match these regexes frozen although the stage trains them",
    )
    p.add_argument(
        "--click-prompts",
        action="store_true",
        help="demo-only: also train SAM-Med2D point / box prompt chains on every mask (not in the release)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m monai_medplib.training ...``; returns the exit code (2 and one line for a user's mistake, as
    ``medplib train``: under torchrun every rank would otherwise print the same traceback)."""
    from ..user_input import USER_ERRORS

    try:
        return run(build_parser().parse_args(argv))
    except USER_ERRORS as err:
        print(f"python -m monai_medplib.training: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    """Run the stage described by parsed ``args`` (the ``medplib train`` command calls this)."""
    import torch  # heavy imports here: ``medplib --help`` stays fast

    from ..checkpoint import resolve_model_path
    from ..config import MedPLIBConfig
    from .click_prompts import ClickTraining
    from .distributed import cleanup, init_distributed
    from .loop import TrainConfig
    from .run import StageRun, parse_repeat, run_stage
    from .stages import STAGES

    if args.threads:
        torch.set_num_threads(args.threads)
    stage = args.stage if args.stage.startswith("stage") else f"stage{args.stage}"
    config = None
    if args.config:
        with open(args.config) as fh:
            config = MedPLIBConfig.from_dict(json.load(fh))
    train_cfg = TrainConfig(
        max_steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr if args.lr is not None else STAGES[stage].lr,
        warmup_ratio=args.warmup_ratio,
        seed=args.seed,
        save_every=args.save_every,
        log_every=args.log_every,
        bf16=not args.no_bf16,
        time_budget_s=args.time_budget,
        clicks=ClickTraining() if args.click_prompts else None,
        budget_clock=args.budget_clock,
    )
    ctx = init_distributed(args.device)
    try:
        run = StageRun(
            stage=stage,
            data_root=args.data_root,
            out_dir=args.out,
            train=train_cfg,
            tokenizer_dir=args.tokenizer,
            config=config,
            init=None if args.init is None else str(resolve_model_path(args.init)),  # "demo" -> its folder
            grounding_init=None
            if args.grounding_init is None
            else str(resolve_model_path(args.grounding_init)),
            task_repeat=parse_repeat(args.repeat),
            max_length=args.max_length,
            resume=not args.no_resume,
            absent_masks=args.absent_masks,
            null_prompt=args.null_prompt,
            freeze=tuple(args.freeze),
        )
        summary = run_stage(run, ctx, log=print if ctx.is_main else (lambda _msg: None))
        if ctx.is_main:
            print(json.dumps(summary))
    finally:
        cleanup(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
