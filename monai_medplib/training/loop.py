"""The training loop shared by every stage: DDP, gradient accumulation, bf16 autocast on GPU, checkpoint + resume.

Release optimiser (DeepSpeed config of the scripts): AdamW betas (0.9, 0.95), weight decay 0, WarmupDecayLR
(linear warm-up over ``warmup_ratio`` of the steps, then linear decay to 0), gradient clipping 1.0.
"""

from __future__ import annotations

import json
import math
import pickle
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..user_input import UserInputError
from .absent_masks import AbsentMasks
from .click_prompts import ClickTraining
from .distributed import DistContext, all_reduce_mean, barrier, wrap_ddp
from .forward import compute_losses
from .losses import LossWeights

CHECKPOINT_FILE = "train_state.pt"
STATE_FORMAT = 2  # 2: only tensors and plain values (loadable with weights_only=True); 1 held numpy objects
CLOCKS = {"wall": time.time, "cpu": time.process_time}  # what a stage's time budget counts


@dataclass
class TrainConfig:
    """Loop settings of one stage.

    Attributes:
        max_steps: optimizer steps of the stage.
        batch_size: samples per process and micro-batch.
        grad_accum: micro-batches per optimizer step (global batch = batch_size * grad_accum * world size).
        lr: peak learning rate.
        warmup_ratio: share of ``max_steps`` used for the linear warm-up (release: 1 % of an epoch).
        grad_clip: max gradient norm (release 1.0).
        seed: seed of the data order and the initialisation.
        save_every: optimizer steps between checkpoints (0: only at the end).
        log_every: optimizer steps between log lines.
        bf16: autocast to bfloat16 on CUDA (ignored on CPU).
        time_budget_s: optional wall-clock budget of the stage; the schedule then follows
            ``progress = max(step / max_steps, elapsed / time_budget_s)`` and the stage ends at progress 1, so a
            slower machine trains fewer steps with a complete warm-up / decay instead of overrunning.
        stop_at_step: leave the loop (after saving) at this step without finishing the schedule, as a preempted
            job would; a later call with ``resume`` continues.
        clicks: demo-only SAM-Med2D point / box prompt chains on every mask (None: the release's text prompt
            only); see :mod:`.click_prompts`.
        absent_masks: demo-only empty-mask training of absent-structure answers (see :mod:`.absent_masks`).
        budget_clock: what ``time_budget_s`` measures: ``"wall"`` seconds (default) or ``"cpu"`` seconds of rank
            0's process (``time.process_time``), which a machine shared with other jobs does not shorten: with one
            torch thread per process it equals the wall time the stage takes on a machine of its own.
    """

    max_steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    warmup_ratio: float = 0.03
    grad_clip: float = 1.0
    seed: int = 42
    save_every: int = 0
    log_every: int = 10
    bf16: bool = True
    time_budget_s: float | None = None
    stop_at_step: int | None = None
    clicks: ClickTraining | None = None
    budget_clock: str = "wall"
    absent_masks: AbsentMasks | None = None

    def __post_init__(self) -> None:
        for name, least in (("max_steps", 1), ("batch_size", 1), ("grad_accum", 1), ("log_every", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"TrainConfig.{name} must be a whole number >= {least}, got {value!r}")
        if isinstance(self.save_every, bool) or not isinstance(self.save_every, int) or self.save_every < 0:
            raise ValueError(f"TrainConfig.save_every must be a whole number >= 0, got {self.save_every!r}")
        for name in ("lr", "grad_clip", *(["time_budget_s"] if self.time_budget_s is not None else [])):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"TrainConfig.{name} must be a finite number > 0, got {value!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"TrainConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.budget_clock not in CLOCKS:
            raise ValueError(f"budget_clock must be one of {sorted(CLOCKS)}, got {self.budget_clock!r}")


def warmup_decay(progress: float, warmup_ratio: float) -> float:
    """WarmupDecayLR factor at ``progress`` in [0, 1]: linear rise over ``warmup_ratio``, then linear decay to 0."""
    if progress < warmup_ratio:
        return max(progress / warmup_ratio, 1e-3)
    return max(0.0, (1.0 - progress) / max(1e-8, 1.0 - warmup_ratio))


class BatchOrder:
    """Deterministic per-epoch shuffled batches of this rank (rank-strided), resumable at any step."""

    def __init__(self, num_samples: int, batch_size: int, ctx: DistContext, seed: int) -> None:
        if num_samples < batch_size * ctx.world_size:
            raise ValueError(
                f"dataset has {num_samples} samples, fewer than one batch of {batch_size} x {ctx.world_size} ranks"
            )
        self.n, self.bs, self.ctx, self.seed = num_samples, batch_size, ctx, seed
        self.per_epoch = num_samples // (batch_size * ctx.world_size)

    def batch(self, micro_step: int) -> list[int]:
        epoch, k = divmod(micro_step, self.per_epoch)
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        mine = order[self.ctx.rank :: self.ctx.world_size]
        return mine[k * self.bs : (k + 1) * self.bs]


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _numpy_rng_state() -> dict[str, Any]:
    """numpy's legacy global RNG state as a tensor and plain values (the safe unpickler refuses ndarrays)."""
    algorithm, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "algorithm": str(algorithm),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _set_numpy_rng_state(state: dict[str, Any]) -> None:
    np.random.set_state(
        (
            str(state["algorithm"]),
            state["keys"].numpy().astype(np.uint32),
            int(state["pos"]),
            int(state["has_gauss"]),
            float(state["cached_gaussian"]),
        )
    )


def save_train_state(
    path: Path,
    model: nn.Module,
    optimizer,
    step: int,
    elapsed: float,
    history: list,
    run: dict[str, Any] | None = None,
) -> None:
    """Write model (incl. LoRA adapters), optimizer, step, elapsed seconds, history, RNG states and ``run`` (what
    the data order depends on: samples, batch size, accumulation, seed, world size; see :func:`check_same_run`).

    Everything is a tensor or a plain Python value, so :func:`load_train_state` reads it with
    ``torch.load(weights_only=True)``. Written to a temporary file and renamed: a crash leaves the previous state.
    """
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "format": STATE_FORMAT,
            "model": _trainable_state(model),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "elapsed": elapsed,
            "history": history,
            "run": dict(run or {}),
            "rng": {
                "torch": torch.get_rng_state(),
                "python": random.getstate(),
                "numpy": _numpy_rng_state(),
            },
        },
        tmp,
    )
    tmp.replace(path)


