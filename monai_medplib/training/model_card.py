"""Install a trained demo model into ``monai_medplib/demo_model/`` with its MODEL_CARD.md."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

_KEEP_SUFFIXES = (".json", ".safetensors", ".model")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def eval_table(report: dict[str, Any]) -> str:
    """Markdown table of the held-out scores (values in %) from a :func:`~monai_medplib.evaluation.evaluate_mecovqa`
    report."""
    lines = ["| task | metric | held-out score (%) | n |", "|---|---|---|---|"]
    grounding = report.get("grounding")
    if grounding:
        parts = {**grounding.get("per_target", {}), "all": grounding}
        for key, g in parts.items():
            lines.append(
                f"| grounding {key} | mDice / mIoU | {_pct(g['mdice'])} / {_pct(g['miou'])} | {g['n']} |"
            )
    vqa = report.get("vqa", {})
    closed = vqa.get("per_task", {}).get("vqa", {}).get("closed")
    if closed and closed["n"]:
        lines.append(f"| closed VQA (all) | accuracy | {_pct(closed['accuracy'])} | {closed['n']} |")
    for kind, part in vqa.get("per_kind", {}).items():
        if part["closed"]["n"]:
            c = part["closed"]
            lines.append(f"| closed VQA: {kind} | accuracy | {_pct(c['accuracy'])} | {c['n']} |")
    region = vqa.get("per_task", {}).get("region_vqa", {}).get("open")
    if region and region["n"]:
        lines.append(
            f"| region VQA | open recall / F1 | {_pct(region['recall'])} / {_pct(region['f1'])} | {region['n']} |"
        )
    return "\n".join(lines)


def model_card(result: dict[str, Any], weight_bytes: int, config: dict[str, Any]) -> str:
    """MODEL_CARD.md text from the training result (timings, stage summaries, eval report)."""
    stages = result["stages"]
    stage_rows = "\n".join(
        f"| {name} | {s['steps_done'] if 'steps_done' in s else s['steps']} | {s['train_seconds']:.0f} | {s['wall_seconds']:.0f} |"
        f" {s['trainable_parameters']:,} | {s['first_loss']:.3f} -> {s['last_loss']:.3f} |"
        for name, s in stages.items()
    )
    total = sum(s["wall_seconds"] for s in stages.values())
    plan = result.get("plan")
    plan = (
        " ("
        + "; ".join(f"{k}: lr {v[3]:g}, {' '.join(v[4]) or 'no oversampling'}" for k, v in plan.items())
        + ")"
        if plan
        else ""
    )
    sam = config.get("sam_config", {})
    clip = config.get("clip_config", {})
    return f"""# MedPLIB demo model

A small MedPLIB (same architecture as `MedPLIB-7b-2e`, shrunk) trained from scratch by this project's own training
code (`scripts/train_demo.py`) on one real CT volume. It exists so that the library, the MONAI Bundle and the MONAI Label
app run on a fresh machine with no download. It is **not** a medical model: it has seen one patient.

## Architecture
- LLaMA decoder: {config["num_hidden_layers"]} layers, hidden {config["hidden_size"]}, MLP {config["intermediate_size"]},
  {config["num_attention_heads"]} heads; every MLP a top-1 MoE of 2 experts (release key names); vocabulary {config["vocab_size"]}
  (SentencePiece BPE trained on the demo corpus with LLaMA's options, byte fallback, + the 267 MedPLIB tokens).
- CLIP ViT: 336 px, patch 14 (576 image tokens), {clip.get("num_hidden_layers")} layers, width {clip.get("hidden_size")}.
- SAM-Med2D: 256 px, patch 16, encoder {sam.get("encoder_depth")} blocks x {sam.get("encoder_embed_dim")} with adapters,
  global attention in blocks {sam.get("encoder_global_attn_indexes")}; release 256-d prompt encoder and mask decoder.
- Weights: `model.safetensors`, bfloat16, {weight_bytes / 1e6:.1f} MB.

## Data
LiTS case 117 as shipped in `liver-ct-segmentation-package` (128^3 crop, labels background / liver / tumour; LiTS data
terms: non-commercial), normalised the SA-Med2D way (0.5 / 99.5 percentile window -> uint8) and cut along the axial,
coronal and sagittal planes (`monai_medplib.data.demo_dataset`). Tasks: grounding ("Please segment the liver." and 7
other phrasings, liver and tumour -> `<SEG>`), closed VQA (tumour visible? liver visible? which plane?), region VQA
(what is inside this disc region? -> liver / tumour / background).
Held-out split: per plane, the central block of 26 slices (20 %) is the test set and 3 slices on each side of it are
used nowhere. Train and test come from the same patient. Nearly every slice of this liver-centred crop shows liver and
tumour, so "liver visible" and "tumour visible" are almost always "yes" (majority baselines in the table's n).

## Training (2 CPU cores, shared machine; DDP over gloo, 2 processes x 1 thread)
Stage 0 (demo only: no pretrained CLIP / LLaMA / SAM-Med2D offline) trains the whole dense model from scratch on all
tasks; stage II = vision-language expert (LoRA r16 on q,k,v,o,gate,up,down + full FT of lm_head, embeddings, norms,
projector; VQA + region VQA); stage III = grounding expert (LoRA r8 on gate,up,down + full FT of mask decoder and
[SEG] head; CE 1, Dice 5, BCE 1, focal 1); stage IV = MoE (expert 0 = stage-III MLPs, expert 1 = stage-II MLPs, fresh
router; LoRA r8 on gate,up,down,q,v of each expert copy + full FT of router, lm_head, embeddings, mask decoder,
[SEG] head, region adapter; CE 1, Dice 0.5, BCE 2), then LoRA merged and saved in the release layout.
Per-stage learning rate, batch and task oversampling: `STAGE_PLAN` in `scripts/train_demo.py`{plan}. AdamW (0.9, 0.95),
linear warm-up 3 % then linear decay, 2 processes x batch 4, grad clip 1. Stage lengths are wall-clock budgets
(the LR schedule follows elapsed time), so step counts depend on the machine's load.

| stage | optimizer steps | train s | wall s (incl. start-up) | trainable params | loss first -> last |
|---|---|---|---|---|---|
{stage_rows}

Total training wall time: {total / 60:.1f} min (dataset + tokenizer: {result["timings"].get("data_and_tokenizer_s", 0):.0f} s).

## Held-out evaluation (`medplib eval`; release protocol: vicuna_v1 prompt, greedy, sigmoid > 0.1, per-sample mDice)
{eval_table(result["eval"])}
"""


def install_demo_model(final_dir: str | Path, result: dict[str, Any], target: str | Path) -> Path:
    """Copy the release-layout files of ``final_dir`` to ``target`` (keeping its ``__init__.py``) and write the card."""
    final_dir, target = Path(final_dir), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for old in target.iterdir():
        if old.name not in ("__init__.py", "__pycache__"):
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    for src in final_dir.rglob("*"):
        if src.is_file() and src.suffix in _KEEP_SUFFIXES:
            dst = target / src.relative_to(final_dir)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    config = json.loads((target / "config.json").read_text())
    size = (target / "model.safetensors").stat().st_size
    (target / "MODEL_CARD.md").write_text(model_card(result, size, config))
    return target
