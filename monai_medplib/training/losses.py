"""Training losses of the MedPLIB release (``model/MedPLIB.py``, ``medplib_moe_llama.py``, DeepSpeed top-1 gate).

Total loss, as released::

    ce    = token_ce(logits, labels) + router_aux_coef * sum_layers(gshard_aux)
    loss  = w_ce * ce + w_bce * BCE + w_dice * Dice + w_iou * IoU + w_focal * Focal

with each mask term computed per predicted mask at the original image size (logits after the release crop, see
``processing.postprocess_mask_logits``) and averaged over the masks of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from monai_medplib.tokenization import IGNORE_INDEX

__all__ = [
    "LossWeights",
    "focal_loss",
    "gshard_aux_loss",
    "iou_mse_loss",
    "mask_bce_loss",
    "mask_dice_loss",
    "mask_losses",
    "medplib_loss",
    "sigmoid_bce_loss",
    "soft_dice_loss",
    "token_ce_loss",
]


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms. The defaults are the released stage-IV (MoE) recipe."""

    ce: float = 1.0
    dice: float = 0.5
    bce: float = 2.0
    iou: float = 0.0
    focal: float = 0.0

    @classmethod
    def release(cls) -> LossWeights:
        """Stage IV (``scripts/train_stage4.sh``): CE 1.0, Dice 0.5, BCE 2.0, IoU 0, focal 0."""
        return cls()

    @classmethod
    def grounding_stage(cls) -> LossWeights:
        """Stage III, grounding expert (``scripts/train_stage3.sh``): CE 1.0, Dice 5.0, BCE 1.0, IoU 0, focal 1.0."""
        return cls(ce=1.0, dice=5.0, bce=1.0, iou=0.0, focal=1.0)


def token_ce_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Next-token cross-entropy, mean over every supervised token of the batch.

    Args:
        logits: ``[B, L, V]`` (computed in float32, as the release casts logits to float).
        labels: ``[B, L]`` aligned with the logits; ``ignore_index`` where nothing is supervised.

    Returns:
        Scalar loss. Samples without a supervised token are dropped first (release); when no sample has one the
        result is a graph-connected 0 instead of the release's NaN.
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits [B, L, V] and labels [B, L] expected, got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(logits.device)
    keep = (shift_labels != ignore_index).any(dim=1)
    if not bool(keep.any()):
        return logits.float().sum() * 0.0
    return F.cross_entropy(
        shift_logits[keep].reshape(-1, shift_logits.shape[-1]),
        shift_labels[keep].reshape(-1),
        ignore_index=ignore_index,
    )


def gshard_aux_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """GShard / DeepSpeed top-1 load-balancing loss ``E * sum_e mean_gate_e * mean_assignment_e`` for one layer.

    Args:
        router_logits: ``[T, E]`` router logits of the tokens of one MoE layer.
    """
    if router_logits.ndim != 2:
        raise ValueError(f"router logits [tokens, experts] expected, got {tuple(router_logits.shape)}")
    num_experts = router_logits.shape[-1]
    gates = torch.softmax(router_logits.float(), dim=-1)
    assignment = F.one_hot(gates.argmax(dim=-1), num_experts).float()
    return (gates.mean(dim=0) * assignment.mean(dim=0)).sum() * num_experts


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(
            f"mask logits shape {tuple(pred.shape)} does not match ground-truth shape {tuple(target.shape)}"
        )


def sigmoid_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits averaged over the pixels of each mask, then over masks. Shapes ``[N, H, W]``."""
    _check_pair(logits, target)
    per_pixel = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
    return per_pixel.flatten(1).mean(1).mean()


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``1 - (2 I + eps) / (U + eps)`` on sigmoid probabilities, per mask, mean over masks. Shapes ``[N, H, W]``.

    MedPLIB's own formula: no LISA ``/1000`` scaling and no ``num_masks`` normalisation inside.
    """
    _check_pair(logits, target)
    probs = torch.sigmoid(logits).flatten(1)
    target = target.to(probs.dtype).flatten(1)
    intersection = (probs * target).sum(-1)
    union = probs.sum(-1) + target.sum(-1)
    return (1 - (2 * intersection + eps) / (union + eps)).mean()


