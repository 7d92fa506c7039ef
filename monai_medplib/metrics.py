"""Evaluation metrics computed the way the MedPLIB release computes them.

* Pixel grounding (release ``model/eval/vqa_infer.py --eval_seg``): per sample, binary prediction
  ``sigmoid(logits) > 0.1`` at the original image size, ``IoU = |P & G| / |P | G|`` (0 when the union is empty),
  ``Dice = 2 IoU / (1 + IoU)``; a sample whose answer has no ``<SEG>`` scores 0; mIoU / mDice are plain means over
  samples, per modality by the file-name prefix ``basename.split('_')[0]``.
* VQA (release ``model/eval/cal_metric.py``): VQA-style ``normalize_word``; closed questions scored by exact string
  equality; open questions by word-overlap "exact match", bag-of-words precision / recall / F1 and sentence BLEU
  (NLTK 3.8.1 ``sentence_bleu`` defaults, re-implemented here without NLTK) plus single-order BLEU-1/2/3.
* Volumes: per-label 3D Dice.

``summarize`` gathers the three into one JSON-friendly report and a printable table.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from monai_medplib.processing import MASK_THRESHOLD

__all__ = [
    "GroundingMeter",
    "binarize_prediction",
    "bleu_scores",
    "closed_accuracy",
    "dice_3d",
    "dice_from_iou",
    "exact_match_score",
    "f1_precision_recall",
    "mask_iou",
    "modality_of",
    "normalize_word",
    "open_accuracy",
    "sentence_bleu",
    "summarize",
    "vqa_metrics",
]

PredKind = Literal["logits", "probs"]

# --------------------------------------------------------------------------------------------------------------
# Pixel grounding
# --------------------------------------------------------------------------------------------------------------


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        # numpy has no bfloat16 (a model's logits in bf16); float32 holds every bf16 / fp16 value exactly
        return (x.float() if x.dtype in (torch.bfloat16, torch.float16) else x).numpy()
    return np.asarray(x)


def binarize_prediction(pred: Any, pred_kind: PredKind = "logits") -> np.ndarray:
    """Binary mask from a prediction: a bool mask as is, else ``sigmoid(logits) > 0.1`` or ``probs > 0.1``.

    Integer arrays are taken as masks (non-zero = foreground). Float arrays are logits or probabilities
    according to ``pred_kind``. The sigmoid runs in float32, as the release evaluation does.
    """
    if pred_kind not in ("logits", "probs"):
        raise ValueError(f"pred_kind must be 'logits' or 'probs', got {pred_kind!r}")
    arr = _to_numpy(pred)
    if arr.dtype == bool:
        return arr
    if not np.issubdtype(arr.dtype, np.floating):
        return arr != 0
    values = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    probs = torch.sigmoid(values) if pred_kind == "logits" else values
    return (probs > MASK_THRESHOLD).numpy()


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU of two binary masks of the same shape; 0.0 when the union is empty (release rule).

    The ratio is taken in float32 like the release (``intersection.float() / union.float()``).
    """
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} does not match ground-truth shape {gt.shape}")
    union = int(np.logical_or(pred, gt).sum())
    if union == 0:
        return 0.0
    intersection = int(np.logical_and(pred, gt).sum())
    return float(np.float32(intersection) / np.float32(union))


def dice_from_iou(iou: float) -> float:
    """Dice of a single binary pair from its IoU: ``2 IoU / (1 + IoU)``."""
    return 2 * iou / (1 + iou)


def modality_of(image_path: str | os.PathLike) -> str:
    """Modality key the release groups by: the file name up to its first ``_`` (``ct_00--...png`` -> ``ct``)."""
    return os.path.basename(os.fspath(image_path)).split("_")[0]


