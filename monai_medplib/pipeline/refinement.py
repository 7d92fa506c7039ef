"""Click refinement of a grounded mask through SAM-Med2D's own prompt encoder (beyond the release; opt-in).

MedPLIB decodes a mask from one sparse prompt, the ``<SEG>`` text embedding. SAM-Med2D's prompt encoder also
takes clicks and a low-resolution mask, so a grounding can be corrected interactively at the cost of one
mask-decoder pass on the image embedding already computed (the LLM and the image encoder do not run again):

* sparse prompt = the prior's ``<SEG>`` embedding followed by the click tokens (SAM appends its padding point);
* dense prompt = the prior's low-res logits as ``mask_input`` (SAM's interactive convention), else "no mask".

Clicks are original-image ``(x, y)`` pixels; they are mapped into the 256-px SAM input frame the way the image
was: ResizeLongestSide (per-axis ratio of the resized to the original size, as SAM's ``apply_coords``) and then
the release's *centre* padding (SAM itself pads bottom-right, so it adds no offset).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..processing import SAM_SIZE, centre_offsets, load_pixels, preprocess_shape
from .features import ImageFeatures
from .image import ground_batch
from .options import GroundingOptions
from .results import GroundingResult
from .runner import InputImage, MedPLIBRunner

__all__ = ["refine_grounding", "sam_frame_points", "validate_clicks"]


def validate_clicks(
    points: Sequence[Sequence[float]], labels: Sequence[int], original_size: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Check clicks against the image and return ``(coords float64 [N, 2], labels int64 [N])``.

    Raises:
        ValueError: points not ``(x, y)`` pairs, a point outside the ``H x W`` image (named), labels other than
            0 / 1, or a different number of points and labels.
    """
    height, width = (int(v) for v in original_size[:2])
    try:
        coords = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"points must be a list of (x, y) pixel pairs: {err}") from err
    if coords.size == 0:
        coords = coords.reshape(0, 2)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"points must be (x, y) pixel pairs, shape (N, 2); got shape {coords.shape}")
    raw_labels = np.asarray(labels)
    if raw_labels.ndim != 1 or len(raw_labels) != len(coords):
        raise ValueError(
            f"{len(coords)} points but {raw_labels.size} labels; give one label (1 / 0) per point"
        )
    if raw_labels.size and (raw_labels.dtype.kind not in "biuf" or not np.isin(raw_labels, (0, 1)).all()):
        bad = sorted({str(v) for v in raw_labels.tolist() if v not in (0, 1)})
        raise ValueError(f"click labels must be 1 (positive) or 0 (negative); got {bad}")
    for n, (x, y) in enumerate(coords):
        if not (0 <= x < width and 0 <= y < height):  # NaN fails too
            raise ValueError(f"point #{n} (x={x:g}, y={y:g}) is outside the {height}x{width} image")
    return coords, raw_labels.astype(np.int64)


def sam_frame_points(
    points_xy: np.ndarray | Sequence[Sequence[float]], original_size: Sequence[int]
) -> torch.Tensor:
    """Original-image ``(x, y)`` pixels -> float32 ``[N, 2]`` in the centre-padded 256-px SAM input frame."""
    height, width = (int(v) for v in original_size[:2])
    new_h, new_w = preprocess_shape(height, width, SAM_SIZE)
    pad_top, pad_left = centre_offsets(new_h, new_w, SAM_SIZE)
    coords = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
    mapped = np.stack(
        [coords[:, 0] * (new_w / width) + pad_left, coords[:, 1] * (new_h / height) + pad_top], 1
    )
    return torch.from_numpy(mapped.astype(np.float32))


