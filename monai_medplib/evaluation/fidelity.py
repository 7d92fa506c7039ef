"""How closely one pipeline follows another on the same requests: the fidelity gate of a quantised model.

:func:`compare_pipelines` runs the same requests through a reference (e.g. float32) and a candidate (e.g. int8)
:class:`~monai_medplib.pipeline.MedPLIBPipeline` and reports

* ``router_agreement``: the share of (token, MoE layer) pairs whose top-1 expert is the same, over every MoE
  call (prompt prefills and decoding steps, as long as both models produced the same tokens);
* ``answers_same``: the share of VQA requests whose greedy answer text is identical;
* ``seg_cosine_min``: the lowest cosine between the two ``<SEG>`` prompt embeddings of a grounding request
  (where both produced ``<SEG>``), and ``seg_agreement``: the share of grounding requests where both or neither
  produced one;
* ``dice_min`` / ``dice_mean``: Dice of the candidate's mask against the reference's.

:func:`demo_requests` builds the requests of the demo model's held-out slices (:func:`held_out_slices`): the
held-out wordings of the closed questions and one grounding request per structure a slice shows;
:func:`fixture_requests` those of the tiny public fixture's cases.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.demo_prompts import CLOSED_QUESTIONS, TARGETS
from ..data.demo_slices import DemoSlice
from ..processing import load_pixels
from .clicks import dice

__all__ = ["FidelityRequest", "compare_pipelines", "demo_requests", "fixture_requests", "middle_slices"]

GROUNDING_REQUEST = "Please segment the {target}."
DEFAULT_MAX_NEW_TOKENS = 32


@dataclass(frozen=True)
class FidelityRequest:
    """One request: ``kind`` "vqa" (``text`` is a question) or "ground" (``text`` asks for a structure)."""

    kind: str
    image: np.ndarray
    text: str


def middle_slices(slices: Sequence[DemoSlice]) -> list[DemoSlice]:
    """The middle slice of each (volume, plane) run of ``slices`` (e.g. of :func:`held_out_slices`)."""
    runs: dict[tuple[str, str], list[DemoSlice]] = {}
    for s in slices:
        runs.setdefault((s.modality, s.plane), []).append(s)
    return [run[len(run) // 2] for run in runs.values()]


def demo_requests(slices: Sequence[DemoSlice], wordings: int | None = None) -> list[FidelityRequest]:
    """Per slice: the held-out wordings (the first ``wordings`` of each kind; default all) of the modality and
    plane questions, the held-out "visible" wordings for each structure whose presence is clear, and a grounding
    request for each structure the slice shows."""
    out: list[FidelityRequest] = []
    for s in slices:
        for kind in ("modality", "plane"):
            out += [FidelityRequest("vqa", s.image, q) for q in CLOSED_QUESTIONS[kind]["held_out"][:wordings]]
        for name, present in s.presence.items():
            if present is None:
                continue
            phrase = TARGETS[name].noun_phrases[0]
            visible = CLOSED_QUESTIONS["visible"]["held_out"][:wordings]
            out += [FidelityRequest("vqa", s.image, q.format(target=phrase)) for q in visible]
            if present:
                out.append(FidelityRequest("ground", s.image, GROUNDING_REQUEST.format(target=name)))
    return out


def fixture_requests(fixture: str | Path) -> list[FidelityRequest]:
    """The cases of an upstream tiny fixture (``inputs/prompts.json``) without region prompts: VQA and grounding."""
    fixture = Path(fixture)
    cases = json.loads((fixture / "inputs" / "prompts.json").read_text())["cases"]
    out = []
    for case in cases.values():
        if "<region>" in case["question"]:
            continue
        kind = "ground" if "segment" in case["question"].lower() else "vqa"
        out.append(FidelityRequest(kind, load_pixels(fixture / "inputs" / case["image"]), case["question"]))
    return out


class _RouterLog:
    """The top-1 expert of every token of every MoE call of a model, in call order (prefills and decoding steps)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: list[torch.Tensor] = []
        self._handles = [
            module.deepspeed_moe.gate.register_forward_hook(self._record)
            for module in model.modules()
            if hasattr(module, "deepspeed_moe")
        ]

    def _record(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        self.calls.append(output.argmax(-1).cpu())

    def take(self) -> list[torch.Tensor]:
        calls, self.calls = self.calls, []
        return calls

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


def _agreement(ref: list[torch.Tensor], cand: list[torch.Tensor], same_tokens: bool) -> tuple[int, int]:
    """(agreeing, compared) top-1 choices of one request: the prompt's calls (one per MoE layer) always, the
    decoding steps only when both models produced the same tokens (otherwise they route different tokens).

    One model may have run only the question on its cached image prefix while the other ran the whole prompt
    (their caches hold different byte sizes): then the rows both ran, the prompt's last ones, are compared."""
    layers = sum(1 for call in ref if call.shape == ref[0].shape) if not same_tokens else len(ref)
    pairs = []
    for a, b in zip(ref[:layers], cand[:layers]):
        rows = min(len(a), len(b))
        pairs.append((a[len(a) - rows :], b[len(b) - rows :]))
    return sum(int((a == b).sum()) for a, b in pairs), sum(a.numel() for a, _ in pairs)


def compare_pipelines(
    reference: Any,
    candidate: Any,
    requests: Sequence[FidelityRequest],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    force_seg: bool = False,
) -> dict[str, Any]:
    """The fidelity figures of ``candidate`` against ``reference`` (see the module docstring), plus the counts
    (``vqa``, ``ground``, ``seg_both``) and every differing answer in ``answer_differences``. ``force_seg``
    grounds with the answer forced to ``<SEG></s>`` (random-weight models never produce it)."""
    logs = _RouterLog(reference.model), _RouterLog(candidate.model)
    agree = total = same = seg_agree = 0
    differences, cosines, dices = [], [], []
    try:
        for request in requests:
            if request.kind == "vqa":
                a = reference.answer(request.image, request.text, max_new_tokens=max_new_tokens)
                b = candidate.answer(request.image, request.text, max_new_tokens=max_new_tokens)
                same_tokens = a == b
                same += same_tokens
                if not same_tokens:
                    differences.append((request.text, a, b))
            else:
                options = {"max_new_tokens": max_new_tokens, "force_seg": force_seg}
                a = reference.ground(request.image, request.text, **options)
                b = candidate.ground(request.image, request.text, **options)
                same_tokens = a.token_ids == b.token_ids
                seg_agree += a.has_seg == b.has_seg
                if a.has_seg and b.has_seg:
                    cosines.append(_cosine(a.seg_embedding, b.seg_embedding))
                    dices.append(dice(b.mask, a.mask))
            counted = _agreement(logs[0].take(), logs[1].take(), same_tokens)
            agree, total = agree + counted[0], total + counted[1]
    finally:
        for log in logs:
            log.close()
    vqa = sum(r.kind == "vqa" for r in requests)
    ground = len(requests) - vqa
    return {
        "router_agreement": agree / total if total else None,
        "router_tokens": total,
        "vqa": vqa,
        "answers_same": same / vqa if vqa else None,
        "answer_differences": differences,
        "ground": ground,
        "seg_agreement": seg_agree / ground if ground else None,
        "seg_both": len(dices),
        "seg_cosine_min": min(cosines) if cosines else None,
        "dice_min": min(dices) if dices else None,
        "dice_mean": float(np.mean(dices)) if dices else None,
    }
