"""Per-image encoder outputs: what :class:`~monai_medplib.pipeline.runner.MedPLIBRunner` computes once per image.

:class:`ImageFeatures` holds the CLIP patch features, the SAM-Med2D embedding and the geometry of one image.
Every pipeline method accepts it in place of an image, so callers that revisit the same image (volume slices,
several questions on one image, the MONAI Label app) skip the vision encoders. The pipeline's
:class:`~monai_medplib.pipeline.cache.FeatureCache` does that automatically, keyed by image content.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from ..config import MedPLIBConfig
from ..special_tokens import IMAGE_TOKEN_INDEX

__all__ = ["ImageFeatures", "image_cache_bytes", "image_prefix_length"]


@dataclass
class ImageFeatures:
    """Vision-encoder outputs of one image.

    Attributes:
        clip_feats: raw CLIP patch features ``[576, mm_hidden]`` (before the projector; the region adapter
            reads them too), in the model dtype and device; None when only SAM was asked for.
        original_size: ``(H, W)`` of the image as given; masks are returned at this size.
        resize: ``(h, w)`` of the SAM ResizeLongestSide(256) image (mask post-processing needs it).
        sam_embedding: SAM-Med2D image embedding ``[256, 16, 16]``, or None when only text was asked for.
        key: the content key the features are cached under ("" when no cache was used); per-image entries
            derived later (the prompt-prefix KV states of the grounding shortcut) are tied to it.
    """

    clip_feats: torch.Tensor | None
    original_size: tuple[int, int]
    resize: tuple[int, int]
    sam_embedding: torch.Tensor | None = None
    key: str = ""

    @property
    def has_sam(self) -> bool:
        return self.sam_embedding is not None

    @property
    def has_clip(self) -> bool:
        return self.clip_feats is not None

    def to(self, device: torch.device | str) -> ImageFeatures:
        """A copy on ``device`` (e.g. to keep a cache on the CPU while the model runs on a GPU)."""
        sam = None if self.sam_embedding is None else self.sam_embedding.to(device)
        clip = None if self.clip_feats is None else self.clip_feats.to(device)
        return replace(self, clip_feats=clip, sam_embedding=sam)


def image_cache_bytes(config: MedPLIBConfig, dtype: torch.dtype, prefix_tokens: int) -> int:
    """Bytes one image occupies in the pipeline's cache: its :class:`ImageFeatures` plus the prompt-prefix
    keys / values of the grounding shortcut (every layer, ``prefix_tokens`` ids with ``<image>`` expanded).

    For the release 7b-2e that is ~0.65 GB in fp32 (0.33 GB in bf16), almost all of it the prefix states.
    """
    patches = config.num_image_tokens
    grid = config.sam.embedding_grid
    kv_width = config.num_key_value_heads * config.head_dim
    prefix = 2 * config.num_hidden_layers * (prefix_tokens - 1 + patches) * kv_width
    elements = patches * config.mm_hidden_size + config.sam.prompt_embed_dim * grid * grid + prefix
    return elements * (torch.finfo(dtype).bits // 8)


def image_prefix_length(ids: Sequence[int]) -> int:
    """Ids of the prompt prefix shared by every question about an image: up to and including ``<im_end>``."""
    return list(ids).index(IMAGE_TOKEN_INDEX) + 2
