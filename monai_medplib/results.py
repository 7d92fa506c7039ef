"""Results of the 2D API and writing them as images (mask PNG, overlay PNG)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .processing import MASK_THRESHOLD

OVERLAY_COLOUR = (255, 0, 0)
OVERLAY_ALPHA = 0.45


@dataclass
class GroundingResult:
    """Outcome of :meth:`MedPLIBPipeline.ground` for one image.

    Attributes:
        mask: bool ``[H, W]`` at the original image size, ``sigmoid(logits) > 0.1`` (release threshold).
        probs: float32 ``[H, W]``, sigmoid of the post-processed logits (zeros when no ``<SEG>``).
        logits: float32 ``[H, W]`` post-processed mask logits, None when no ``<SEG>`` was generated.
        answer: generated text (MedPLIB tokens such as ``<SEG>`` kept, as the release decodes).
        has_seg: whether a ``<SEG>`` was generated (or forced); without it the mask is empty (release).
        token_ids: generated ids (EOS included when produced).
        low_res_logits: SAM logits ``[1, 64, 64]`` before post-processing (a prior for click refinement).
        iou_prediction: SAM's predicted IoU of the mask.
        seg_embedding: the ``<SEG>`` text prompt ``[256]`` (fp32) SAM decoded; click refinement reuses it.
        all_masks / all_probs: with ``all_seg=True``, one entry per ``<SEG>`` in answer order.
    """

    mask: np.ndarray
    probs: np.ndarray
    logits: np.ndarray | None
    answer: str
    has_seg: bool
    token_ids: list[int] = field(default_factory=list)
    low_res_logits: torch.Tensor | None = None
    iou_prediction: float | None = None
    seg_embedding: torch.Tensor | None = None
    all_masks: list[np.ndarray] = field(default_factory=list)
    all_probs: list[np.ndarray] = field(default_factory=list)

    @classmethod
    def empty(cls, size: tuple[int, int], answer: str, token_ids: list[int]) -> GroundingResult:
        """Release behaviour without ``<SEG>``: no mask."""
        return cls(
            mask=np.zeros(size, dtype=bool),
            probs=np.zeros(size, dtype=np.float32),
            logits=None,
            answer=answer,
            has_seg=False,
            token_ids=token_ids,
        )

    @classmethod
    def from_logits(
        cls,
        logits: torch.Tensor,
        answer: str,
        token_ids: list[int],
        low_res: torch.Tensor | None = None,
        iou: torch.Tensor | None = None,
        seg_embedding: torch.Tensor | None = None,
    ) -> GroundingResult:
        """Build from post-processed logits ``[H, W]`` of the (first) ``<SEG>``."""
        logits = logits.detach().float().cpu()
        probs = torch.sigmoid(logits)
        return cls(
            mask=(probs > MASK_THRESHOLD).numpy(),
            probs=probs.numpy(),
            logits=logits.numpy(),
            answer=answer,
            has_seg=True,
            token_ids=token_ids,
            low_res_logits=None if low_res is None else low_res.detach().float().cpu(),
            iou_prediction=None if iou is None else float(iou.reshape(-1)[0]),
            seg_embedding=None if seg_embedding is None else seg_embedding.detach().float().cpu().reshape(-1),
        )

    @property
    def foreground_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def label_from_probs(probs: torch.Tensor) -> torch.Tensor:
    """One label map from several texts' probabilities ``(T, ...)``: the 1-based index of the most probable
    text where that probability passes the release threshold, 0 elsewhere (uint8)."""
    best, which = probs.max(dim=0)
    return torch.where(best > MASK_THRESHOLD, which + 1, 0).to(torch.uint8)


def save_mask_png(mask: np.ndarray, path: str | Path) -> Path:
    """Write a boolean mask as an 8-bit PNG (0 background, 255 foreground)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255).save(path)
    return path


def overlay_image(
    rgb: np.ndarray,
    mask: np.ndarray,
    colour: tuple[int, int, int] = OVERLAY_COLOUR,
    alpha: float = OVERLAY_ALPHA,
) -> np.ndarray:
    """``rgb`` uint8 ``[H, W, 3]`` with ``mask`` blended in ``colour``."""
    if rgb.shape[:2] != mask.shape:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {rgb.shape[:2]}")
    out = rgb.astype(np.float32)
    tint = np.asarray(colour, dtype=np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * tint
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def save_overlay_png(rgb: np.ndarray, mask: np.ndarray, path: str | Path) -> Path:
    """Write the image with the mask blended in red."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay_image(rgb, np.asarray(mask, dtype=bool))).save(path)
    return path
