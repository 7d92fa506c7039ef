"""``medplib eval``: score a model on MeCoVQA-layout test files, write a JSON report and print a table.

Without ``--data-root`` the demo dataset's held-out slabs are built from the LiTS CT and the MNI152 MR shipped on
PyPI (about 20 s, kept for later runs), so the command works on a fresh machine; the demo model's acceptance
figures (``monai_medplib.evaluation.acceptance``: per-target mDice, the text controls, absent structures,
region / closed VQA by wording set, the docs' example questions, click refinement) are added to the report.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from ..user_input import UserInputError
from ._common import add_model_arguments, check_device, check_model_folder, check_out_file, load_pipeline

NAME = "eval"
HELP = "evaluate a model on MeCoVQA test files (grounding mIoU / mDice, VQA); writes a JSON report"

DEFAULT_OUT = Path("medplib_eval") / "report.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # no library import here: the parser is built for every ``medplib`` call (task names are checked in run)
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="MeCoVQA / SA-Med2D root holding the release test files test/MeCoVQA_*_test.json "
        "(default: the demo held-out split, built on the fly)",
    )
    data.add_argument(
        "--file",
        action="append",
        default=None,
        metavar="TASK=PATH",
        help="explicit test file of a task (grounding, vqa, region_vqa), relative to --data-root; repeatable",
    )
    data.add_argument(
        "--tasks", nargs="+", default=None, help="evaluate only these tasks (grounding, vqa, region_vqa)"
    )
    data.add_argument("--limit", type=int, default=None, help="first N entries of each file")
    data.add_argument(
        "--demo-data",
        type=Path,
        default=None,
        help="where the demo split is built when --data-root is omitted (default: demo_data/ beside --out)",
    )
    acceptance = parser.add_argument_group("demo acceptance figures (default: on with the demo split)")
    acceptance.add_argument(
        "--acceptance",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also report the demo acceptance figures on the held-out slices of the demo volumes "
        "(default: only when --data-root is omitted)",
    )
    acceptance.add_argument(
        "--acceptance-every", type=int, default=1, help="every N-th held-out slice of each plane (default 1)"
    )
    acceptance.add_argument(
        "--clicks", type=int, default=3, help="simulated refinement clicks per grounding (default 3; 0 skips)"
    )
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"report JSON (default: {DEFAULT_OUT})")
    out.add_argument(
        "--predictions",
        type=Path,
        default=None,
        help="per-sample predictions JSON (default: <out stem>_predictions.json beside the report); a run that "
        "stops early leaves the predictions scored so far there",
    )
    protocol = parser.add_argument_group("protocol (default: the release evaluation)")
    protocol.add_argument("--batch-size", type=int, default=8, help="samples per generation batch")
    protocol.add_argument("--max-new-tokens", type=int, default=1024, help="decoding budget (release: 1024)")
    protocol.add_argument(
        "--force-seg", action="store_true", help="force <SEG></s> when grounding (random-weight models)"
    )
    protocol.add_argument(
        "--official-eval-region",
        action="store_true",
        help="drop the region feature in region VQA, as the release evaluation script does",
    )
    protocol.add_argument(
        "--keep-largest-component",
        action="store_true",
        help="region grid from the largest connected component (the training dataset's path)",
    )
    add_model_arguments(parser)


def _parse_files(items: list[str] | None) -> dict[str, str] | None:
    if not items:
        return None
    files = {}
    for item in items:
        task, sep, path = item.partition("=")
        if not sep or not task or not path:
            raise ValueError(f"--file must be TASK=PATH, got {item!r}")
        files[task.strip()] = path.strip()
    return files


class ProgressBar:
    """One tqdm bar on stderr for the evaluation's progress lines (``"vqa: 16/234"``, ``"grounding 8/156"``,
    ``"closed VQA 234"``): a new step name restarts the bar with its own total, so a run shows one line that moves
    instead of a line per batch."""

    _STEP = re.compile(r"^(?P<name>.*?):?\s+(?P<done>\d+)(?:/(?P<total>\d+))?$")

    def __init__(self) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=0, file=sys.stderr, unit="item", dynamic_ncols=True)
        self.name: str | None = None

    def __call__(self, line: str) -> None:
        match = self._STEP.match(line.strip())
        if match is None:
            self.bar.set_description_str(line.strip())
            return
        done = int(match["done"])
        total = int(match["total"] or done)
        if match["name"] != self.name:
            self.name = match["name"]
            self.bar.reset(total=total)
            self.bar.set_description_str(self.name)
        self.bar.update(done - self.bar.n)
        self.bar.refresh()  # a batch is seconds of work: show each step, whatever tqdm's redraw interval

    def close(self) -> None:
        self.bar.close()


def demo_data_root(folder: Path) -> Path:
    """The demo held-out split under ``folder``: the one the demo model's card reports (built from the demo volumes
    with the recipe's settings when it is not there yet, or when the folder holds one of other settings)."""
    from ..data.demo_dataset import RECIPE_DATA, build_demo_dataset

    split = folder / "split.json"
    built = json.loads(split.read_text()) if split.is_file() else {}
    if "volumes" not in built or any(built.get(k) != v for k, v in RECIPE_DATA.items()):
        print(f"building the demo held-out split (LiTS CT, MNI152 MR) into {folder} ...", file=sys.stderr)
        build_demo_dataset(folder, splits=("test",), **RECIPE_DATA)
    return folder


