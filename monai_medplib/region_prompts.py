"""Region prompts of the 2D API: a mask, clicked points or a box -> one binary mask at image resolution.

The conversions are those of the release demo (processing.py holds them): a click becomes a 41x41 px square
around the median clicked pixel, a box becomes a filled rectangle. This module only chooses between them and
checks the user's input.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .processing import box_region_mask, point_region_mask

MaskLike = str | Path | Image.Image | np.ndarray | torch.Tensor


def load_region_mask(mask: MaskLike) -> np.ndarray:
    """A region mask as uint8 0/1 ``[H, W]``: any non-zero pixel (in any channel) belongs to the region."""
    if isinstance(mask, str | Path):
        path = Path(mask)
        if not path.is_file():
            raise FileNotFoundError(f"region mask file not found: {path}")
        with Image.open(path) as pil:
            mask = np.asarray(pil)
    elif isinstance(mask, Image.Image):
        mask = np.asarray(mask)
    elif isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    if not isinstance(mask, np.ndarray):
        raise TypeError(
            f"unsupported region mask type {type(mask).__name__}: give a path, PIL image or array"
        )
    if mask.ndim == 3:  # colour PNG: release reads it with cv2 and keeps every non-zero pixel
        mask = mask.any(axis=2)
    if mask.ndim != 2:
        raise ValueError(f"region mask must be (H, W), got shape {tuple(mask.shape)}")
    return (mask != 0).astype(np.uint8)


def region_mask_from_prompt(
    image_size: Sequence[int],
    mask: MaskLike | None = None,
    points: Sequence[Sequence[float]] | None = None,
    box: Sequence[float] | None = None,
) -> np.ndarray:
    """Exactly one of ``mask``, ``points`` ((x, y) pixels) or ``box`` ((x0, y0, x1, y1)) -> uint8 ``[H, W]``.

    Raises:
        ValueError: none or several prompts, a mask of another size than the image, an empty region, or
            points / a box outside the image.
    """
    given = [name for name, value in (("mask", mask), ("points", points), ("box", box)) if value is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one region prompt (mask=, points= or box=), got {given or 'none'}")
    height, width = int(image_size[0]), int(image_size[1])
    if mask is not None:
        region = load_region_mask(mask)
        if region.shape != (height, width):
            raise ValueError(
                f"region mask has shape {region.shape} but the image is {height}x{width}; "
                "draw the region at the image's resolution"
            )
    elif points is not None:
        region = point_region_mask((height, width), points)
    else:
        region = box_region_mask((height, width), box)
    if not region.any():
        raise ValueError("region is empty: the mask has no non-zero pixel")
    return region