@dataclass
class GroundingMeter:
    """Accumulates per-sample grounding IoU / Dice and reports mIoU / mDice overall and per modality.

    Example::

        meter = GroundingMeter()
        meter.add("images/ct_00--AMOS--c1--x_0001.png", pred_logits, gt_mask)
        meter.add("images/mr_00--BraTS--c2--z_0050.png", None, gt_mask)  # no <SEG> generated: scores 0
        report = meter.result()
    """

    pred_kind: PredKind = "logits"
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, image: str | os.PathLike, pred: Any | None, gt: Any) -> float:
        """Score one sample and return its IoU.

        Args:
            image: image path or name (its basename prefix gives the modality).
            pred: mask logits / probabilities / binary mask at the original size, or None when the answer had no
                ``<SEG>`` (the sample then scores 0, as in the release).
            gt: ground-truth mask at the original size (non-zero = foreground).
        """
        gt_mask = _to_numpy(gt) != 0
        if pred is None:
            iou = 0.0
        else:
            pred_mask = binarize_prediction(pred, self.pred_kind)
            if pred_mask.ndim == gt_mask.ndim + 1 and pred_mask.shape[0] == 1:
                pred_mask = pred_mask[0]
            iou = mask_iou(pred_mask, gt_mask)
        self.rows.append(
            {
                "image": os.fspath(image),
                "modality": modality_of(image),
                "has_seg": pred is not None,
                "iou": iou,
                "dice": dice_from_iou(iou),
            }
        )
        return iou

    def result(self) -> dict[str, Any]:
        """``{"n", "n_without_seg", "miou", "mdice", "per_modality": {m: {"n", "miou", "mdice"}}}`` (None if empty)."""
        per_modality: dict[str, list[dict[str, Any]]] = {}
        for row in self.rows:
            per_modality.setdefault(row["modality"], []).append(row)
        return {
            **_mean_iou_dice(self.rows),
            "n_without_seg": sum(not row["has_seg"] for row in self.rows),
            "per_modality": {name: _mean_iou_dice(rows) for name, rows in sorted(per_modality.items())},
        }