def run(args: argparse.Namespace) -> int:
    files = _parse_files(args.file)
    check_out_file(args.out)
    if args.predictions is not None:
        check_out_file(args.predictions, "--predictions")
        if args.predictions.resolve() == args.out.resolve():  # the predictions would replace the report
            raise UserInputError(f"--predictions {args.predictions} is the --out file; give another file")
    if args.data_root is not None and not args.data_root.is_dir():
        raise UserInputError(f"--data-root {args.data_root}: no such folder")
    check_model_folder(args)
    check_device(args)

    from ..evaluation import evaluate_mecovqa, read_eval_samples
    from ..io.outputs import write_json

    if args.limit is not None and args.limit < 0:
        raise ValueError(f"--limit must be >= 0, got {args.limit}")
    if args.batch_size < 1:
        raise UserInputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.acceptance_every < 1 or args.clicks < 0:
        raise ValueError(
            f"--acceptance-every must be >= 1 and --clicks >= 0, got {args.acceptance_every}, {args.clicks}"
        )
    acceptance = args.acceptance if args.acceptance is not None else args.data_root is None
    if args.data_root is not None:
        data_root = args.data_root
    else:
        data_root = demo_data_root(args.demo_data or args.out.parent / "demo_data")
    # bad files or entries fail before the model loads; the same samples are then scored
    samples = read_eval_samples(data_root, files, args.tasks, args.limit)
    pipe = load_pipeline(args)
    progress = ProgressBar()
    predictions = args.predictions or args.out.with_name(f"{args.out.stem}_predictions.json")
    rows: list[dict] = []  # filled batch by batch: kept on disk if a later batch or the acceptance run raises
    try:
        report, table, rows = evaluate_mecovqa(
            pipe,
            data_root,
            files,
            args.tasks,
            limit=args.limit,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            force_seg=args.force_seg,
            official_eval_region=args.official_eval_region,
            keep_largest_component=args.keep_largest_component,
            progress=progress,
            samples=samples,
            rows=rows,
        )
        report = {"model": str(args.model), "data_root": str(data_root), **report}
        acceptance_table = ""
        if acceptance:
            from ..evaluation.acceptance import evaluate_acceptance, format_acceptance, held_out_slices

            report["acceptance"] = evaluate_acceptance(
                pipe,
                held_out_slices(every=args.acceptance_every),
                clicks=args.clicks,
                batch_size=args.batch_size,
                progress=progress,
            )
            acceptance_table = "\n\n" + format_acceptance(report["acceptance"])
    except BaseException as err:  # a device error or Ctrl-C hours in: what was scored stays on disk
        progress.close()
        if rows:
            write_json(predictions, {"predictions": rows, "stopped_by": f"{type(err).__name__}: {err}"})
            print(
                f"evaluation stopped: the {len(rows)} predictions scored so far are in {predictions}",
                file=sys.stderr,
            )
        raise
    finally:
        progress.close()
    for path, content in ((args.out, report), (predictions, {"predictions": rows})):
        write_json(path, content)
    print(table + acceptance_table)
    print(f"report: {args.out}\npredictions: {predictions}")
    return 0
