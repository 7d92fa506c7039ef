"""Evaluate a MedPLIB model on MeCoVQA-style test files the way the release ``vqa_infer.py`` does.

Prompt = the ``vicuna_v1`` template ending in ``ASSISTANT:`` (the release cuts the dataset ids after the last
``:``), greedy decoding, ``decode(skip_special_tokens=True).strip()``. Grounding: the [SEG] state of the first
generated ``<SEG>`` -> ``text_hidden_fcs`` -> SAM-Med2D with the text prompt only -> release crop quirk ->
``sigmoid > 0.1``; no ``<SEG>`` scores 0. Region VQA passes the region grids (largest component, as the dataset
path does) the way the demo worker does; the release ``--eval_vqa`` script drops them (spec 5.3).
Scores come from :mod:`monai_medplib.metrics`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..data.mecovqa import MeCoVQARecord, load_binary_mask, read_mecovqa
from ..metrics import GroundingMeter, summarize, vqa_metrics
from ..modeling.medplib import MedPLIBForCausalLM
from ..processing import clip_pixels, load_rgb, postprocess_mask_logits, region_grid, sam_pixels
from ..tokenization import MedPLIBTokenizer, build_prompt

TEST_FILES = {
    "closed": "test/MeCoVQA_Complex_VQA_test.json",
    "region": "test/MeCoVQA_Region_VQA_test.json",
    "grounding": "test/MeCoVQA_Grounding_test.json",
}


@torch.no_grad()
def _generate(
    model: MedPLIBForCausalLM,
    tokenizer: MedPLIBTokenizer,
    records: Sequence[MeCoVQARecord],
    max_new_tokens: int,
):
    rgbs = [load_rgb(r.image) for r in records]
    ids = [tokenizer.encode_prompt(build_prompt(r.turns[0].question, "vicuna_v1")) for r in records]
    grids = [
        [region_grid(load_binary_mask(p), keep_largest_component=True) for p in r.region_paths]
        for r in records
    ]
    clip = torch.stack([clip_pixels(rgb) for rgb in rgbs]).to(model.device, model.dtype)
    feats = model.clip_features(clip)
    embeds, mask = model.build_inputs_embeds(ids, feats, grids, padding_side="left")
    out = model.greedy_generate(embeds, mask, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id)
    return rgbs, out


@torch.no_grad()
def evaluate(
    model: MedPLIBForCausalLM,
    tokenizer: MedPLIBTokenizer,
    data_root: str | Path,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    limit: int | None = None,
    tasks: tuple[str, ...] = tuple(TEST_FILES),
) -> tuple[dict[str, Any], str, list[dict[str, Any]]]:
    """Score the three test files under ``data_root``; returns ``(report, table, per-sample rows)``.

    The report holds ``grounding`` (overall and per target: liver / tumour), ``vqa_closed`` (overall and per
    question kind) and ``vqa_region`` (metrics of ``vqa_metrics``; region answers are scored as open questions and,
    since each is one word, also as exact accuracy).
    """
    model.eval()
    root = Path(data_root)
    rows: list[dict[str, Any]] = []
    entries: dict[str, dict[str, dict]] = {}
    for task, rel in TEST_FILES.items():
        if task not in tasks:
            continue
        records = read_mecovqa(root / rel, root)[:limit]
        entries[task] = {e["id"]: e for e in json.loads((root / rel).read_text())}
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            rgbs, out = _generate(model, tokenizer, chunk, max_new_tokens)
            seg_states = out.seg_hidden_states(tokenizer.seg_id)
            for b, record in enumerate(chunk):
                entry = entries[task][record.id]
                text = tokenizer.decode(out.new_ids[b], skip_special_tokens=True).strip()
                row = {"id": record.id, "task": task, "image": str(record.image), "pred": text}
                if task == "grounding":
                    row["target"] = entry.get("target")
                    row["logits"] = _ground(model, rgbs[b], seg_states[b])
                    row["gt_mask"] = record.mask_paths[0]
                else:
                    row["gt"] = record.turns[0].answer
                    row["answer_type"] = entry.get("answer_type", "closed")
                    row["kind"] = entry.get("question_kind", "region")
                rows.append(row)
    report = _report(rows)
    _, table = summarize(
        grounding=report["grounding"]["all"] if "grounding" in tasks else None,
        vqa=report["vqa_closed"]["all"] if "closed" in tasks else None,
    )
    for row in rows:
        row.pop("logits", None)
        if "gt_mask" in row:
            row["gt_mask"] = str(row["gt_mask"])
    return report, table, rows


def _ground(model: MedPLIBForCausalLM, rgb, seg_state: torch.Tensor | None) -> torch.Tensor | None:
    if seg_state is None:
        return None
    images_sam, resize = sam_pixels(rgb)
    embeddings = model.model.visual_model.encode_image(images_sam[None].to(model.device, model.dtype))
    prompt = model.seg_embeddings(seg_state[None])
    low_res, _ = model.model.visual_model.decode(embeddings, text_embeds=prompt[:, None])
    return postprocess_mask_logits(low_res.float(), resize, rgb.shape[:2])[0, 0].cpu()


def _report(rows: list[dict[str, Any]]) -> dict[str, Any]:
    grounding: dict[str, GroundingMeter] = {"all": GroundingMeter()}
    for row in (r for r in rows if r["task"] == "grounding"):
        gt = load_binary_mask(row["gt_mask"])
        for key in ("all", row["target"]):
            grounding.setdefault(key, GroundingMeter()).add(row["image"], row["logits"], gt)
    report: dict[str, Any] = {"grounding": {k: m.result() for k, m in grounding.items()}}
    closed = [r for r in rows if r["task"] == "closed"]
    kinds = sorted({r["kind"] for r in closed})
    report["vqa_closed"] = {"all": vqa_metrics(closed)}
    report["vqa_closed"].update({k: vqa_metrics([r for r in closed if r["kind"] == k]) for k in kinds})
    region = [r for r in rows if r["task"] == "region"]
    report["vqa_region"] = vqa_metrics(region)
    report["vqa_region"]["accuracy"] = vqa_metrics([{**r, "answer_type": "closed"} for r in region])["closed"]
    for key in ("vqa_closed", "vqa_region"):
        if not any(r["task"] == key.split("_")[1] for r in rows):
            report.pop(key)
    return report
