"""Run one training stage end to end: build / load the model, set LoRA and trainable modules, train, merge, save.

Every stage writes its merged model in the release layout to ``<out_dir>/hf`` (``checkpoint.save_medplib``), which
is what the next stage loads (release: "zero -> fp32, load into the PEFT model, merge_and_unload, save hf").
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from ..checkpoint import load_medplib, save_medplib
from ..config import MedPLIBConfig
from ..data.mecovqa import MeCoVQADataset, collate_mecovqa, read_mecovqa
from ..modeling.medplib import MedPLIBForCausalLM
from ..tokenization import MedPLIBTokenizer
from .absent_masks import for_tokenizer as absent_masks_for
from .distributed import DistContext, barrier
from .loop import TrainConfig, train
from .lora import add_lora, count_parameters, merge_lora, set_trainable
from .moe_assembly import assemble_moe
from .stages import StageSpec, get_stage

# Release training file per task (spec 4.4), relative to the data root.
TASK_FILES = {
    "closed": "train/MeCoVQA-Complex.json",
    "region": "train/MeCoVQA-Region.json",
    "grounding": "train/MeCoVQA-Grounding.json",
}
MERGED_SUBDIR = "hf"


@dataclass
class StageRun:
    """Inputs of one stage run.

    Attributes:
        stage: stage name ("stage0", "stage2", "stage3", "stage4").
        data_root: MeCoVQA root (images/, masks/, train/*.json).
        out_dir: stage folder (train_state.pt, the merged model in ``hf/``).
        tokenizer_dir: tokenizer files (stage 0; later stages take the tokenizer of ``init``).
        config: model config for stage 0 (from scratch, dense).
        init: merged model folder to start from (stages 2 and 3; stage 4: the stage-II model).
        grounding_init: stage-4 only: the merged stage-III model (expert 0, mask decoder, [SEG] head).
        train: loop settings.
        task_repeat: how many times each task's samples appear per epoch (oversampling).
        max_length: token truncation of the collator (release: 2048 in II, 1024 in IV).
        resume: continue from ``out_dir/train_state.pt`` when it exists.
        absent_masks: demo-only: decode absent-structure answers towards empty masks (:mod:`.absent_masks`).
        null_prompt: demo-only, with ``absent_masks``: also decode an all-zero prompt towards an empty mask.
        freeze: regexes of parameter names kept frozen although the stage trains them (empty: the stage's own set).
    """

    stage: str
    data_root: str | Path
    out_dir: str | Path
    train: TrainConfig
    tokenizer_dir: str | Path | None = None
    config: MedPLIBConfig | None = None
    init: str | Path | None = None
    grounding_init: str | Path | None = None
    task_repeat: Mapping[str, int] = field(default_factory=dict)
    max_length: int | None = 2048
    resume: bool = True
    absent_masks: bool = False
    null_prompt: bool = False
    freeze: tuple[str, ...] = ()


def stage_dataset(
    spec: StageSpec, data_root: str | Path, tokenizer: MedPLIBTokenizer, task_repeat: Mapping[str, int]
) -> Dataset:
    """The stage's training samples: the release file of each of its tasks, repeated ``task_repeat[task]`` times."""
    parts: list[Dataset] = []
    for task in spec.tasks:
        path = Path(data_root) / TASK_FILES[task]
        records = read_mecovqa(path, data_root)
        if not records:  # the stage would train without one of its tasks, and say nothing
            raise ValueError(
                f"{path}: no training entries; {spec.name} trains its {task} task from this file"
            )
        for record in records:  # such an entry would be dropped from the loss with a tokenizer warning
            if any(turn.answer is None for turn in record.turns):
                raise ValueError(f"{path}: entry {record.id!r} has a question without an answer")
        parts += [MeCoVQADataset(records, tokenizer)] * int(task_repeat.get(task, 1))
    return ConcatDataset(parts)


def _prepare_model(run: StageRun, spec: StageSpec) -> tuple[MedPLIBForCausalLM, MedPLIBConfig, Path]:
    """Initial (dense or MoE) model of the stage and the folder its tokenizer comes from."""
    if spec.name == "stage0" and run.init is not None:  # demo: stage 0 continued from a saved dense model
        model, config, _ = load_medplib(run.init)
        if config.moe_enable:
            raise ValueError(f"stage0 trains the dense model: {run.init} is a MoE model")
        return model, config, Path(run.init)
    if spec.name == "stage0":
        if run.config is None or run.tokenizer_dir is None:
            raise ValueError("stage0 trains from scratch: give a config and a tokenizer_dir")
        if run.config.moe_enable:
            raise ValueError("stage0 trains the dense model: the config must have moe_enable=False")
        return MedPLIBForCausalLM(run.config), run.config, Path(run.tokenizer_dir)
    if run.init is None:
        raise ValueError(f"{spec.name} needs init (the merged model of the previous stage)")
    model, config, _ = load_medplib(run.init)
    if spec.moe:
        if run.grounding_init is None:
            raise ValueError("stage4 needs grounding_init (the merged stage-III model)")
        grounding, _, _ = load_medplib(run.grounding_init)
        model = assemble_moe(model, grounding, seed=run.train.seed)
        config = model.config
    return model, config, Path(run.init)


def _where(folder: str | Path | None) -> str:
    """A starting model's folder as the training state records it ("" for none)."""
    return "" if folder is None else str(Path(folder).resolve())


def check_out_spares_init(run: StageRun) -> None:
    """The stage's folder is not a starting model's folder, nor does its ``hf/`` hold one: the merged model would be
    written over the model it is trained from (a stage re-run from its own output)."""
    out = Path(run.out_dir).resolve()
    for name, folder in (("init", run.init), ("grounding_init", run.grounding_init)):
        if folder is None:
            continue
        start = Path(folder).resolve()
        if out == start or start in (out / MERGED_SUBDIR).parents or start == out / MERGED_SUBDIR:
            raise ValueError(
                f"out_dir {run.out_dir} would write its model over the {name} model {folder}; give another out_dir"
            )


def run_stage(run: StageRun, ctx: DistContext, log: Callable[[str], None] = print) -> dict[str, object]:
    """Train one stage and save its merged model to ``out_dir/hf``; returns a summary (losses, time, sizes)."""
    spec = get_stage(run.stage)
    check_out_spares_init(run)
    torch.manual_seed(run.train.seed)
    model, config, tokenizer_dir = _prepare_model(run, spec)
    tokenizer = MedPLIBTokenizer.from_pretrained(tokenizer_dir)
    if len(tokenizer) != config.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the model vocab_size is {config.vocab_size}"
        )
    wrapped = (
        add_lora(model, spec.lora_targets, spec.lora_r, spec.lora_alpha, spec.lora_dropout)
        if spec.lora_targets
        else None
    )
    trainable = set_trainable(model, spec.full_ft, run.freeze)
    n_train, n_total = count_parameters(model)
    log(f"{spec.name}: {n_train:,} of {n_total:,} parameters trainable ({len(trainable)} tensors)")
    dataset = stage_dataset(spec, run.data_root, tokenizer, run.task_repeat)
    cfg = run.train
    if run.absent_masks and spec.loss.bce:
        cfg = dataclasses.replace(cfg, absent_masks=absent_masks_for(tokenizer, null_prompt=run.null_prompt))
    start = time.time()
    history = train(
        model,
        dataset,
        lambda items: collate_mecovqa(items, tokenizer.pad_id, run.max_length),
        spec.loss,
        tokenizer.seg_id,
        cfg,
        ctx,
        run.out_dir,
        resume=run.resume,
        log=log,
        identity={
            "stage": spec.name,
            "init": _where(run.init),
            "grounding_init": _where(run.grounding_init),
            "max_length": run.max_length,
            "task_repeat": dict(sorted(run.task_repeat.items())),
            "freeze": list(run.freeze),
            "null_prompt": run.null_prompt,
        },
    )
    seconds = time.time() - start
    merged: nn.Module = merge_lora(wrapped) if wrapped is not None else model
    merged.eval()
    out = Path(run.out_dir) / MERGED_SUBDIR
    if ctx.is_main:
        save_medplib(merged.cpu(), config, tokenizer_dir, out)
    barrier(ctx)
    summary = {
        "stage": spec.name,
        "samples": len(dataset),
        "steps": history[-1]["step"] if history else 0,
        "max_steps": cfg.max_steps,
        "train_seconds": round(seconds, 1),
        "trainable_parameters": n_train,
        "total_parameters": n_total,
        "first_loss": history[0]["loss"] if history else None,
        "last_loss": history[-1]["loss"] if history else None,
        "merged_dir": str(out),
    }
    if ctx.is_main:
        (Path(run.out_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def parse_repeat(items: Sequence[str]) -> dict[str, int]:
    """``["grounding=2", "region=1"]`` -> ``{"grounding": 2, "region": 1}``."""
    out = {}
    for item in items:
        task, _, count = item.partition("=")
        if task not in TASK_FILES or not count.isdigit() or int(count) < 1:
            raise ValueError(
                f"bad --repeat {item!r}: expected TASK=N with N >= 1 and TASK in {sorted(TASK_FILES)}"
            )
        out[task] = int(count)
    return out