def _mean_iou_dice(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    if not rows:
        return {"n": 0, "miou": None, "mdice": None}
    # Plain per-sample means (not cumulative IoU), summed in order like the release's AverageMeter.
    return {
        "n": len(rows),
        "miou": sum(row["iou"] for row in rows) / len(rows),
        "mdice": sum(row["dice"] for row in rows) / len(rows),
    }


# --------------------------------------------------------------------------------------------------------------
# VQA text normalisation (the VQA-challenge rules the release's glossary.py applies)
# --------------------------------------------------------------------------------------------------------------

_PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
# release quirk: the pattern was meant as a look-behind "(?<!\d)"; written "(?!<=\d)" it is a look-ahead for the
# literal "<=" that can never match right before a ".", so every period not followed by a digit is removed.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(\,)(\d)")
# release quirk: `re.UNICODE` (== 32) was passed positionally as the `count` of re.sub: at most 32 periods go.
_MAX_PERIODS_REMOVED = 32
_ARTICLES = frozenset({"a", "an", "the"})
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
# Standard VQA contraction table, lower-case keys only (the text is lower-cased before the lookup, so the release's
# capitalised keys can never match). release quirk kept: "somebody'd" maps to "somebodyd".
_CONTRACTIONS = dict(
    pair.split("=", 1)
    for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
howd=how'd howll=how'll hows=how's isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll
maam=ma'am mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've
mustnt=mustn't mustve=must've neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't
ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've
shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've
somebody'd=somebodyd somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll
somebodys=somebody's someoned=someone'd someoned've=someone'd've someone'dve=someone'd've
someonell=someone'll someones=someone's somethingd=something'd somethingd've=something'd've
something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd
theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas
wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're
whats=what's whatve=what've whens=when's whered=where'd wheres=where's whereve=where've whod=who'd
whod've=who'd've who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll whyre=why're
whys=why's wont=won't wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've
wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've
y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've youll=you'll
youre=you're youve=you've
""".split()
)


def normalize_word(text: str) -> str:
    """VQA answer normalisation as in the release evaluation.

    Punctuation becomes a space, or is deleted when it touches a space or the text has a digit-comma-digit;
    periods not followed by a digit are removed; the text is lower-cased; number words become digits; articles
    are dropped; apostrophe-less contractions are restored; remaining commas are removed.
    """
    original = text
    strip_all = _DIGIT_COMMA_DIGIT.search(original) is not None
    for mark in _PUNCTUATION:
        # The test looks at the untouched input, the replacement works on the running result (release order).
        if strip_all or (mark + " ") in original or (" " + mark) in original:
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    text = _PERIOD.sub("", text, count=_MAX_PERIODS_REMOVED)
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES]
    return " ".join(words).replace(",", "")


def _word_counts(text: str, n: int = 1) -> Counter:
    words = text.lower().split()
    return Counter(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))


def exact_match_score(pred: str, gt: str) -> float:
    """Release "exact match": distinct reference words found in the prediction / number of prediction words."""
    pred_words = _word_counts(normalize_word(pred))
    ref_words = _word_counts(normalize_word(gt))
    total = sum(pred_words.values())
    if total == 0:
        return 0.0
    return sum(1 for word in ref_words if word in pred_words) / total


def f1_precision_recall(pred: str, gt: str) -> tuple[float, float, float]:
    """Release bag-of-words ``(f1, precision, recall)``; all 0 when either side is empty or nothing matches.

    release quirk: a shared word counts its prediction multiplicity as true positives (not the clipped minimum).
    """
    pred_words = _word_counts(normalize_word(pred))
    ref_words = _word_counts(normalize_word(gt))
    if not pred_words or not ref_words:
        return 0.0, 0.0, 0.0
    tp = sum(count for word, count in pred_words.items() if word in ref_words)
    fp = sum(count for word, count in pred_words.items() if word not in ref_words)
    fn = sum(count for word, count in ref_words.items() if word not in pred_words)
    if tp == 0:
        return 0.0, 0.0, 0.0
    precision = tp / (tp + fp)
    recall = tp / (tp + fn)
    return 2 * precision * recall / (precision + recall), precision, recall


def _ngram_counts(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def sentence_bleu(
    reference: Sequence[str], hypothesis: Sequence[str], weights: Sequence[float] = (0.25, 0.25, 0.25, 0.25)
) -> float:
    """Sentence BLEU against one tokenised reference, matching NLTK 3.8.1 ``sentence_bleu`` defaults.

    Clipped n-gram precisions for orders ``1..len(weights)``, brevity penalty ``exp(1 - r/c)`` when the hypothesis
    is not longer than the reference, no smoothing. Returns exactly 0 when no unigram matches; an order with no
    match (weight > 0) contributes ``log(sys.float_info.min)`` like NLTK's ``method0``, so the score is ~1e-77 or
    smaller, i.e. 0 for every practical purpose.
    """
    hyp, ref = list(hypothesis), list(reference)
    precisions: list[tuple[int, int]] = []
    for n in range(1, len(weights) + 1):
        hyp_counts, ref_counts = _ngram_counts(hyp, n), _ngram_counts(ref, n)
        matched = sum(min(count, ref_counts[gram]) for gram, count in hyp_counts.items())
        precisions.append((matched, max(1, sum(hyp_counts.values()))))
    if precisions[0][0] == 0:
        return 0.0
    brevity = 1.0 if len(hyp) > len(ref) else math.exp(1 - len(ref) / len(hyp))
    log_terms = [
        weight * math.log(matched / total if matched else sys.float_info.min)
        for weight, (matched, total) in zip(weights, precisions)
    ]
    return brevity * math.exp(math.fsum(log_terms))


def bleu_scores(pred: str, gt: str) -> dict[str, float]:
    """``bleu`` (uniform 4-gram) and single-order ``bleu_1`` .. ``bleu_3`` of already normalised strings."""
    ref, hyp = str(gt).lower().split(), str(pred).lower().split()
    return {
        "bleu": sentence_bleu(ref, hyp),
        "bleu_1": sentence_bleu(ref, hyp, (1, 0, 0, 0)),
        "bleu_2": sentence_bleu(ref, hyp, (0, 1, 0, 0)),
        "bleu_3": sentence_bleu(ref, hyp, (0, 0, 1, 0)),
    }


def _candidate_overlap(candidate: str, pred_words: Counter) -> float:
    candidate_words = _word_counts(candidate)
    if not candidate_words:
        return 0.0
    return sum(1 for word in pred_words if word in candidate_words) / len(candidate_words)


def open_accuracy(pred: str, gt: str, candidates: Sequence[str]) -> float:
    """Release "open accuracy": snap the prediction to the candidate answer it overlaps most, then compare.

    Ties go to the first candidate in the given order (the release iterates a Python ``set``, whose order
    varies between runs, so its tie-breaking is not reproducible).
    """
    pred_norm, gt_norm = normalize_word(pred), normalize_word(gt)
    if not candidates:
        return float(pred_norm == gt_norm)
    normalised = [normalize_word(str(candidate)) for candidate in candidates]
    pred_words = _word_counts(pred_norm)
    overlaps = [_candidate_overlap(candidate, pred_words) for candidate in normalised]
    best = normalised[overlaps.index(max(overlaps))]
    return float(best == gt_norm or pred_norm == gt_norm)


def closed_accuracy(pred: str, gt: str) -> float:
    """1.0 when the normalised, lower-cased prediction equals the normalised ground truth, else 0.0."""
    return float(normalize_word(str(pred).lower()) == normalize_word(str(gt).lower()))


_OPEN_TYPES = ("open", "other", "number")
_CLOSED_TYPES = ("yes/no", "closed")


def vqa_metrics(records: Iterable[Mapping[str, Any]], use_candidates: bool = False) -> dict[str, Any]:
    """Closed accuracy and open-question metrics over records ``{"gt", "pred" (or "text"), "answer_type"}``.

    ``answer_type`` (case-insensitive): ``open`` / ``other`` / ``number`` -> open; ``yes/no`` / ``closed`` ->
    closed; any other type is counted in ``n_skipped`` (the release ignores it). With ``use_candidates`` the open
    accuracy uses every record's ground truth (first-seen order, duplicates removed) as candidate set.
    Values are fractions in [0, 1] (the release prints them x100); None when a group is empty.
    """
    records = list(records)
    candidates = list(dict.fromkeys(str(r["gt"]) for r in records)) if use_candidates else []
    closed_hits: list[float] = []
    open_rows: list[dict[str, float]] = []
    skipped = 0
    for index, record in enumerate(records):
        for key in ("gt", "answer_type"):
            if key not in record:
                raise ValueError(f"VQA record {index} has no {key!r} key")
        if "pred" not in record and "text" not in record:
            raise ValueError(f"VQA record {index} has neither a 'pred' nor a 'text' key")
        answer_type = str(record["answer_type"]).lower()
        gt = normalize_word(str(record["gt"]).lower())
        pred = normalize_word(str(record.get("pred", record.get("text"))).lower())
        if answer_type in _CLOSED_TYPES:
            closed_hits.append(float(gt == pred))
        elif answer_type in _OPEN_TYPES:
            f1, precision, recall = f1_precision_recall(pred, gt)
            row = {
                "exact_match": exact_match_score(pred, gt),
                "f1": f1,
                "precision": precision,
                "recall": recall,
            }
            row.update(bleu_scores(pred, gt))
            if use_candidates:
                row["open_accuracy"] = open_accuracy(pred, gt, candidates)
            open_rows.append(row)
        else:
            skipped += 1
    open_keys = ["exact_match", "f1", "precision", "recall", "bleu", "bleu_1", "bleu_2", "bleu_3"]
    if use_candidates:
        open_keys.append("open_accuracy")
    open_report: dict[str, Any] = {"n": len(open_rows)}
    for key in open_keys:
        open_report[key] = sum(row[key] for row in open_rows) / len(open_rows) if open_rows else None
    return {
        "closed": {
            "n": len(closed_hits),
            "accuracy": sum(closed_hits) / len(closed_hits) if closed_hits else None,
        },
        "open": open_report,
        "n_skipped": skipped,
    }


# --------------------------------------------------------------------------------------------------------------
# Volumes
# --------------------------------------------------------------------------------------------------------------


def _squeeze_channel(volume: np.ndarray) -> np.ndarray:
    while volume.ndim > 3 and volume.shape[0] == 1:
        volume = volume[0]
    return volume


def dice_3d(pred: Any, gt: Any, labels: Mapping[str, int] | Sequence[int] | None = None) -> dict[str, float]:
    """Per-label Dice ``2|P & G| / (|P| + |G|)`` of two label volumes (numpy, torch or MetaTensor).

    Args:
        pred: predicted label volume ``[D, H, W]`` (leading singleton channel dims are dropped).
        gt: reference label volume of the same shape.
        labels: ``{name: value}``, a list of label values, or None for every non-zero value in either volume.

    Returns:
        ``{name or str(value): dice}``; NaN for a label absent from both volumes.
    """
    pred_arr, gt_arr = _squeeze_channel(_to_numpy(pred)), _squeeze_channel(_to_numpy(gt))
    if pred_arr.shape != gt_arr.shape:
        raise ValueError(
            f"prediction volume shape {pred_arr.shape} does not match label shape {gt_arr.shape}"
        )
    if labels is None:
        values = sorted(int(v) for v in np.union1d(np.unique(pred_arr), np.unique(gt_arr)) if v != 0)
        named = {str(v): v for v in values}
    elif isinstance(labels, Mapping):
        named = {str(name): int(value) for name, value in labels.items()}
    else:
        named = {str(int(value)): int(value) for value in labels}
    scores: dict[str, float] = {}
    for name, value in named.items():
        p, g = pred_arr == value, gt_arr == value
        total = int(p.sum()) + int(g.sum())
        scores[name] = 2.0 * int(np.logical_and(p, g).sum()) / total if total else float("nan")
    return scores


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{100 * value:.2f}"
    return str(value)


def summarize(
    grounding: GroundingMeter | Mapping[str, Any] | None = None,
    vqa: Mapping[str, Any] | None = None,
    volume_dice: Mapping[str, float] | None = None,
) -> tuple[dict[str, Any], str]:
    """One report from the parts that were evaluated, and a table of it (values x100, as the release prints).

    Args:
        grounding: a GroundingMeter or its ``result()``.
        vqa: the output of ``vqa_metrics``.
        volume_dice: the output of ``dice_3d``.

    Returns:
        ``(report, table)``: the JSON-serialisable report (fractions) and a plain-text table.
    """
    report: dict[str, Any] = {}
    rows: list[tuple[str, str, str]] = []
    if grounding is not None:
        result = grounding.result() if isinstance(grounding, GroundingMeter) else dict(grounding)
        report["grounding"] = result
        rows.append(
            (
                "grounding",
                "mIoU / mDice",
                f"{_fmt(result['miou'])} / {_fmt(result['mdice'])}  (n={result['n']})",
            )
        )
        for name, part in result.get("per_modality", {}).items():
            rows.append(
                ("grounding", f"  {name}", f"{_fmt(part['miou'])} / {_fmt(part['mdice'])}  (n={part['n']})")
            )
    if vqa is not None:
        report["vqa"] = dict(vqa)
        closed = vqa["closed"]
        rows.append(("vqa closed", "accuracy", f"{_fmt(closed['accuracy'])}  (n={closed['n']})"))
        if vqa.get("n_skipped"):
            rows.append(("vqa", "skipped (answer_type not closed / open)", str(vqa["n_skipped"])))
        open_part = vqa["open"]
        for key, value in open_part.items():
            if key != "n":
                rows.append(("vqa open", key, f"{_fmt(value)}  (n={open_part['n']})"))
    if volume_dice is not None:
        report["volume_dice"] = dict(volume_dice)
        for name, value in volume_dice.items():
            rows.append(("volume", f"Dice {name}", _fmt(value)))
    headers = ("task", "metric", "value (%)")
    widths = [max([len(header)] + [len(row[i]) for row in rows]) for i, header in enumerate(headers)]
    lines = ["  ".join(text.ljust(width) for text, width in zip(headers, widths))]
    lines.append("  ".join("-" * width for width in widths))
    lines.extend("  ".join(text.ljust(width) for text, width in zip(row, widths)) for row in rows)
    return report, "\n".join(lines)
