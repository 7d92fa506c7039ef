"""Per-image encoder outputs and the seam for a feature cache.

:class:`ImageFeatures` is what :class:`~monai_medplib.inference.MedPLIBPipeline` computes once per image
(CLIP patch features, SAM-Med2D embedding, geometry). Every pipeline method accepts it in place of an
image, so callers that revisit the same image (volume slices, several questions on one image, the
MONAI Label app) can skip the vision encoders. A :class:`FeatureCache` plugged into the pipeline does
that automatically, keyed by :func:`image_key`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

import numpy as np
import torch


@dataclass
class ImageFeatures:
    """Vision-encoder outputs of one image.

    Attributes:
        clip_feats: raw CLIP patch features ``[576, mm_hidden]`` (before the projector; the region adapter
            reads them too), in the model dtype and device.
        original_size: ``(H, W)`` of the image as given; masks are returned at this size.
        resize: ``(h, w)`` of the SAM ResizeLongestSide(256) image (mask post-processing needs it).
        sam_embedding: SAM-Med2D image embedding ``[256, 16, 16]``, or None when only text was asked for.
    """

    clip_feats: torch.Tensor
    original_size: tuple[int, int]
    resize: tuple[int, int]
    sam_embedding: torch.Tensor | None = None

    @property
    def has_sam(self) -> bool:
        return self.sam_embedding is not None

    def to(self, device: torch.device | str) -> ImageFeatures:
        """A copy on ``device`` (e.g. to keep a cache on the CPU while the model runs on a GPU)."""
        sam = None if self.sam_embedding is None else self.sam_embedding.to(device)
        return replace(self, clip_feats=self.clip_feats.to(device), sam_embedding=sam)


@runtime_checkable
class FeatureCache(Protocol):
    """Where the pipeline looks up and stores :class:`ImageFeatures` (an LRU, a dict, a disk store...)."""

    def get(self, key: str) -> ImageFeatures | None:
        """Features stored under ``key``, or None."""

    def put(self, key: str, features: ImageFeatures) -> None:
        """Store ``features`` under ``key`` (replacing an entry without SAM embedding, for instance)."""


def image_key(rgb: np.ndarray) -> str:
    """Content key of an 8-bit RGB image: equal pixels give equal keys, whatever object they came from."""
    digest = hashlib.sha1(str(rgb.shape).encode())
    digest.update(np.ascontiguousarray(rgb).tobytes())
    return digest.hexdigest()
