"""Simulated click refinement: the clicks a user would make on a grounded mask, and what they change.

Each click goes to the largest error blob of the current mask: a positive click in the largest missed region
(ground truth outside the mask) or a negative click in the largest false-positive region (mask outside the
ground truth), whichever is larger, at its most interior pixel (farthest from the blob's border). Every call of
``MedPLIBPipeline.refine`` gets all clicks so far and the previous result as its prior (SAM's convention).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = ["ClickTrace", "dice", "next_click", "simulate_clicks"]


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    total = int(pred.sum()) + int(gt.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & gt).sum()) / total


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == int(np.argmax(sizes)) + 1


def next_click(pred: np.ndarray, gt: np.ndarray) -> tuple[tuple[float, float], int] | None:
    """``((x, y), label)`` of the next simulated click (1 positive, 0 negative), None when the mask is exact."""
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    missed, extra = _largest_blob(gt & ~pred), _largest_blob(pred & ~gt)
    if not missed.any() and not extra.any():
        return None
    blob, label = (missed, 1) if missed.sum() >= extra.sum() else (extra, 0)
    depth = ndimage.distance_transform_edt(np.pad(blob, 1))[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return (float(col), float(row)), label


@dataclass
class ClickTrace:
    """Dice before the clicks and after each one, and the first click's label (1 positive, 0 negative)."""

    dice: list[float]
    first_label: int | None


def simulate_clicks(pipe: Any, image: Any, gt: np.ndarray, prior: Any, clicks: int) -> ClickTrace:
    """Refine ``prior`` (a grounding of ``image``) with up to ``clicks`` simulated clicks against ``gt``.

    The trace holds ``clicks + 1`` Dice values; once the mask is exact the remaining ones repeat the last value.
    """
    scores = [dice(prior.mask, gt)]
    points: list[Sequence[float]] = []
    labels: list[int] = []
    current = prior
    for _ in range(clicks):
        click = next_click(current.mask, gt)
        if click is None:
            scores.append(scores[-1])
            continue
        points.append(click[0])
        labels.append(click[1])
        current = pipe.refine(image, points, labels, prior=current)
        scores.append(dice(current.mask, gt))
    return ClickTrace(scores, labels[0] if labels else None)