def focal_loss(
    logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Sigmoid focal loss summed over all pixels of the given masks, divided by their pixel count."""
    _check_pair(logits, target)
    probs = torch.sigmoid(logits)
    target = target.to(probs.dtype)
    positive = -alpha * target * (1 - probs) ** gamma * torch.log(probs + 1e-12)
    negative = -(1 - alpha) * (1 - target) * probs**gamma * torch.log(1 - probs + 1e-12)
    return (positive.sum() + negative.sum()) / (target.numel() + 1e-12)


def iou_mse_loss(logits: torch.Tensor, target: torch.Tensor, pred_iou: torch.Tensor) -> torch.Tensor:
    """Squared error between the predicted IoU and the soft IoU of all given masks taken together (release)."""
    _check_pair(logits, target)
    probs = torch.sigmoid(logits)
    target = target.to(probs.dtype)
    intersection = (probs * target).sum()
    union = probs.sum() + target.sum() - intersection
    soft_iou = (intersection + 1e-7) / (union + 1e-7)
    return ((soft_iou - pred_iou) ** 2).mean()


# Names used by training/forward.py: the per-mask-stack BCE and Dice terms.
mask_bce_loss = sigmoid_bce_loss
mask_dice_loss = soft_dice_loss


def mask_losses(
    pred_masks: Sequence[torch.Tensor],
    gt_masks: Sequence[torch.Tensor],
    pred_ious: Sequence[torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Unweighted mask terms averaged over masks of possibly different sizes.

    Args:
        pred_masks: per mask, logits at the original image size ``[H, W]`` or ``[1, H, W]``.
        gt_masks: per mask, the 0/1 ground truth of the same size.
        pred_ious: per mask, the mask decoder's IoU prediction (``[1]``); IoU loss is 0 without it.

    Returns:
        ``{"bce", "dice", "iou", "focal"}`` scalars.
    """
    if len(pred_masks) != len(gt_masks):
        raise ValueError(f"{len(pred_masks)} predicted masks but {len(gt_masks)} ground-truth masks")
    if pred_ious is not None and len(pred_ious) != len(pred_masks):
        raise ValueError(f"{len(pred_ious)} IoU predictions for {len(pred_masks)} masks")
    if not pred_masks:
        raise ValueError("mask_losses needs at least one mask")
    totals = {"bce": 0.0, "dice": 0.0, "iou": 0.0, "focal": 0.0}
    for index, (pred, gt) in enumerate(zip(pred_masks, gt_masks)):
        pred = pred if pred.ndim == 3 else pred.unsqueeze(0)
        gt = (gt if gt.ndim == 3 else gt.unsqueeze(0)).to(pred.device, pred.dtype)
        totals["bce"] = totals["bce"] + sigmoid_bce_loss(pred, gt)
        totals["dice"] = totals["dice"] + soft_dice_loss(pred, gt)
        totals["focal"] = totals["focal"] + focal_loss(pred, gt)
        if pred_ious is not None:
            totals["iou"] = totals["iou"] + iou_mse_loss(pred, gt, pred_ious[index].to(pred.device))
    # release quirk: the sum over masks is divided by (num_masks + 1e-8).
    count = len(pred_masks) + 1e-8
    reference = pred_masks[0]
    return {
        key: (value / count if isinstance(value, torch.Tensor) else reference.new_zeros(()))
        for key, value in totals.items()
    }


def medplib_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    pred_masks: Sequence[torch.Tensor] | None = None,
    gt_masks: Sequence[torch.Tensor] | None = None,
    pred_ious: Sequence[torch.Tensor] | None = None,
    router_logits: Sequence[torch.Tensor] | None = None,
    weights: LossWeights | None = None,
    router_aux_coef: float = 0.0,
) -> dict[str, torch.Tensor]:
    """The release's total loss and its parts, under the release's key names.

    Args:
        logits: LLM logits ``[B, L, V]`` over the expanded sequence (image tokens included).
        labels: ``[B, L]`` expanded the same way, IGNORE_INDEX outside the answers.
        pred_masks / gt_masks / pred_ious: see ``mask_losses``; None or empty for a batch without ``<SEG>``.
        router_logits: per MoE layer ``[T, E]`` (only used when ``router_aux_coef`` is non-zero).
        weights: loss weights; the released stage-IV recipe when None.
        router_aux_coef: coefficient of the GShard aux loss added to CE (release: 0.0).

    Returns:
        ``loss``, ``ce_loss`` (weighted), ``mask_bce_loss``, ``mask_dice_loss``, ``mask_iou_loss``,
        ``mask_focal_loss``, ``mask_loss`` (weighted) and ``unscale_mask_*`` (unweighted).
    """
    weights = weights or LossWeights()
    ce = token_ce_loss(logits, labels)
    if router_aux_coef and router_logits:
        ce = ce + router_aux_coef * sum(gshard_aux_loss(layer) for layer in router_logits)
    ce_loss = weights.ce * ce
    zero = torch.zeros_like(ce_loss)
    if not pred_masks:
        parts = {"bce": zero, "dice": zero, "iou": zero, "focal": zero}
    else:
        if gt_masks is None:
            raise ValueError("pred_masks given without gt_masks")
        parts = mask_losses(pred_masks, gt_masks, pred_ious)
    scaled = {
        "bce": weights.bce * parts["bce"],
        "dice": weights.dice * parts["dice"],
        "iou": weights.iou * parts["iou"],
        "focal": weights.focal * parts["focal"],
    }
    mask_loss = scaled["bce"] + scaled["dice"] + scaled["iou"] + scaled["focal"]
    return {
        "loss": ce_loss + mask_loss,
        "ce_loss": ce_loss,
        "mask_bce_loss": scaled["bce"],
        "mask_dice_loss": scaled["dice"],
        "mask_iou_loss": scaled["iou"],
        "mask_focal_loss": scaled["focal"],
        "mask_loss": mask_loss,
        "unscale_mask_bce_loss": parts["bce"],
        "unscale_mask_dice_loss": parts["dice"],
        "unscale_mask_iou_loss": parts["iou"],
        "unscale_mask_focal_loss": parts["focal"],
        "unscale_mask_loss": parts["bce"] + parts["dice"] + parts["iou"] + parts["focal"],
    }
