"""Install a trained demo model into ``monai_medplib/demo_model/`` with its MODEL_CARD.md."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..data.demo_prompts import ABSENT_ANSWER, CLOSED_QUESTIONS, GROUNDING_PHRASES, REGION_CLASSES
from ..data.mni import MNI_CUBE, MNI_NOTICE, TISSUE_THRESHOLD

_KEEP_SUFFIXES = (".json", ".safetensors", ".model")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def eval_table(report: dict[str, Any]) -> str:
    """Markdown table of the release-protocol held-out scores (values in %) of an ``evaluate_mecovqa`` report."""
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


def acceptance_table(acceptance: dict[str, Any]) -> str:
    """Markdown table of the acceptance figures with their thresholds (``evaluation.acceptance`` report)."""
    from ..evaluation.acceptance import ACCEPTANCE

    lines = ["| figure | held-out value | target | met |", "|---|---|---|---|"]
    for name, (op, threshold) in ACCEPTANCE.items():
        value = acceptance["figures"].get(name)
        met = {True: "yes", None: "skipped"}.get(acceptance["checks"].get(name), "**no**")
        lines.append(f"| {name} | {_num(value)} | {op} {threshold:g} | {met} |")
    return "\n".join(lines)


def _details(acceptance: dict[str, Any]) -> str:
    g = acceptance["grounding"]
    rows = ["| target | n | mDice | mDice, zero `<SEG>` prompt | `<SEG>` rate |", "|---|---|---|---|---|"]
    for target, part in g["per_target"].items():
        rows.append(
            f"| {target} | {part['n']} | {_num(part['mdice'])} | {_num(part['zero_prompt_mdice'])} |"
            f" {_num(part['seg_rate'])} |"
        )
    rows.append(
        f"| mean over targets | | {_num(g['mean_over_targets'])} | {_num(g['zero_prompt_mean_over_targets'])} | |"
    )
    lt = g["liver_vs_tumour"]
    absent = g["absent"]
    text = "\n".join(rows)
    text += (
        f"\n\nLiver vs tumour masks on the {lt['n']} held-out CT slices showing both: mean Dice "
        f"{_num(lt['mean_dice'])} (max {_num(lt['max_dice'])}). Absent-structure requests: {absent['n']}, "
        f"answered without `<SEG>` and with an empty mask: {_num(absent['no_seg_rate'])} "
        f"(per target: {', '.join(f'{k} {_num(v)}' for k, v in absent['per_target'].items())}). "
        f"Requests for a shown structure: {g['present']['n']}, with `<SEG>`: {_num(g['present']['seg_rate'])}."
    )
    clicks = g["clicks"]
    if clicks.get("all", {}).get("n"):
        text += (
            "\n\n| clicks on | n | mean Dice after 0, 1, 2, 3 clicks | gain after 1 | improved after 1 |\n"
        )
        text += "|---|---|---|---|---|\n"
        for key in (
            "all",
            "positive_first",
            "negative_first",
            *[f"target:{t}" for t in clicks["per_target"]],
        ):
            part = clicks["per_target"][key[7:]] if key.startswith("target:") else clicks[key]
            if not part.get("n"):
                continue
            curve = " / ".join(_num(v) for v in part["dice"])
            text += (
                f"| {key.replace('_', ' ')} | {part['n']} | {curve} | {_num(part['gain_after_1'])} |"
                f" {_num(part['improved_after_1'])} |\n"
            )
    region = acceptance["region"]
    text += "\n\nRegion VQA per class (accuracy): " + ", ".join(
        f"{c} {_num(region['per_class'].get(c))}" for c in region["classes"]
    )
    text += f' (n {region["n"]}); "is <region> normal?": balanced accuracy {_num(region["normal"]["balanced_accuracy"])}'
    text += f" (n {region['normal']['n']}).\n\n| closed VQA | wordings | n | balanced accuracy | accuracy |\n|---|---|---|---|---|\n"
    for kind, part in acceptance["closed"].items():
        if kind == "examples":
            continue
        for wording, scores in part.items():
            text += (
                f"| {kind} | {wording.replace('_', '-')} | {scores['n']} | {_num(scores['balanced_accuracy'])} |"
                f" {_num(scores['accuracy'])} |\n"
            )
    docs = acceptance["doc_questions"]
    text += f"\nExample questions of the docs: {docs['correct']} of {docs['n']} answered correctly."
    if docs["failures"]:
        text += " Wrong: " + "; ".join(
            f'"{f["question"]}" on {f["slice"]} -> "{f["pred"]}" (expected "{f["answer"]}")'
            for f in docs["failures"][:6]
        )
    return text


def limits(acceptance: dict[str, Any]) -> str:
    """What the model still cannot do: the figures it misses and what the data cannot teach or test."""
    from ..evaluation.acceptance import ACCEPTANCE

    missed = [
        f"{name} ({_num(acceptance['figures'].get(name))}, target {ACCEPTANCE[name][0]} {ACCEPTANCE[name][1]:g})"
        for name, ok in acceptance["checks"].items()
        if ok is False
    ]
    first = (
        "- Misses these acceptance figures: " + "; ".join(missed) + "."
        if missed
        else "- Meets every acceptance figure above on the held-out slabs; that is all it was measured on."
    )
    return "\n".join(
        [
            first,
            "- It has seen one CT patient and one MR template (an average brain): the held-out slabs are other slices of"
            " the same two bodies, so nothing here says how it behaves on another patient, scanner, contrast or"
            " body part.",
            "- It knows five structures (liver, tumour, grey matter, white matter, brain). A request for anything else"
            ' ("spleen", "kidney") is outside its vocabulary: it may answer with a mask of a known structure or say'
            " that nothing is visible, both meaningless.",
            "- Absent structures are mostly the other modality's (CT asked for brain tissue, MR for the liver): the LiTS"
            " crop shows tumour on almost every slice (5 training slices without it, none in the held-out slabs), so a"
            " tumour request on a tumour-free CT slice is trained but barely tested.",
            "- Masks come from SAM-Med2D's 64 x 64 decoder output: thin structures (the grey-matter ribbon) lose detail"
            " at that resolution. Images should be square, as every training slice was (non-square images go through"
            " the release's mask crop quirk, which stretches the mask).",
            "- Answers are single words or one fixed sentence; it cannot explain, describe findings or answer free-form"
            " questions, and question wordings far from the trained ones (see the held-out figures) may fail.",
            "- Region questions were trained on discs lying mostly inside one tissue; a region straddling several"
            " tissues gets one of their names.",
            *_plane_miss(acceptance["checks"]),
            *_region_misses(acceptance["region"]),
        ]
    )


def _plane_miss(checks: dict[str, bool]) -> list[str]:
    """Why the plane question fails, when it does (measured while fixing it; see the closing notes of issue 13)."""
    if all(ok for name, ok in checks.items() if name.startswith("closed plane")):
        return []
    return [
        "- The slice plane is guessed, so do not ask it. The plane shows in the slice's layout (where the outline"
        " and the spine lie), and the image tokens carry it by where they sit: a linear reader of the CLIP tokens"
        " average-pooled to a 4 x 4 grid tells the plane of the held-out slices with balanced accuracy 0.98, one of"
        " their mean 0.29-0.37. The 2-layer LLM did not learn to read token positions. Stage 0's plane questions"
        " did not teach it, nor did a few minutes more of plane-only training of the tower or of the whole model;"
        " 300 steps of plane questions alone in the final model's LoRA raised its balanced accuracy on training"
        " slices from 0.38 to 0.59 and left the held-out slabs at chance (0.35): it learns which slice it sees, not"
        " the layout. The release model (a pretrained CLIP) was not measured on this."
    ]


def _region_misses(region: dict[str, Any]) -> list[str]:
    """The held-out region VQA confusions and the "is <region> normal?" figure, as limitation lines."""
    lines = []
    if region.get("confusions"):
        worst = sorted(region["confusions"].items(), key=lambda kv: -kv[1])
        lines.append(
            "- Region VQA mistakes on the held-out slices (class -> answer: count): "
            + "; ".join(f"{k}: {n}" for k, n in worst[:4])
            + "."
        )
    normal = region.get("normal", {})
    if normal.get("n") and (normal.get("balanced_accuracy") or 0) < 0.9:
        answers = ", ".join(f'"{a}" {_num(v)}' for a, v in normal.get("per_answer", {}).items())
        lines.append(
            f'- "Is <region> normal?" is not learned: balanced accuracy {_num(normal["balanced_accuracy"])}'
            f" (per expected answer: {answers}; a tumour region is the only abnormal one)."
        )
    return lines


def _eval_minutes(result: dict[str, Any]) -> float:
    timings = result["timings"]
    return (timings.get("eval_s", 0) + timings.get("acceptance_s", 0)) / 60


def _wordings(kind: str, which: str) -> str:
    return "; ".join(f'"{q}"' for q in CLOSED_QUESTIONS[kind][which])


def model_card(result: dict[str, Any], weight_bytes: int, config: dict[str, Any]) -> str:
    """MODEL_CARD.md text from the training result (timings, stage summaries, eval and acceptance reports)."""
    stages = result["stages"]
    stage_rows = "\n".join(
        f"| {name} | {s['steps']} | {s.get('cpu_seconds', 0):.0f} | {s['wall_seconds']:.0f} |"
        f" {s['trainable_parameters']:,} | {s['first_loss']:.3f} -> {s['last_loss']:.3f} |"
        for name, s in stages.items()
    )
    wall = sum(s["wall_seconds"] for s in stages.values())
    cpu = sum(s.get("cpu_seconds", 0) for s in stages.values())
    plan = result.get("plan", {})
    plan_text = "; ".join(
        f"{k}: {v['steps']} steps, lr {v['lr']:g}"
        + (f", oversampling {' '.join(v['repeat'])}" if v["repeat"] else "")
        + (", click prompts" if "--click-prompts" in v["flags"] else "")
        + (", empty masks for absent answers" if "--absent-masks" in v["flags"] else "")
        + (", null prompt" if "--null-prompt" in v["flags"] else "")
        + (", CLIP tower and region adapter frozen" if "--freeze" in v["flags"] else "")
        for k, v in plan.items()
    )
    budget = result.get("budget", {})
    data = result.get("data", {})
    sam = config.get("sam_config", {})
    clip = config.get("clip_config", {})
    acceptance = result["acceptance"]
    return f"""# MedPLIB demo model