def refine_grounding(
    runner: MedPLIBRunner,
    image: InputImage,
    points: Sequence[Sequence[float]],
    labels: Sequence[int],
    prior: Any = None,
    text: str | None = None,
    options: GroundingOptions | None = None,
) -> GroundingResult:
    """Refine a grounding of ``image`` with positive (1) / negative (0) clicks; see the module docstring.

    ``prior`` is anything with ``mask``, ``low_res_logits``, ``answer``, ``has_seg`` and optionally
    ``seg_embedding`` (a :class:`GroundingResult`, or a volume's per-slice
    :class:`~monai_medplib.pipeline.results.SliceGrounding`; without a text embedding the clicks and the prior mask are
    the prompts). A prior without ``<SEG>`` contributes
    nothing. Without a prior, ``text`` is grounded first (with ``options``); without both,
    the clicks alone prompt SAM. Returns a :class:`GroundingResult` post-processed and thresholded as
    ``ground`` does, carrying the prior's answer and text embedding and its own low-res logits, so it can be
    the prior of the next refinement (pass all clicks so far each time, as SAM expects).
    """
    if isinstance(image, ImageFeatures):
        original_size = image.original_size
    else:
        image = load_pixels(image)  # once: the size check and the encoder share it
        original_size = image.shape[:2]
    coords, click_labels = validate_clicks(points, labels, original_size)
    if options is not None and (prior is not None or not text):
        raise ValueError("grounding options only apply when text is grounded (no prior given)")
    nothing = "nothing to refine: give clicks, or a prior grounding / text to refine"
    if prior is None and not text and not len(coords):
        raise ValueError(nothing)  # before any encoder runs
    features = runner.encode_images([image], with_sam=True)[0]  # the feature cache spares the encoders
    if prior is None and text:
        prior = ground_batch(runner, [features], [text], options)[0]
    seg_embedding, mask_input = _prior_prompts(prior, original_size)
    if seg_embedding is None and mask_input is None and not len(coords):
        raise ValueError(nothing)  # e.g. the prior / the grounding of text has no <SEG>
    low_res, iou = _decode(runner, features, seg_embedding, coords, click_labels, mask_input)
    logits = runner.postprocess(low_res, features)  # release crop quirk, as ground()
    return GroundingResult.from_logits(
        logits,
        answer=getattr(prior, "answer", "") if prior is not None else "",
        token_ids=list(getattr(prior, "token_ids", None) or []),
        low_res=low_res,
        iou=iou,
        seg_embedding=seg_embedding,
    )


def _prior_prompts(
    prior: Any, original_size: Sequence[int]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(<SEG> embedding [256] | None, low-res logits [1, 64, 64] | None)`` a prior contributes."""
    if prior is None or not getattr(prior, "has_seg", False):
        return None, None
    mask = getattr(prior, "mask", None)
    if mask is not None and tuple(np.shape(mask)) != tuple(original_size):
        raise ValueError(
            f"prior mask has shape {tuple(np.shape(mask))} but the image is {tuple(original_size)}: "
            "the prior belongs to another image"
        )
    return getattr(prior, "seg_embedding", None), getattr(prior, "low_res_logits", None)


@torch.no_grad()
def _decode(
    runner: MedPLIBRunner,
    features: ImageFeatures,
    seg_embedding: torch.Tensor | None,
    coords: np.ndarray,
    labels: np.ndarray,
    mask_input: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SAM-Med2D prompt-encoder + mask-decoder pass -> fp32 ``(low_res [1, 64, 64], iou [1])``."""
    device, dtype = runner.placement("sam")
    text_embeds = None if seg_embedding is None else seg_embedding.to(device, dtype).reshape(1, 1, -1)
    clicks = None
    if len(coords):
        frame = sam_frame_points(coords, features.original_size).to(device)
        clicks = (frame[None], torch.from_numpy(labels).to(device)[None])
    if mask_input is not None:
        mask_input = mask_input.to(device, dtype).reshape(1, 1, *mask_input.shape[-2:])
    low_res, iou = runner.model.model.visual_model.decode(
        features.sam_embedding.to(device)[None], text_embeds=text_embeds, points=clicks, mask_input=mask_input
    )
    return low_res[0].float(), iou[0].float()
