"""SAM-Med2D-style point / box prompt training on top of MedPLIB's text prompt (demo-only, off by default).

The release trains the mask decoder with the ``<SEG>`` text prompt only, so SAM-Med2D's point / box prompts and
its mask input stay untrained and click refinement (``MedPLIBPipeline.refine``) cannot be judged. With
:class:`ClickTraining` every mask of a batch may also get, after its text-prompt decode, one of two prompt chains
built the way SAM-Med2D trains its prompts (simulated interaction):

* text + clicks (what ``refine`` sends): each step adds one click drawn uniformly from the current error region
  (a missed pixel -> positive click, a false-positive pixel -> negative click) and passes the previous step's
  low-resolution logits as the dense mask prompt;
* SAM prompts only: a first step with the mask's bounding box (each side jittered by up to ``box_jitter`` of its
  length) or one point drawn inside the mask, then error clicks with the mask prompt as above.

Each step is scored with the text masks' BCE and Dice and averaged into one ``click`` loss. The text prompt and the
previous logits enter the chains detached: the chains teach the prompt encoder and the mask decoder, not the LLM.
Randomness comes from torch's global generator (seeded and checkpointed by the training loop).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..processing import MASK_THRESHOLD, postprocess_mask_logits
from .losses import mask_bce_loss, mask_dice_loss

__all__ = ["ClickTraining", "click_chain_losses"]

POSITIVE, NEGATIVE = 1, 0


@dataclass(frozen=True)
class ClickTraining:
    """Settings of the prompt chains.

    Attributes:
        text_clicks: probability that a mask gets a text + clicks chain.
        sam_only: probability that a mask gets a box / point chain without text.
        max_steps: clicks per chain are drawn from 1..``max_steps``.
        box_jitter: box sides move by up to this share of the box's width / height.
        weight: weight of the chain loss in the total (its BCE and Dice use the stage's mask weights).
    """

    text_clicks: float = 0.4
    sam_only: float = 0.2
    max_steps: int = 3
    box_jitter: float = 0.1
    weight: float = 1.0


def _rand() -> float:
    return float(torch.rand(()))


def _pick(mask: np.ndarray) -> tuple[int, int] | None:
    """A uniformly drawn ``(row, col)`` of a boolean mask, None when it is empty."""
    where = np.flatnonzero(mask)
    if not where.size:
        return None
    flat = int(where[int(torch.randint(where.size, ()))])
    return divmod(flat, mask.shape[1])


def _error_click(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float, int]:
    """``(x, y, label)`` of a click in the error region (a positive click inside the mask when there is none)."""
    spot = _pick(pred != gt) or _pick(gt) or (gt.shape[0] // 2, gt.shape[1] // 2)
    return float(spot[1]), float(spot[0]), POSITIVE if gt[spot] else NEGATIVE


def _jittered_box(gt: np.ndarray, jitter: float) -> list[float]:
    rows, cols = np.nonzero(gt)
    y0, y1, x0, x1 = float(rows.min()), float(rows.max()), float(cols.min()), float(cols.max())
    dy, dx = (y1 - y0 + 1) * jitter, (x1 - x0 + 1) * jitter
    noise = [(2 * _rand() - 1) for _ in range(4)]
    height, width = gt.shape
    return [
        min(max(x0 + noise[0] * dx, 0.0), width - 1.0),
        min(max(y0 + noise[1] * dy, 0.0), height - 1.0),
        min(max(x1 + noise[2] * dx, 0.0), width - 1.0),
        min(max(y1 + noise[3] * dy, 0.0), height - 1.0),
    ]


def _frame(xy: Sequence[Sequence[float]], size: Sequence[int], device) -> torch.Tensor:
    from ..pipeline.refinement import sam_frame_points  # the one original -> SAM-input coordinate mapping

    return sam_frame_points(np.asarray(xy, dtype=np.float64), size).to(device)


def _score(logits: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return mask_bce_loss(logits, gt), mask_dice_loss(logits, gt)


def _binary(logits: torch.Tensor) -> np.ndarray:
    return (torch.sigmoid(logits.detach().float()) > MASK_THRESHOLD)[0].cpu().numpy()


def click_chain_losses(
    visual_model,
    image_embedding: torch.Tensor,
    prompts: torch.Tensor,
    text_low_res: torch.Tensor,
    gt: torch.Tensor,
    resize: Sequence[int],
    original_size: Sequence[int],
    cfg: ClickTraining,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(sum of BCE, sum of Dice, number of steps)`` of the chains of one image's masks.

    Args:
        visual_model: the SAM-Med2D module (``decode``).
        image_embedding: ``[1, C, h, w]`` of the image.
        prompts: ``[n, 256]`` text prompts of its masks; ``text_low_res`` ``[n, 1, 64, 64]`` their decodes.
        gt: ``[n, H, W]`` ground truth at the original size; ``resize`` / ``original_size`` as in the batch.
    """
    device = image_embedding.device
    zero = image_embedding.new_zeros((), dtype=torch.float32)
    bce_sum, dice_sum, steps = zero, zero, 0
    truth = gt.detach().cpu().numpy() > 0.5

    def decode(text, clicks, labels, box, mask_input):
        points = None
        if clicks:
            points = (_frame(clicks, original_size, device)[None], torch.tensor([labels], device=device))
        boxes = None if box is None else _frame([box[:2], box[2:]], original_size, device).reshape(1, 4)
        low, _ = visual_model.decode(
            image_embedding, text_embeds=text, points=points, boxes=boxes, mask_input=mask_input
        )
        return low, postprocess_mask_logits(low.float(), resize, original_size)[:, 0]

    for m in range(prompts.shape[0]):
        if not truth[m].any():
            continue
        chains = []  # (text prompt, low-res logits, binary prediction, clicks so far, their labels)
        if _rand() < cfg.text_clicks:
            text = prompts[m : m + 1, None].detach()
            start = text_low_res[m : m + 1].detach()
            first = _binary(postprocess_mask_logits(start.float(), resize, original_size)[:, 0])
            chains.append((text, start, first, [], []))
        if _rand() < cfg.sam_only:
            clicks: list[tuple[float, float]] = []
            labels: list[int] = []
            if _rand() < 0.5:
                low, logits = decode(None, [], [], _jittered_box(truth[m], cfg.box_jitter), None)
            else:
                spot = _pick(truth[m])
                clicks, labels = [(float(spot[1]), float(spot[0]))], [POSITIVE]
                low, logits = decode(None, clicks, labels, None, None)
            bce, dice = _score(logits, gt[m : m + 1])
            bce_sum, dice_sum, steps = bce_sum + bce, dice_sum + dice, steps + 1
            chains.append((None, low.detach(), _binary(logits), clicks, labels))
        for text, low, pred, clicks, labels in chains:
            for _step in range(1 + int(torch.randint(cfg.max_steps, ()))):
                x, y, label = _error_click(pred, truth[m])
                clicks = [*clicks, (x, y)]
                labels = [*labels, label]
                low, logits = decode(text, clicks, labels, None, low)
                bce, dice = _score(logits, gt[m : m + 1])
                bce_sum, dice_sum, steps = bce_sum + bce, dice_sum + dice, steps + 1
                low, pred = low.detach(), _binary(logits)
    return bce_sum, dice_sum, steps