A small MedPLIB (same architecture as `MedPLIB-7b-2e`, shrunk) trained from scratch by this project's own 4-stage
training code (`scripts/train_demo.py`) on two real volumes: one abdominal CT and one brain MR template. It exists so
that the library, the MONAI Bundle and the MONAI Label app run on a fresh machine with no download, and so that each
capability can be seen working: text grounding that follows the request, "not found" for absent structures, region
and closed VQA, and click refinement. It is **not** a medical model: it has seen one CT patient and one MR template.

## Architecture
- LLaMA decoder: {config["num_hidden_layers"]} layers, hidden {config["hidden_size"]}, MLP {config["intermediate_size"]},
  {config["num_attention_heads"]} heads; every MLP a top-1 MoE of 2 experts (release key names); vocabulary {config["vocab_size"]}
  (SentencePiece BPE trained on the training conversations with LLaMA's options, byte fallback, + the 267 MedPLIB tokens).
- CLIP ViT: 336 px, patch 14 (576 image tokens), {clip.get("num_hidden_layers")} layers, width {clip.get("hidden_size")}.
- SAM-Med2D: 256 px, patch 16, encoder {sam.get("encoder_depth")} blocks x {sam.get("encoder_embed_dim")} with adapters,
  global attention in blocks {sam.get("encoder_global_attn_indexes")}; release 256-d prompt encoder and mask decoder (64 x 64 masks).
- Weights: `model.safetensors`, bfloat16, {weight_bytes / 1e6:.1f} MB.

## Data (offline, real images only; `monai_medplib.data.demo_slices` / `demo_dataset`)
- CT: LiTS case 117 as shipped in the `liver-ct-segmentation-package` wheel (128^3 crop, 1.5 mm assumed, labels
  background / liver / tumour). Licence: the LiTS data terms, **non-commercial** use only.
- MR: the MNI ICBM152 2009a symmetric T1 template (skull-stripped) with its grey- and white-matter probability maps,
  read directly from the `nilearn` wheel's files (`nilearn/datasets/data/mni_icbm152_{{t1,gm,wm}}_tal_nlin_sym_09a_converted.nii.gz`;
  nilearn is not imported). Tissue = probability >= {TISSUE_THRESHOLD} (the maps store 255 p); brain = grey or white
  matter; the volume is cut / zero-padded to a {MNI_CUBE}^3 cube around the brain so that every slice is square (the
  release's mask post-processing stretches masks of non-square images). Licence: nilearn's dataset description
  lists it as "unknown"; the template archive's own notice, which must accompany every copy, reads: "{MNI_NOTICE}"
- Both volumes are normalised the SA-Med2D way (0.5 / 99.5 percentile window -> uint8, the project's
  `SAMed2DNormalize`) and cut along the axial, coronal and sagittal planes (`ExtractSlice`).
- Held-out protocol: per volume and plane, the central 20 % slab (LiTS: 26 of 128 slices, MNI: 38 of 192) is the
  test set and 3 slices on each side of it are used nowhere; nothing of the test slabs is used in training (the
  tokenizer is trained on the training conversations only). Train and test come from the same body: the figures
  measure generalisation to unseen slabs, not to new patients or scanners.
- Training conversations ({data.get("copies", "?")} per slice and task, 1-{data.get("max_turns", "?")} rounds about one image):
  grounding of the structures the slice shows (liver, tumour; grey matter, white matter, brain) with the
  MeCoVQA-G phrasings ({"; ".join(f'"{p}"' for p in GROUNDING_PHRASES[:3])} and {len(GROUNDING_PHRASES) - 3} more) -> `<SEG>`,
  and of structures it cannot show (CT asked for white matter, MR for the liver, a structure with no pixel on the slice)
  -> "{ABSENT_ANSWER}" without `<SEG>`; region questions whose region (a disc mostly of one class) covers
  {", ".join(REGION_CLASSES)}; closed VQA on modality (CT / MRI), plane and "is X visible" with "no" as often as "yes".
  Half of the training conversations are about a random square crop of the slice (45-80 % of its side); crops get
  no plane question, since a window of the slice hides the outline that tells the plane.
- Closed-question wordings used in training: modality {_wordings("modality", "train")}; plane {_wordings("plane", "train")};
  visible {_wordings("visible", "train")}. Held out from training (evaluation only): {_wordings("modality", "held_out")};
  {_wordings("plane", "held_out")}; {_wordings("visible", "held_out")}.

## Training (2 CPU cores: DDP over gloo, {budget.get("nproc", 2)} processes x {budget.get("threads", 1)} thread)
Stage 0 (demo only: no pretrained CLIP / LLaMA / SAM-Med2D offline) trains the whole dense model from scratch on all
tasks; stage II = vision-language expert (LoRA r16 on q,k,v,o,gate,up,down + full FT of lm_head, embeddings, norms,
projector; closed + region VQA); stage III = grounding expert (LoRA r8 on gate,up,down + full FT of mask decoder and
[SEG] head; CE 1, Dice 5, BCE 1, focal 1); stage IV = MoE (expert 0 = stage-III MLPs, expert 1 = stage-II MLPs, fresh
router; LoRA r8 on gate,up,down,q,v + full FT of router, lm_head, embeddings, mask decoder, [SEG] head, region adapter;
CE 1, Dice 0.5, BCE 2), then LoRA merged and saved in the release layout. AdamW (0.9, 0.95), linear warm-up 3 % then
linear decay, batch 4 per process, grad clip 1.

Demo-only deviations (flags; the release recipe stays the default): stage 0; multi-round conversations about one image
and task oversampling; stage lengths as step counts, so that the same seed gives the same weights ({plan_text};
tissue step {budget.get("tissue_steps", "?")} steps); SAM-Med2D point / box prompt chains (`--click-prompts`, `training/click_prompts.py`:
after the text decode, error-region clicks with the previous logits as mask prompt, or a jittered box / a point from
the mask first) in the stages that train the mask decoder; empty masks for absent answers (`--absent-masks`,
`training/absent_masks.py`: the state that starts "No ... is visible" is decoded towards an empty mask) and the null
prompt (`--null-prompt`: once per image with a mask, an all-zero prompt is decoded towards an empty mask, so the
decoder has no default structure; this trains for the zero-prompt figure below, and the liver-vs-tumour mask Dice is
the independent check that the prompt's content, not only its presence, decides the mask); a tissue-contrast step of
the CLIP tower between stage 0 and stage II (`training/tissue_contrast.py`: the tower and the region adapter, on the
training slices, with a throw-away cosine head predicting each patch's tissue class, class-balanced, and an anchor to
the stage-0 features; it stands in for the release CLIP's pretraining, without which a region token cannot tell the tumour from the liver),
then a short stage 0 again from that model with region VQA x3 and the tower and region adapter frozen (`stage0b`,
`--freeze`): stage II's LoRA does not learn to read the sharpened CT region tokens (measured: after stage II a CT region
token moved no answer probability at all), and a `stage0b` that trained the tower blurred them again (liver and tumour
region centroids at cosine 0.94 after it, 0.77 before; every tumour region then answered "liver").

| stage | optimizer steps | CPU s (both processes) | wall s | trainable params | loss first -> last |
|---|---|---|---|---|---|
{stage_rows}

Total: {cpu / 60:.1f} CPU minutes over the 2 processes and {wall / 60:.1f} min of wall time (the two processes wait on
each other, so the wall time is well above half the CPU time); dataset + tokenizer:
{result["timings"].get("data_and_tokenizer_s", 0):.0f} s, the evaluation {_eval_minutes(result):.1f} min.
Repeatable: every stage length is a step count and every random choice is seeded, so a second run with the same seed
on one machine ends with the same weights (checked on `stage0b`: run twice from the same model, bit-identical).

## Acceptance figures (held-out slices, `medplib eval`; `monai_medplib.evaluation.acceptance`)
{acceptance["slices"]} held-out slices; greedy decoding, `sigmoid > 0.1` masks, a request answered without `<SEG>`
scores Dice 0; grounding requests rotate through the trained phrasings.

{acceptance_table(acceptance)}

{_details(acceptance)}

## Release protocol (`medplib eval --tasks ...` on the held-out test files; vicuna_v1 prompt, greedy)
{eval_table(result["eval"])}

## What it still cannot do
{limits(acceptance)}
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