def load_train_state(path: Path) -> dict[str, Any]:
    """Read a :func:`save_train_state` file with the safe unpickler (``weights_only=True``): a file holding
    anything but tensors and plain values (an older version's state, or a crafted pickle) is refused and nothing
    in it runs.

    Raises:
        UserInputError: the file cannot be read safely, is damaged, or is not a training state of this version;
            the message names the file and says to start over with ``--no-resume``.
    """

    def refuse(why: str) -> UserInputError:
        return UserInputError(
            f"{path}: {why}; start over with --no-resume (the bundle's resume: false) or move the file away"
        )

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise refuse(
            "not a training state this version loads (only tensors and plain values are read: this file holds "
            "other objects or is damaged, e.g. an older medplib's state or a file from elsewhere; nothing in it "
            "was run)"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise refuse(f"damaged or not a training state ({first})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format", "none") if isinstance(state, dict) else type(state).__name__
        raise refuse(f"not a training state of this version (format {found}, expected {STATE_FORMAT})")
    missing = sorted({"model", "optimizer", "step", "elapsed", "history", "rng"} - set(state))
    if missing:
        raise refuse(f"training state without {', '.join(missing)}")
    rng = state["rng"]
    numpy_rng = rng.get("numpy") if isinstance(rng, dict) else None
    if not (
        isinstance(rng, dict)
        and isinstance(rng.get("torch"), torch.Tensor)
        and isinstance(rng.get("python"), tuple)
        and isinstance(numpy_rng, dict)
        and isinstance(numpy_rng.get("keys"), torch.Tensor)
        and {"algorithm", "pos", "has_gauss", "cached_gaussian"} <= set(numpy_rng)
    ):
        raise refuse("training state with a damaged random-generator record")
    return state


def check_same_run(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume a state saved by another run: one whose data order differs (another dataset size, batch
    size, seed or number of processes: its step counter would point into another sequence of batches), or one of
    another stage, starting model, length or learning rate (its weights would be passed off as this run's).
    Settings a state does not record (written by an older version) are not compared.

    Raises:
        UserInputError: naming the file and each setting that differs.
    """
    differ = [
        f"{k} {saved[k]} (now {current[k]})" for k in sorted(current) if k in saved and saved[k] != current[k]
    ]
    if differ:
        raise UserInputError(
            f"{path}: saved by a run with other data or settings: {', '.join(differ)}; it is another run's state. "
            "Start over with --no-resume (the bundle's resume: false) or use another output folder"
        )


def train(
    model: nn.Module,
    dataset: Dataset,
    collate: Callable[[Sequence[object]], dict],
    loss_weights: LossWeights,
    seg_token_id: int,
    cfg: TrainConfig,
    ctx: DistContext,
    out_dir: str | Path,
    resume: bool = True,
    log: Callable[[str], None] = print,
    identity: Mapping[str, Any] | None = None,
) -> list[dict[str, float]]:
    """Train the parameters of ``model`` that require grad; returns the log history (one row per log step).

    ``out_dir/train_state.pt`` is written every ``cfg.save_every`` steps and at the end; with ``resume`` an
    existing one is loaded and training continues from its step (same data order, same schedule). ``identity``
    (e.g. the stage and its starting model) is saved with the state, and a state saved under another one is not
    resumed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT_FILE
    torch.manual_seed(cfg.seed)
    model.to(ctx.device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameter: check the stage's LoRA targets and full-FT patterns")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    step, elapsed, history = 0, 0.0, []
    run = {
        "samples": len(dataset),
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "seed": cfg.seed,
        "world_size": ctx.world_size,
        "max_steps": cfg.max_steps,
        "lr": cfg.lr,
        # the schedule and the demo-only objectives: a resumed state must have trained under the same ones
        "warmup_ratio": cfg.warmup_ratio,
        "grad_clip": cfg.grad_clip,
        "time_budget_s": cfg.time_budget_s,
        "budget_clock": cfg.budget_clock,
        "clicks": None if cfg.clicks is None else str(cfg.clicks),
        "absent_masks": cfg.absent_masks is not None,
        **dict(identity or {}),
    }
    if resume and ckpt_path.is_file():
        state = load_train_state(ckpt_path)
        check_same_run(ckpt_path, state.get("run", {}), run)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed, history = int(state["step"]), float(state["elapsed"]), list(state["history"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        _set_numpy_rng_state(state["rng"]["numpy"])
        log(f"resumed from {ckpt_path} at step {step}")
    ddp_model = wrap_ddp(LossModule(model, seg_token_id, loss_weights, cfg.clicks, cfg.absent_masks), ctx)
    order = BatchOrder(len(dataset), cfg.batch_size, ctx, cfg.seed)
    use_autocast = cfg.bf16 and ctx.device.type == "cuda"
    model.train()
    clock = CLOCKS[cfg.budget_clock]
    start, window = clock() - elapsed, []
    progress = _progress(step, elapsed, cfg)
    while progress < 1.0:
        lr = cfg.lr * warmup_decay(progress, cfg.warmup_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        for micro in range(cfg.grad_accum):
            batch = collate([dataset[i] for i in order.batch(step * cfg.grad_accum + micro)])
            sync = micro == cfg.grad_accum - 1 or not ctx.distributed
            context = ddp_model.no_sync() if not sync else _null()
            with context, torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=use_autocast):
                losses = ddp_model(batch)
                (losses["loss"] / cfg.grad_accum).backward()
            window.append({k: float(v.detach()) for k, v in losses.items()})
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        if not torch.isfinite(grad_norm):  # the same on every rank (gradients are all-reduced): all stop here
            raise ValueError(
                f"step {step + 1}: the loss or its gradient is not finite (loss {window[-1]['loss']:.4g}, gradient "
                f"norm {float(grad_norm):.4g}); the weights were not updated and nothing was saved for this step "
                f"(lr {cfg.lr:g}: try a lower --lr)"
            )
        optimizer.step()
        step += 1
        # every rank must stop at the same step: rank 0's clock decides
        elapsed = float(_broadcast(torch.tensor(clock() - start, dtype=torch.float64), ctx))
        progress = _progress(step, elapsed, cfg)
        if step % cfg.log_every == 0 or progress >= 1.0:
            row = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
            row = {k: float(all_reduce_mean(torch.tensor(v), ctx)) for k, v in row.items()}
            row.update(
                step=step,
                lr=lr,
                grad_norm=float(grad_norm),
                time_s=round(elapsed, 1),
            )
            history.append(row)
            window = []
            if ctx.is_main:
                log(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}))
        stop = cfg.stop_at_step is not None and step >= cfg.stop_at_step
        if (cfg.save_every and step % cfg.save_every == 0) or progress >= 1.0 or stop:
            if ctx.is_main:
                save_train_state(ckpt_path, model, optimizer, step, elapsed, history, run)
            barrier(ctx)
        if stop:
            break
    model.eval()
    if ctx.is_main:
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    return history


def _progress(step: int, elapsed: float, cfg: TrainConfig) -> float:
    progress = step / cfg.max_steps
    if cfg.time_budget_s:
        progress = max(progress, elapsed / cfg.time_budget_s)
    return progress


def _broadcast(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.distributed:
        value = value.to(ctx.device)
        torch.distributed.broadcast(value, src=0)
    return value.cpu()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class LossModule(nn.Module):
    """``forward(batch) -> losses`` around a MedPLIB model, so that DDP sees the whole loss computation as one
    forward call (DDP only hooks ``forward``; the loss uses several model methods)."""

    def __init__(
        self,
        model: nn.Module,
        seg_token_id: int,
        weights: LossWeights,
        clicks: ClickTraining | None = None,
        absent: AbsentMasks | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.seg_token_id = seg_token_id
        self.weights = weights
        self.clicks = clicks
        self.absent = absent

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return compute_losses(self.model, batch, self.seg_token_id, self.weights, self.clicks, self.absent)
