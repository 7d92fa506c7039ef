"""The one MeCoVQA evaluator: grounding, complex VQA and region VQA scored as the release scores them.

Protocol (spec 8; release ``model/eval/vqa_infer.py`` + ``cal_metric.py``):

* prompt: the pipeline's template (``vicuna_v1`` for the official numbers) ending in ``ASSISTANT:``; the first
  question of each entry; greedy decoding; answers decoded with ``skip_special_tokens`` and stripped;
* grounding: the release ``<SEG>`` rule (``seg_rule="release"``), SAM-Med2D with the text prompt only, the
  release crop quirk, ``sigmoid > 0.1`` at the original size; per-sample IoU, ``Dice = 2 IoU / (1 + IoU)``, a
  sample without ``<SEG>`` scores 0; plain means overall, per modality, and per grounding target when the
  entries carry ``target``;
* VQA: :func:`~monai_medplib.metrics.vqa_metrics` (closed accuracy; open recall / precision / F1 / BLEU) over
  every VQA answer, per task file and per ``question_kind`` when the entries carry it;
* region VQA: the region feature is passed, as the demo worker does; ``official_eval_region=True`` drops it, as
  the release evaluation script does (spec 5.3).

Every model step goes through :class:`~monai_medplib.pipeline.MedPLIBPipeline` (``ground_batch``,
``answer_batch``, ``answer_region_batch``), so the numbers are those of the library's public API. Used by ``medplib eval``, the bundle's ``evaluate.json`` and the
demo-model training script.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from ..data.demo_dataset import TEST_FILES as DEMO_TEST_FILES
from ..data.mecovqa import MeCoVQARecord, load_binary_mask, read_mecovqa
from ..metrics import GroundingMeter, vqa_metrics
from ..pipeline import MedPLIBPipeline
from ..pipeline.options import MAX_NEW_TOKENS

__all__ = [
    "RELEASE_TEST_FILES",
    "TASKS",
    "Evaluation",
    "build_report",
    "evaluate_mecovqa",
    "format_table",
    "read_eval_samples",
    "resolve_eval_files",
]

logger = logging.getLogger(__name__)

TASKS = ("grounding", "vqa", "region_vqa")
# task -> release test file under the data root (spec 4.4); the demo dataset writes the same names
RELEASE_TEST_FILES = {
    "grounding": f"test/{DEMO_TEST_FILES['grounding']}",
    "vqa": f"test/{DEMO_TEST_FILES['closed']}",
    "region_vqa": f"test/{DEMO_TEST_FILES['region']}",
}
# release: cal_metric.py takes the answer type from the command line; entries without one are free text
DEFAULT_ANSWER_TYPE = "open"


class Evaluation(NamedTuple):
    """What :func:`evaluate_mecovqa` returns: the JSON report, its printable table and one row per sample."""

    report: dict[str, Any]
    table: str
    rows: list[dict[str, Any]]


def resolve_eval_files(
    data_root: str | os.PathLike,
    files: Mapping[str, str | os.PathLike] | None = None,
    tasks: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Task -> test file: ``files`` (relative to ``data_root`` or absolute) or the release test file names.

    Without ``files`` or ``tasks``, the tasks whose release test file exists are evaluated.

    Raises:
        ValueError: an unknown task name.
        FileNotFoundError: a requested file is missing, or no test file at all was found.
    """
    root = Path(data_root)
    unknown = sorted((set(files or {}) | set(tasks or ())) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown evaluation task(s) {unknown}; use {list(TASKS)}")
    chosen = dict(files) if files else dict(RELEASE_TEST_FILES)
    if tasks:
        missing_tasks = [t for t in tasks if t not in chosen]
        if missing_tasks:
            raise ValueError(f"no test file given for task(s) {missing_tasks}")
        chosen = {t: chosen[t] for t in TASKS if t in tasks}
    explicit = bool(files or tasks)
    resolved: dict[str, Path] = {}
    for task, rel in chosen.items():
        path = Path(rel) if Path(rel).is_absolute() else root / rel
        if path.is_file():
            resolved[task] = path
        elif explicit:
            raise FileNotFoundError(f"{task} test file not found: {path}")
    if not resolved:
        names = ", ".join(RELEASE_TEST_FILES.values())
        raise FileNotFoundError(f"no MeCoVQA test file under {root} (looked for {names})")
    return resolved


def evaluate_mecovqa(
    pipeline: MedPLIBPipeline,
    data_root: str | os.PathLike,
    files: Mapping[str, str | os.PathLike] | None = None,
    tasks: Sequence[str] | None = None,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = MAX_NEW_TOKENS["image"],
    force_seg: bool = False,
    official_eval_region: bool = False,
    keep_largest_component: bool = False,
    progress: Callable[[str], None] | None = None,
    samples: Mapping[str, list] | None = None,
    rows: list[dict[str, Any]] | None = None,
) -> Evaluation:
    """Evaluate ``pipeline`` on MeCoVQA-layout test files.

    Args:
        pipeline: the model (its template is the prompt template; ``vicuna_v1`` for the official protocol).
        data_root: root the image / mask paths of the entries are relative to.
        files: task ("grounding", "vqa", "region_vqa") -> JSON file; default the release test file names.
        tasks: evaluate only these tasks.
        limit: the first ``limit`` entries of each file (None = all).
        batch_size: samples per generation batch (left padded, as the release batches).
        max_new_tokens: decoding budget per answer (release: 1024).
        force_seg: force the answer ``<SEG></s>`` when grounding (random-weight models never emit ``<SEG>``).
        official_eval_region: drop the region feature, as the release evaluation script does.
        keep_largest_component: region grid from the largest 8-connected component (the training dataset's
            path) instead of the whole mask (the demo worker's path).
        progress: called with a line after each batch (e.g. ``print``).
        samples: what :func:`read_eval_samples` returned for the same arguments (a caller that checked the
            entries before loading the model); None reads them here, before any inference.
        rows: a list the per-sample rows are appended to as each batch is scored, so a caller keeps what was
            scored when a later batch raises (a device error hours into a release-size run); None: a new list.

    Returns:
        ``Evaluation(report, table, rows)``. ``report["grounding"]``: :class:`GroundingMeter` result plus
        ``per_target``; ``report["vqa"]``: :func:`vqa_metrics` over every VQA answer plus ``per_task`` and
        ``per_kind``; ``report["protocol"]`` / ``["files"]`` / ``["samples"]`` / ``["seconds"]``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    root = Path(data_root)
    resolved = resolve_eval_files(root, files, tasks)
    # every entry is read and checked before any inference: a bad last entry must not waste the run
    every = (
        samples if samples is not None else {t: _read_samples(t, p, root, limit) for t, p in resolved.items()}
    )
    scorer = _Scorer(pipeline, max_new_tokens, force_seg, official_eval_region, keep_largest_component)
    start = time.perf_counter()
    rows = [] if rows is None else rows
    for task, samples in every.items():
        for first in range(0, len(samples), batch_size):
            rows.extend(scorer.score(task, samples[first : first + batch_size]))
            if progress is not None:
                progress(f"{task}: {min(first + batch_size, len(samples))}/{len(samples)}")
    report = build_report(rows)
    report["protocol"] = {
        "template": pipeline.template,
        "decoding": "greedy",
        "max_new_tokens": max_new_tokens,
        "seg_rule": "release",
        "mask_threshold": "sigmoid > 0.1",
        "force_seg": force_seg,
        "official_eval_region": official_eval_region,
        "keep_largest_component": keep_largest_component,
        "limit": limit,
        "batch_size": batch_size,
    }
    report["files"] = {task: str(path) for task, path in resolved.items()}
    report["samples"] = len(rows)
    report["seconds"] = round(time.perf_counter() - start, 3)
    return Evaluation(report, format_table(report), rows)


# ------------------------------------------------------------------------------------------ reading
class _Sample(NamedTuple):
    record: MeCoVQARecord
    entry: Mapping[str, Any]


def read_eval_samples(
    data_root: str | os.PathLike,
    files: Mapping[str, str | os.PathLike] | None = None,
    tasks: Sequence[str] | None = None,
    limit: int | None = None,
) -> dict[str, list]:
    """Every test entry :func:`evaluate_mecovqa` will score, read and checked (image and mask files exist, a
    grounding mask has its image's size, each file has entries) before anything runs.

    Raises:
        ValueError / FileNotFoundError: naming the test file and the entry.
    """
    root = Path(data_root)
    return {
        task: _read_samples(task, path, root, limit)
        for task, path in resolve_eval_files(root, files, tasks).items()
    }


def _read_samples(task: str, path: Path, root: Path, limit: int | None) -> list[_Sample]:
    from PIL import Image

    entries = json.loads(path.read_text())
    if not entries:
        raise ValueError(f"{path}: no test entries (an empty {task} split)")
    try:
        records = read_mecovqa(path, root)  # one record per entry, in order (ids may repeat in release files)
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"{path}: {err}") from None
    samples = [_Sample(r, e) for r, e in zip(records, entries)][:limit]
    for sample in samples:
        turn = sample.record.turns[0] if sample.record.turns else None
        if turn is None:
            raise ValueError(f"{path}: entry {sample.record.id!r} has no question")
        if task == "grounding" and turn.mask_path is None:
            raise ValueError(
                f"{path}: grounding entry {sample.record.id!r} has no <mask> in its first answer"
            )
        if task == "grounding":
            with Image.open(sample.record.image) as image, Image.open(turn.mask_path) as mask:
                if image.size != mask.size:
                    raise ValueError(
                        f"{path}: grounding entry {sample.record.id!r}: its mask {turn.mask_path.name} is "
                        f"{mask.height} x {mask.width}, its image {image.height} x {image.width}"
                    )
        if task == "region_vqa" and not turn.region_paths:
            raise ValueError(
                f"{path}: region entry {sample.record.id!r} has no <region> in its first question"
            )
        if task != "grounding" and turn.answer is None:
            raise ValueError(f"{path}: entry {sample.record.id!r} has no answer")
    return samples


# ------------------------------------------------------------------------------------------ model calls
class _Scorer:
    """Runs one batch of one task through the pipeline and returns its per-sample rows."""

    def __init__(self, pipeline, max_new_tokens, force_seg, official_eval_region, largest) -> None:
        self.pipeline = pipeline
        self.max_new_tokens = max_new_tokens
        self.force_seg = force_seg
        self.official_eval_region = official_eval_region
        self.keep_largest_component = largest

    def score(self, task: str, batch: Sequence[_Sample]) -> list[dict[str, Any]]:
        images = [str(s.record.image) for s in batch]
        questions = [s.record.turns[0].question for s in batch]
        if task == "grounding":
            return self._grounding(batch, images, questions)
        if task == "region_vqa":
            preds = self.pipeline.answer_region_batch(
                images,
                questions,
                [[str(p) for p in s.record.turns[0].region_paths] for s in batch],
                official_eval_region=self.official_eval_region,
                keep_largest_component=self.keep_largest_component,
                max_new_tokens=self.max_new_tokens,
            )
        else:
            preds = self.pipeline.answer_batch(images, questions, max_new_tokens=self.max_new_tokens)
        rows = []
        for sample, question, pred in zip(batch, questions, preds):
            row = _base_row(task, sample, question, pred)
            row["gt"] = sample.record.turns[0].answer
            row["answer_type"] = sample.record.answer_type or DEFAULT_ANSWER_TYPE
            rows.append(row)
        return rows

    def _grounding(self, batch, images, questions) -> list[dict[str, Any]]:
        results = self.pipeline.ground_batch(
            images,
            questions,
            max_new_tokens=self.max_new_tokens,
            force_seg=self.force_seg,
            seg_rule="release",
        )
        rows = []
        for sample, question, result in zip(batch, questions, results):
            gt_path = sample.record.turns[0].mask_path
            meter = GroundingMeter()
            meter.add(
                sample.record.image, result.logits if result.has_seg else None, load_binary_mask(gt_path)
            )
            row = _base_row("grounding", sample, question, result.answer)
            row.update(gt=str(gt_path), **meter.rows[0])
            rows.append(row)
        return rows


def _base_row(task: str, sample: _Sample, question: str, pred: str) -> dict[str, Any]:
    row = {"id": sample.record.id, "task": task, "image": str(sample.record.image), "question": question}
    for key in ("target", "question_kind"):
        if key in sample.entry:
            row[key] = sample.entry[key]
    row["pred"] = pred
    return row


# ------------------------------------------------------------------------------------------ report
def build_report(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Report of per-sample rows (see :func:`evaluate_mecovqa`); tasks without rows are left out."""
    report: dict[str, Any] = {}
    grounding = [r for r in rows if r["task"] == "grounding"]
    if grounding:
        meter_rows = [{k: r[k] for k in ("image", "modality", "has_seg", "iou", "dice")} for r in grounding]
        report["grounding"] = GroundingMeter(rows=meter_rows).result()
        targets = sorted({r["target"] for r in grounding if "target" in r})
        report["grounding"]["per_target"] = {
            t: GroundingMeter(
                rows=[m for m, r in zip(meter_rows, grounding) if r.get("target") == t]
            ).result()
            for t in targets
        }
    vqa = [r for r in rows if r["task"] != "grounding"]
    if vqa:
        report["vqa"] = vqa_metrics(vqa)
        report["vqa"]["per_task"] = {
            t: vqa_metrics([r for r in vqa if r["task"] == t])
            for t in TASKS
            if any(r["task"] == t for r in vqa)
        }
        kinds = sorted({r["question_kind"] for r in vqa if "question_kind" in r})
        report["vqa"]["per_kind"] = {
            k: vqa_metrics([r for r in vqa if r.get("question_kind") == k]) for k in kinds
        }
    return report


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _vqa_lines(label: str, part: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    lines = []
    closed, open_part = part["closed"], part["open"]
    if closed["n"]:
        lines.append((label, "closed accuracy", _pct(closed["accuracy"]), str(closed["n"])))
    if open_part["n"]:
        scores = " / ".join(_pct(open_part[k]) for k in ("recall", "precision", "f1", "bleu"))
        lines.append((label, "open recall / precision / F1 / BLEU", scores, str(open_part["n"])))
    if part.get("n_skipped"):  # neither closed nor open: not scored, and said so (the JSON has the count too)
        lines.append((label, "skipped (answer_type not closed / open)", str(part["n_skipped"]), "-"))
    return lines


def format_table(report: Mapping[str, Any]) -> str:
    """Plain-text table of a report (values x100, as the release prints them)."""
    lines: list[tuple[str, str, str, str]] = []
    if "grounding" in report:
        g = report["grounding"]
        lines.append(("grounding", "mIoU / mDice", f"{_pct(g['miou'])} / {_pct(g['mdice'])}", str(g["n"])))
        for name, part in g.get("per_target", {}).items():
            lines.append(
                (
                    f"  target {name}",
                    "mIoU / mDice",
                    f"{_pct(part['miou'])} / {_pct(part['mdice'])}",
                    str(part["n"]),
                )
            )
        for name, part in g["per_modality"].items():
            lines.append(
                (
                    f"  modality {name}",
                    "mIoU / mDice",
                    f"{_pct(part['miou'])} / {_pct(part['mdice'])}",
                    str(part["n"]),
                )
            )
        lines.append(("  no <SEG> (scored 0)", "samples", str(g["n_without_seg"]), str(g["n"])))
    if "vqa" in report:
        for task, part in report["vqa"]["per_task"].items():
            lines.extend(_vqa_lines(task, part))
        for kind, part in report["vqa"]["per_kind"].items():
            lines.extend(_vqa_lines(f"  kind {kind}", part))
    headers = ("task", "metric", "value (%)", "n")
    widths = [max([len(h)] + [len(line[i]) for line in lines]) for i, h in enumerate(headers)]
    out = ["  ".join(text.ljust(w) for text, w in zip(headers, widths)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    out.extend("  ".join(text.ljust(w) for text, w in zip(line, widths)).rstrip() for line in lines)
    return "\n".join(out)
