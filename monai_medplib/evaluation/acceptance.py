"""The demo model's acceptance figures (issue 13) on held-out slices of the demo volumes.

:func:`evaluate_acceptance` asks a :class:`~monai_medplib.pipeline.MedPLIBPipeline` everything the demo model
claims to do, on slices it never trained on (:func:`held_out_slices`: the central slab of each plane of the LiTS
CT and the MNI MR, see :mod:`monai_medplib.data.demo_slices`), and scores it against the labels:

* grounding: one request per structure and slice, phrasings rotating through the trained ones; mDice per target
  (a request answered without ``<SEG>`` scores 0) and the share of requests for a shown structure that produce
  ``<SEG>``;
* text controls: Dice between the "liver" and the "tumour" masks of CT slices showing both, and the same
  grounding with the ``<SEG>`` prompt embedding replaced by zeros (``decode_text_prompts``): how much the mean
  Dice over targets drops without the text;
* absent structures: requests for structures the slice cannot show (CT asked for white matter, MR for the liver,
  or a structure with no pixel on the slice): share answered without ``<SEG>`` and with an empty mask;
* region VQA over the five region classes (disc regions as in training), and "is <region> normal?";
* closed VQA: modality, plane, "is X visible" (one shown and one absent structure per slice), each on a
  training wording and on a held-out wording; balanced accuracy (mean recall over the answers) per kind and set;
* the example questions of the docs (``DOC_QUESTIONS``) on the middle held-out slice of each plane;
* clicks: simulated click refinement (:mod:`.clicks`) of every grounding of a shown structure.

Decoding is greedy with a short budget (the demo's answers are a few tokens), the release threshold
``sigmoid > 0.1`` makes masks. :data:`ACCEPTANCE` holds the thresholds; ``report["checks"]`` says which pass.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..data.demo_dataset import region_masks
from ..data.demo_prompts import (
    CLOSED_QUESTIONS,
    DOC_QUESTIONS,
    GROUNDING_PHRASES,
    NORMAL_QUESTIONS,
    REGION_CLASSES,
    REGION_QUESTIONS,
    TARGETS,
    modality_answer,
)
from ..data.demo_slices import DemoSlice, demo_volumes, iter_slices
from ..processing import MASK_THRESHOLD
from .clicks import dice, simulate_clicks

__all__ = [
    "ACCEPTANCE",
    "acceptance_checks",
    "evaluate_acceptance",
    "format_acceptance",
    "held_out_slices",
]

# figure -> (comparison, threshold); the figure names are keys of report["figures"].
ACCEPTANCE: dict[str, tuple[str, float]] = {
    "mdice liver": (">=", 0.85),
    "mdice tumour": (">=", 0.50),
    "mdice white matter": (">=", 0.80),
    "mdice brain": (">=", 0.90),
    "mdice grey matter": (">=", 0.60),
    "liver vs tumour mask dice": ("<=", 0.50),
    "zero-prompt drop of mean dice": (">=", 0.30),
    "absent: no <SEG> and empty mask": (">=", 0.95),
    "present: <SEG>": (">=", 0.90),
    "region VQA accuracy (5 classes)": (">=", 0.80),
    "closed modality, train wordings": (">=", 0.90),
    "closed modality, held-out wordings": (">=", 0.90),
    "closed plane, train wordings": (">=", 0.90),
    "closed plane, held-out wordings": (">=", 0.90),
    "closed visible, train wordings": (">=", 0.90),
    "closed visible, held-out wordings": (">=", 0.90),
    "doc questions answered": (">=", 1.0),
    "click gain after 1 click": (">", 0.0),
}
CLICK_GAIN = "click gain after 1 click"  # measured only when clicks are asked for (``clicks`` > 0)
DEFAULT_MAX_NEW_TOKENS = 32  # the demo's longest answer ("No white matter is visible in this image.") is ~12
_REGION_SEED = 1234


def held_out_slices(every: int = 1) -> list[DemoSlice]:
    """The held-out slices of both demo volumes (every ``every``-th of each plane's held-out slab)."""
    return list(iter_slices(demo_volumes(), ("test",), every=every))


def _norm(text: str) -> str:
    return " ".join(text.lower().replace("</s>", " ").strip().rstrip(".!?").split())


def _correct(pred: str, gt: str) -> bool:
    return _norm(pred) == _norm(gt)


def _balanced(rows: Sequence[tuple[str, bool]]) -> dict[str, Any]:
    """``rows`` of (gt answer, correct) -> accuracy, balanced accuracy (mean recall per answer), n."""
    if not rows:
        return {"n": 0, "accuracy": None, "balanced_accuracy": None, "per_answer": {}}
    per: dict[str, list[bool]] = {}
    for gt, ok in rows:
        per.setdefault(_norm(gt), []).append(ok)
    recalls = {k: float(np.mean(v)) for k, v in per.items()}
    return {
        "n": len(rows),
        "accuracy": float(np.mean([ok for _, ok in rows])),
        "balanced_accuracy": float(np.mean(list(recalls.values()))),
        "per_answer": recalls,
    }


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


class _Evaluator:
    def __init__(
        self, pipe: Any, slices: Sequence[DemoSlice], max_new_tokens: int, batch_size: int, progress
    ):
        self.pipe, self.slices = pipe, list(slices)
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.progress = progress or (lambda _line: None)
        self.modalities = {s.modality for s in self.slices}

    def _batches(self, items: Sequence[Any]):
        for start in range(0, len(items), self.batch_size):
            yield items[start : start + self.batch_size]

    # ----------------------------------------------------------------------------------------- grounding
    def grounding(self, clicks: int) -> dict[str, Any]:
        requests = []  # (slice, target, present)
        for s in self.slices:
            for target, shown in s.presence.items():
                if shown is None or TARGETS[target].modality not in self.modalities:
                    continue
                requests.append((s, target, shown))
        rows = []
        for k, batch in enumerate(self._batches(requests)):
            texts = [
                GROUNDING_PHRASES[(k * self.batch_size + i) % len(GROUNDING_PHRASES)].format(
                    target=TARGETS[t].names[0]
                )
                for i, (_, t, _) in enumerate(batch)
            ]
            results = self.pipe.ground_batch(
                [s.image for s, _, _ in batch], texts, max_new_tokens=self.max_new_tokens
            )
            zero = self._zero_prompt_masks([s for s, _, shown in batch if shown], results)
            zero_iter = iter(zero)
            for (s, target, shown), text, result in zip(batch, texts, results):
                gt = s.target_mask(target)
                row = {"slice": s, "target": target, "present": shown, "text": text, "result": result}
                row["dice"] = dice(result.mask, gt) if result.has_seg else 0.0
                if shown:
                    row["zero_dice"] = dice(next(zero_iter), gt)
                rows.append(row)
            self.progress(f"grounding {min((k + 1) * self.batch_size, len(requests))}/{len(requests)}")
        report = self._grounding_report(rows)
        report["clicks"] = self._clicks([r for r in rows if r["present"]], clicks)
        return report

    def _zero_prompt_masks(self, images: Sequence[DemoSlice], results) -> list[np.ndarray]:
        if not images:
            return []
        dims = [r.seg_embedding.shape[-1] for r in results if r.seg_embedding is not None]
        dim = dims[0] if dims else 256  # SAM-Med2D's prompt width
        features = self.pipe.encode_images([s.image for s in images], with_sam=True)
        low_res, _ = self.pipe.decode_text_prompts(features, torch.zeros(len(images), dim))
        logits = self.pipe.postprocess_batch(low_res, features)
        return [(torch.sigmoid(x) > MASK_THRESHOLD).cpu().numpy() for x in logits]

    def _grounding_report(self, rows) -> dict[str, Any]:
        present = [r for r in rows if r["present"]]
        absent = [r for r in rows if not r["present"]]
        per_target = {}
        for target in TARGETS:
            mine = [r for r in present if r["target"] == target]
            if mine:
                per_target[target] = {
                    "n": len(mine),
                    "mdice": _mean([r["dice"] for r in mine]),
                    "zero_prompt_mdice": _mean([r["zero_dice"] for r in mine]),
                    "seg_rate": _mean([float(r["result"].has_seg) for r in mine]),
                }
        absent_ok = [(not r["result"].has_seg) and not r["result"].mask.any() for r in absent]
        absent_per_target = {
            t: _mean([ok for r, ok in zip(absent, absent_ok) if r["target"] == t])
            for t in TARGETS
            if any(r["target"] == t for r in absent)
        }
        pairs = {}
        for r in present:
            if r["target"] in ("liver", "tumour"):
                pairs.setdefault(id(r["slice"]), {})[r["target"]] = r["result"]
        overlap = [dice(p["liver"].mask, p["tumour"].mask) for p in pairs.values() if len(p) == 2]
        normal_mean = _mean([v["mdice"] for v in per_target.values()])
        zero_mean = _mean([v["zero_prompt_mdice"] for v in per_target.values()])
        return {
            "per_target": per_target,
            "mean_over_targets": normal_mean,
            "zero_prompt_mean_over_targets": zero_mean,
            "zero_prompt_drop": None if normal_mean is None else normal_mean - zero_mean,
            "present": {"n": len(present), "seg_rate": _mean([float(r["result"].has_seg) for r in present])},
            "absent": {"n": len(absent), "no_seg_rate": _mean(absent_ok), "per_target": absent_per_target},
            "liver_vs_tumour": {
                "n": len(overlap),
                "mean_dice": _mean(overlap),
                "max_dice": max(overlap) if overlap else None,
            },
        }

    def _clicks(self, rows, clicks: int) -> dict[str, Any]:
        if not clicks or not rows:
            return {"n": 0}
        traces = []
        for k, r in enumerate(rows):
            s = r["slice"]
            traces.append(
                simulate_clicks(self.pipe, s.image, s.target_mask(r["target"]), r["result"], clicks)
            )
            if (k + 1) % 50 == 0 or k + 1 == len(rows):
                self.progress(f"clicks {k + 1}/{len(rows)}")

        def summary(selected) -> dict[str, Any]:
            if not selected:
                return {"n": 0}
            curves = np.array([t.dice for t in selected])
            return {
                "n": len(selected),
                "dice": [float(v) for v in curves.mean(0)],
                "gain_after_1": float((curves[:, 1] - curves[:, 0]).mean()),
                "improved_after_1": float((curves[:, 1] > curves[:, 0]).mean()),
            }

        return {
            "clicks": clicks,
            "all": summary(traces),
            "positive_first": summary([t for t in traces if t.first_label == 1]),
            "negative_first": summary([t for t in traces if t.first_label == 0]),
            "per_target": {
                t: summary([tr for tr, r in zip(traces, rows) if r["target"] == t])
                for t in TARGETS
                if any(r["target"] == t for r in rows)
            },
        }

    # ----------------------------------------------------------------------------------------- VQA
    def _ask(self, items: Sequence[tuple[np.ndarray, str]]) -> list[str]:
        out = []
        for batch in self._batches(items):
            out += self.pipe.answer_batch(
                [i for i, _ in batch], [q for _, q in batch], max_new_tokens=self.max_new_tokens
            )
        return out

    def _ask_regions(self, items: Sequence[tuple[np.ndarray, str, np.ndarray]]) -> list[str]:
        out = []
        for batch in self._batches(items):
            out += self.pipe.answer_region_batch(
                [i for i, _, _ in batch],
                [q for _, q, _ in batch],
                [m for _, _, m in batch],
                max_new_tokens=self.max_new_tokens,
            )
        return out

    def closed(self) -> dict[str, Any]:
        items = []  # (kind, wording set, image, question, answer)
        for n, s in enumerate(self.slices):
            askable = [t for t, p in s.presence.items() if TARGETS[t].modality in self.modalities]
            shown = [t for t in askable if s.presence[t] is True]
            hidden = [t for t in askable if s.presence[t] is False]
            for wording in ("train", "held_out"):
                pick = CLOSED_QUESTIONS["modality"][wording]
                items.append(("modality", wording, s.image, pick[n % len(pick)], modality_answer(s.modality)))
                pick = CLOSED_QUESTIONS["plane"][wording]
                items.append(("plane", wording, s.image, pick[n % len(pick)], s.plane))
                pick = CLOSED_QUESTIONS["visible"][wording]
                for j, (targets, answer) in enumerate(((shown, "yes"), (hidden, "no"))):
                    if targets:
                        target = TARGETS[targets[n % len(targets)]]
                        question = pick[(n + j) % len(pick)].format(
                            target=target.noun_phrases[n % len(target.noun_phrases)]
                        )
                        items.append(("visible", wording, s.image, question, answer))
        preds = self._ask([(image, q) for _, _, image, q, _ in items])
        self.progress(f"closed VQA {len(items)}")
        out: dict[str, Any] = {}
        for kind in CLOSED_QUESTIONS:
            out[kind] = {
                wording: _balanced(
                    [
                        (a, _correct(p, a))
                        for (k, w, _, _, a), p in zip(items, preds)
                        if (k, w) == (kind, wording)
                    ]
                )
                for wording in ("train", "held_out")
            }
        out["examples"] = [
            {"kind": k, "wording": w, "question": q, "answer": a, "pred": p}
            for (k, w, _, q, a), p in zip(items, preds)
            if not _correct(p, a)
        ][:20]
        return out

    def regions(self) -> dict[str, Any]:
        rng = random.Random(_REGION_SEED)
        items = []  # (class, normal question?, image, question, mask)
        for n, s in enumerate(self.slices):
            seen: set[str] = set()
            for cls, mask in region_masks(s, rng, per_class=1):
                if cls in seen:
                    continue
                seen.add(cls)
                question = REGION_QUESTIONS[n % len(REGION_QUESTIONS)].format(region="<region>")
                items.append((cls, False, s.image, question, mask))
                if n % 3 == 0:
                    normal = NORMAL_QUESTIONS[n % len(NORMAL_QUESTIONS)].format(region="<region>")
                    items.append((cls, True, s.image, normal, mask))
        preds = self._ask_regions([(image, q, m) for _, _, image, q, m in items])
        self.progress(f"region VQA {len(items)}")
        tissue = [(cls, _correct(p, cls)) for (cls, normal, *_), p in zip(items, preds) if not normal]
        normal = [
            ("no" if cls == "tumour" else "yes", _correct(p, "no" if cls == "tumour" else "yes"))
            for (cls, is_normal, *_), p in zip(items, preds)
            if is_normal
        ]
        result = _balanced(tissue)
        result["per_class"] = result.pop("per_answer")
        result["classes"] = [c for c in REGION_CLASSES if c in result["per_class"]]
        result["normal"] = _balanced(normal)
        result["confusions"] = {}
        for (cls, is_normal, *_), p in zip(items, preds):
            if not is_normal and not _correct(p, cls):
                key = f"{cls} -> {_norm(p)[:30]}"
                result["confusions"][key] = result["confusions"].get(key, 0) + 1
        return result

    def doc_questions(self) -> dict[str, Any]:
        middles = {}
        for s in self.slices:
            middles.setdefault((s.volume.name, s.plane), []).append(s)
        chosen = [group[len(group) // 2] for group in middles.values()]
        rng = random.Random(_REGION_SEED)
        items, region_items = [], []
        for s in chosen:
            for q in DOC_QUESTIONS["modality"]:
                items.append((s, q, modality_answer(s.modality)))
            for q in DOC_QUESTIONS["plane"]:
                items.append((s, q, s.plane))
            for q, target in DOC_QUESTIONS["visible"]:
                if s.presence[target] is not None:
                    items.append((s, q, "yes" if s.presence[target] else "no"))
            regions = region_masks(s, rng, per_class=1)
            for j, q in enumerate(DOC_QUESTIONS["region"]):
                cls, mask = regions[j % len(regions)]
                region_items.append((s, q, mask, cls))
            for q in DOC_QUESTIONS["normal"]:
                for cls, mask in regions:
                    region_items.append((s, q, mask, "no" if cls == "tumour" else "yes"))
        preds = self._ask([(s.image, q) for s, q, _ in items])
        region_preds = self._ask_regions([(s.image, q, m) for s, q, m, _ in region_items])
        rows = [(s, q, a, p) for (s, q, a), p in zip(items, preds)]
        rows += [(s, q, a, p) for (s, q, _, a), p in zip(region_items, region_preds)]
        failures = [
            {"slice": s.stem, "question": q, "answer": a, "pred": p}
            for s, q, a, p in rows
            if not _correct(p, a)
        ]
        return {"n": len(rows), "correct": len(rows) - len(failures), "failures": failures}


def evaluate_acceptance(
    pipe: Any,
    slices: Sequence[DemoSlice] | None = None,
    *,
    clicks: int = 3,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 8,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every acceptance figure of the demo model on ``slices`` (default: all held-out slices).

    Returns a report with ``grounding`` (per target, controls, absent / present, ``clicks``), ``region``,
    ``closed``, ``doc_questions``, ``figures`` (figure name -> value) and ``checks`` (figure -> passed).
    """
    slices = held_out_slices() if slices is None else list(slices)
    if not slices:
        raise ValueError("no held-out slice to evaluate")
    ev = _Evaluator(pipe, slices, max_new_tokens, batch_size, progress)
    report: dict[str, Any] = {"slices": len(slices), "max_new_tokens": max_new_tokens}
    report["grounding"] = ev.grounding(clicks)
    report["region"] = ev.regions()
    report["closed"] = ev.closed()
    report["doc_questions"] = ev.doc_questions()
    report["figures"] = _figures(report)
    report["checks"] = acceptance_checks(report["figures"], skipped=() if clicks else (CLICK_GAIN,))
    return report


def _figures(report: dict[str, Any]) -> dict[str, float | None]:
    g = report["grounding"]
    figures: dict[str, float | None] = {}
    for target in TARGETS:
        figures[f"mdice {target}"] = g["per_target"].get(target, {}).get("mdice")
    figures["liver vs tumour mask dice"] = g["liver_vs_tumour"]["mean_dice"]
    figures["zero-prompt drop of mean dice"] = g["zero_prompt_drop"]
    figures["absent: no <SEG> and empty mask"] = g["absent"]["no_seg_rate"]
    figures["present: <SEG>"] = g["present"]["seg_rate"]
    figures["region VQA accuracy (5 classes)"] = report["region"]["balanced_accuracy"]
    for kind in CLOSED_QUESTIONS:
        for wording, label in (("train", "train"), ("held_out", "held-out")):
            figures[f"closed {kind}, {label} wordings"] = report["closed"][kind][wording]["balanced_accuracy"]
    docs = report["doc_questions"]
    figures["doc questions answered"] = docs["correct"] / docs["n"] if docs["n"] else None
    clicks = g["clicks"]
    figures[CLICK_GAIN] = clicks.get("all", {}).get("gain_after_1")
    return figures


def acceptance_checks(
    figures: dict[str, float | None], skipped: Sequence[str] = ()
) -> dict[str, bool | None]:
    """Figure -> whether it meets :data:`ACCEPTANCE`: a figure that could not be measured fails, one the caller
    chose not to measure (``skipped``) is None."""
    ops = {">=": np.greater_equal, "<=": np.less_equal, ">": np.greater}
    return {
        name: None
        if name in skipped
        else figures.get(name) is not None and bool(ops[op](figures[name], threshold))
        for name, (op, threshold) in ACCEPTANCE.items()
    }


_VERDICT = {True: "yes", False: "NO", None: "skipped"}


def format_acceptance(report: dict[str, Any]) -> str:
    """Plain-text table of the acceptance figures, their thresholds and the controls."""
    figures, checks = report["figures"], report["checks"]
    lines = [f"{'figure':<40} {'value':>7}  {'target':<8} ok", "-" * 62]
    for name, (op, threshold) in ACCEPTANCE.items():
        value = figures.get(name)
        shown = "-" if value is None else f"{value:.3f}"
        lines.append(f"{name:<40} {shown:>7}  {op} {threshold:<5g} {_VERDICT[checks[name]]}")
    g = report["grounding"]
    lines.append("")
    lines.append(
        f"mean dice over targets {g['mean_over_targets']:.3f}; with a zero <SEG> prompt "
        f"{g['zero_prompt_mean_over_targets']:.3f}"
    )
    clicks = g["clicks"].get("all", {})
    if clicks.get("n"):
        curve = " -> ".join(f"{v:.3f}" for v in clicks["dice"])
        lines.append(
            f"click refinement, mean dice over {clicks['n']} groundings (0..{len(clicks['dice']) - 1} clicks): {curve}"
        )
    return "\n".join(lines)
