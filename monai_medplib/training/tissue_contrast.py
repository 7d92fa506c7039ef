"""Demo-only: sharpen the CLIP tower's tissue contrast between stage 0 and stage II (not in the release recipe).

Why: a region token is the mean of the adapted CLIP patch features inside the region (``pool_region_features``),
and the LLM's first step on it is an RMSNorm. The release CLIP comes pretrained on millions of images; the demo CLIP
only learns in stage 0, where nothing asks it to tell tissues apart. Measured without this step (stage-II
model), RMS-normalised region tokens of held-out liver and tumour regions are 0.66 apart (class spread 0.2-0.3;
grey / white matter 15 apart), and the LLM answers "liver" for every CT region with the same probabilities whatever
the region.

What: the tower and the region adapter are trained on the demo training slices to predict each patch's tissue class
(class-balanced cross-entropy; the class of a patch is the label at its centre) with a throw-away cosine classifier
on the adapter's output: the LLM's first step on a token is an RMSNorm, so tissues must differ in direction, not in
length or by a small offset. An anchor keeps the tower's features close to the stage-0 ones (mean squared
difference relative to their mean square), so the image tokens the stage-0 LLM learned to read barely move.
Held-out slices are never read.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..checkpoint import load_medplib, save_medplib
from ..processing import CLIP_PATCH, CLIP_SIZE, clip_pixels_batch

__all__ = ["TISSUE_CLASSES", "TissueContrastConfig", "patch_tissue_labels", "train_tissue_contrast"]

# background, liver, tumour (CT labels 0 / 1 / 2); grey, white matter (MR labels 1 / 2 -> 3 / 4)
TISSUE_CLASSES = ("background", "liver", "tumour", "grey matter", "white matter")
_MR_OFFSET = 2


@dataclass(frozen=True)
class TissueContrastConfig:
    """Settings of :func:`train_tissue_contrast`.

    Attributes:
        steps: optimizer steps (a step count, not a time budget: the same seed gives the same tower).
        batch_size: slices per step.
        lr: AdamW learning rate of the tower and the head.
        anchor_weight: weight of the relative feature anchor against the tissue cross-entropy.
        cosine_scale: logit scale of the cosine classifier (the logits are ``scale * cos``).
        max_class_weight: cap of the inverse-frequency class weights (the tumour is a few percent of patches).
        seed: sampling and head initialisation seed.
    """

    steps: int = 380
    batch_size: int = 16
    lr: float = 3e-4
    anchor_weight: float = 1.0
    cosine_scale: float = 10.0
    max_class_weight: float = 50.0
    seed: int = 42

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TissueContrastConfig.{name} must be >= 1, got {getattr(self, name)}")


def patch_tissue_labels(label: np.ndarray, modality: str) -> torch.Tensor:
    """Tissue class (index into :data:`TISSUE_CLASSES`) of each of the 24x24 CLIP patches of a square slice.

    Args:
        label: ``[H, W]`` label slice of a square demo slice (CT: 0 / 1 / 2, MR: 0 / 1 / 2).
        modality: "CT" or "MR".
    """
    if label.ndim != 2 or label.shape[0] != label.shape[1]:
        raise ValueError(f"tissue labels need a square 2-D label slice, got shape {label.shape}")
    lab = label.astype(np.int64)
    classes = np.where(lab == 0, 0, lab + (_MR_OFFSET if modality == "MR" else 0)).astype(np.uint8)
    resized = np.asarray(Image.fromarray(classes).resize((CLIP_SIZE, CLIP_SIZE), Image.NEAREST))
    centres = resized[CLIP_PATCH // 2 :: CLIP_PATCH, CLIP_PATCH // 2 :: CLIP_PATCH]
    return torch.from_numpy(centres.astype(np.int64).reshape(-1))


def train_tissue_contrast(
    init: str | Path,
    out_dir: str | Path,
    slices: Sequence,
    cfg: TissueContrastConfig = TissueContrastConfig(),
    log: Callable[[str], None] = print,
) -> dict[str, object]:
    """Train the CLIP tower of the model in ``init`` as described in the module docstring; save it to ``out_dir``.

    Args:
        init: merged stage-0 model folder.
        out_dir: where the whole model (new tower, everything else unchanged) is saved in the release layout.
        slices: training :class:`~monai_medplib.data.demo_slices.DemoSlice` objects (square slices).
        cfg: settings.
        log: progress sink.

    Returns:
        A summary: steps, CPU seconds, first / last losses.
    """
    if not slices:
        raise ValueError("tissue contrast training needs at least one training slice")
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model, config, _ = load_medplib(init, dtype=torch.float32)
    tower = model.model.vision_tower
    pixels = clip_pixels_batch([s.image for s in slices])
    targets = torch.stack([patch_tissue_labels(s.label, s.modality) for s in slices])
    with torch.no_grad():
        anchor = torch.cat([tower(pixels[i : i + 32]) for i in range(0, len(pixels), 32)])
    freq = torch.bincount(targets.flatten(), minlength=len(TISSUE_CLASSES)).float().clamp(min=1)
    weights = (freq.sum() / (len(TISSUE_CLASSES) * freq)).clamp(max=cfg.max_class_weight)
    adapter = model.model.region_fea_adapter
    head = torch.nn.Parameter(torch.randn(len(TISSUE_CLASSES), adapter.out_features) * 0.02)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [*tower.parameters(), *adapter.parameters(), head]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    start, step, history, losses = time.process_time(), 0, [], []
    while step < cfg.steps:
        idx = torch.tensor(rng.sample(range(len(slices)), min(cfg.batch_size, len(slices))))
        feats = tower(pixels[idx])
        logits = cfg.cosine_scale * F.normalize(adapter(feats), dim=-1) @ F.normalize(head, dim=-1).T
        ce = F.cross_entropy(logits.flatten(0, 1), targets[idx].flatten(), weight=weights)
        old = anchor[idx]
        drift = (feats - old).pow(2).mean() / old.pow(2).mean()
        loss = ce + cfg.anchor_weight * drift
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        losses.append(loss.item())
        if step % 50 == 0 or step == 1:
            history.append({"step": step, "ce": round(ce.item(), 4), "drift": round(drift.item(), 5)})
            log(f"tissue contrast step {step}: ce {ce.item():.3f} drift {drift.item():.4f}")
    for p in model.parameters():
        p.requires_grad_(False)
    save_medplib(model, config, init, out_dir)
    return {
        "steps": step,
        "cpu_seconds": round(time.process_time() - start, 1),
        "trainable_parameters": sum(p.numel() for p in params),
        "first_loss": float(np.mean(losses[:20])),
        "last_loss": float(np.mean(losses[-20:])),
        "history": history,
    }
