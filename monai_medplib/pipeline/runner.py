"""The pipeline's engine room: a loaded model, its tokenizer, its caches and the batched primitives every call is
built from.

:class:`MedPLIBRunner` owns the model, the tokenizer and both caches (image features + prompt prefixes, and
prepared volumes), creates them in ``__init__`` and is the only writer of them. Its primitives are what the calls
in :mod:`~monai_medplib.pipeline.image`, :mod:`~monai_medplib.pipeline.grounding`,
:mod:`~monai_medplib.pipeline.refinement` and :mod:`~monai_medplib.pipeline.volume` are made of (functions of a
runner; none of them is called back from here), and what the parity runner and tests drive directly:
:meth:`~MedPLIBRunner.encode_images` (CLIP + SAM once per image, through the feature cache),
:meth:`~MedPLIBRunner.prompt_ids`, :meth:`~MedPLIBRunner.region_grid`, :meth:`~MedPLIBRunner.prefill` /
:meth:`~MedPLIBRunner.generate` (left padded), :meth:`~MedPLIBRunner.decode_masks` and
:meth:`~MedPLIBRunner.postprocess`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from ..modeling.generation import GenerationOutput
from ..modeling.medplib import LLMOutput, MedPLIBForCausalLM
from ..modeling.placement import unit_placement
from ..processing import (
    SAM_SIZE,
    ImageLike,
    MaskLike,
    clip_pixels_batch,
    load_pixels,
    postprocess_mask_logits,
    preprocess_shape,
    region_grid,
    region_mask_from_prompt,
    sam_pixels_batch,
)
from ..tokenization import MedPLIBTokenizer, build_prompt, get_template
from .cache import DEFAULT_CACHE_BYTES, FeatureCache, VolumeCache, content_key
from .features import ImageFeatures, image_cache_bytes, image_prefix_length
from .options import MAX_NEW_TOKENS
from .results import PathCounts

CACHED_IMAGES = 4  # the default cache holds at least this many images' features and prompt-prefix states
InputImage = ImageLike | ImageFeatures

__all__ = ["CACHED_IMAGES", "InputImage", "MedPLIBRunner"]


class MedPLIBRunner:
    """A MedPLIB model with its tokenizer, caches and batched primitives (the base of ``MedPLIBPipeline``).

    Args:
        model: a loaded :class:`~monai_medplib.modeling.medplib.MedPLIBForCausalLM` (eval mode).
        tokenizer: its tokenizer.
        template: ``"vicuna_v1"`` (official evaluation) or ``"llava_v1"`` (training / demo wording).
        feature_cache: the store of :class:`ImageFeatures` (and prompt-prefix states) keyed by image content;
            default: a new :class:`~monai_medplib.pipeline.cache.FeatureCache` of ``cache_bytes``.
        cache_bytes: size of the default cache (0 turns caching off); default: room for
            :data:`CACHED_IMAGES` images of this model (features and prompt-prefix states, see
            :func:`~monai_medplib.pipeline.features.image_cache_bytes`; 2.6 GB for the release 7b-2e in fp32),
            at least :data:`~monai_medplib.pipeline.cache.DEFAULT_CACHE_BYTES`.
        volume_cache: the store of prepared (read and normalised) volumes; default: a new
            :class:`~monai_medplib.pipeline.cache.VolumeCache`.
        encode_batch_size: images per CLIP / SAM encoder call; default 8 on a GPU, 1 on the CPU.
        prefill_batch_size: prompts per one-prefill [SEG] forward (``force_seg`` / ``fast``); default: the whole
            batch on a GPU, 1 on the CPU.

    On the CPU, batching does not add FLOPs per second and a batch's activations spill out of the caches: the
    SAM-Med2D encoder and the LLM prefill run measurably slower per image in batches, so they run one image at a
    time there (the SAM decoder, still batched, gains from it).
    """

    def __init__(
        self,
        model: MedPLIBForCausalLM,
        tokenizer: MedPLIBTokenizer,
        template: str = "vicuna_v1",
        feature_cache: FeatureCache | None = None,
        encode_batch_size: int | None = None,
        cache_bytes: int | None = None,
        prefill_batch_size: int | None = None,
        volume_cache: VolumeCache | None = None,
    ) -> None:
        get_template(template)  # fail early on an unknown name
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = template
        if feature_cache is None:
            if cache_bytes is None:
                per_image = image_cache_bytes(
                    model.config, model.dtype, image_prefix_length(self.prompt_ids("?"))
                )
                cache_bytes = max(DEFAULT_CACHE_BYTES, CACHED_IMAGES * per_image)
            feature_cache = FeatureCache(cache_bytes)
        self.feature_cache = feature_cache
        self.volume_cache = volume_cache if volume_cache is not None else VolumeCache()
        on_gpu = self.device.type != "cpu"
        self.encode_batch_size = max(1, int(encode_batch_size or (8 if on_gpu else 1)))
        self.prefill_batch_size = prefill_batch_size or (None if on_gpu else 1)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def placement(self, unit: str) -> tuple[torch.device, torch.dtype]:
        """Device and dtype of a model unit (``"vision"``, ``"sam"``, ``"seg_head"``): where its inputs go (with a
        quantised LLM or a device map they differ from :attr:`device` / :attr:`dtype`)."""
        return unit_placement(self.model, unit)

    # ------------------------------------------------------------------------------------------ primitives
    @property
    def caching(self) -> bool:
        """Whether features are looked up / stored (a cache of ``max_bytes=0`` stores nothing)."""
        return self.feature_cache is not None and getattr(self.feature_cache, "max_bytes", 1) > 0

    def image_key(self, pixels: np.ndarray) -> str:
        """Cache key of an 8-bit image (``load_pixels`` form) for this model: features depend on the weights,
        their dtype and device as well as on the pixels."""
        return content_key(pixels, id(self.model), str(self.dtype), str(self.device))

    @torch.no_grad()
    def encode_images(
        self,
        images: Sequence[InputImage],
        with_sam: bool = True,
        *,
        with_clip: bool = True,
        counts: PathCounts | None = None,
    ) -> list[ImageFeatures]:
        """Run the vision encoders once per image, batched; cached features are reused and new ones stored.

        ``with_sam=False`` skips the SAM encoder (enough for VQA); ``with_clip=False`` skips CLIP (enough to decode
        a prompt embedding with SAM, as keyframe grounding does between key slices). Given
        :class:`ImageFeatures` pass through.
        Grey images (2D, or RGB with three equal channels) are prepared on one band (bit-identical) and share
        their key with their RGB copy; identical images within the call are encoded once. ``counts`` gets the
        number of images encoded / found in the cache.
        """
        out: list[ImageFeatures | None] = [None] * len(images)
        pixels: dict[int, np.ndarray] = {}
        keys: dict[int, str] = {}
        same_as: dict[int, int] = {}  # a repeated image -> its first occurrence
        first_of: dict[str, int] = {}
        for i, image in enumerate(images):
            if isinstance(image, ImageFeatures):
                if with_sam and not image.has_sam:
                    raise ValueError(f"ImageFeatures #{i} has no sam_embedding; encode it with with_sam=True")
                if with_clip and not image.has_clip:
                    raise ValueError(
                        f"ImageFeatures #{i} has no CLIP features; encode it with with_clip=True"
                    )
                out[i] = image
                continue
            array = load_pixels(image)
            if self.caching:
                key = keys[i] = self.image_key(array)
                if key in first_of:
                    same_as[i] = first_of[key]
                    continue
                first_of[key] = i
                out[i] = self.feature_cache.get(key)
            pixels[i] = array
        for i in pixels:
            if out[i] is None:
                height, width = pixels[i].shape[:2]
                resize = preprocess_shape(height, width, SAM_SIZE)
                out[i] = ImageFeatures(None, (height, width), resize, key=keys.get(i, ""))
        need_clip = [i for i in pixels if with_clip and not out[i].has_clip]
        for i, feats in zip(need_clip, self._encode(need_clip, pixels, self._clip_batch)):
            out[i] = replace(out[i], clip_feats=feats)
        need_sam = [i for i in pixels if with_sam and not out[i].has_sam]
        for i, embedding in zip(need_sam, self._encode(need_sam, pixels, self._sam_batch)):
            out[i] = replace(out[i], sam_embedding=embedding)
        if self.caching:
            for i in sorted(set(need_clip) | set(need_sam)):
                self.feature_cache.put(keys[i], out[i])
        for i, first in same_as.items():
            out[i] = out[first]
        if counts is not None:
            encoded = len(set(need_clip) | set(need_sam))
            counts.encoded += encoded
            counts.cached += len(pixels) - encoded
        return out  # type: ignore[return-value]

    def prefix_state(self, key: str) -> Any | None:
        """The prompt-prefix K/V states cached under ``key`` (see :mod:`~monai_medplib.pipeline.grounding`)."""
        return self.feature_cache.get(key) if self.caching else None

    def keep_prefix_state(self, key: str, state: Any) -> None:
        """Cache prompt-prefix K/V states (bounded with the image features; nothing when caching is off)."""
        if self.caching:
            self.feature_cache.put(key, state)

    def _encode(self, indices: list[int], pixels: dict[int, np.ndarray], encoder) -> list[torch.Tensor]:
        results: list[torch.Tensor] = []
        for start in range(0, len(indices), self.encode_batch_size):
            batch = encoder([pixels[i] for i in indices[start : start + self.encode_batch_size]])
            # clone: a row view would keep the whole batch alive and under-count the cache's bytes
            results.extend(row.clone() for row in batch)
        return results

    def _clip_batch(self, images: list[np.ndarray]) -> torch.Tensor:
        return self.model.clip_features(clip_pixels_batch(images).to(*self.placement("vision")))

    def _sam_batch(self, images: list[np.ndarray]) -> torch.Tensor:
        pixels, _ = sam_pixels_batch(images)
        return self.model.model.visual_model.encode_image(pixels.to(*self.placement("sam")))

    def prompt_ids(self, question: str, region: bool = False) -> list[int]:
        """Model ids of the template prompt ending with ``ASSISTANT:`` (``-200`` image, ``-300`` region)."""
        return self.tokenizer.encode_prompt(build_prompt(question, self.template, region=region))

    def region_grid(
        self,
        image_size: Sequence[int],
        mask: MaskLike | None = None,
        points: Sequence[Sequence[float]] | None = None,
        box: Sequence[float] | None = None,
        keep_largest_component: bool = False,
    ) -> torch.Tensor:
        """24x24 region grid of one region prompt (demo path; ``keep_largest_component`` = dataset path)."""
        region = region_mask_from_prompt(image_size, mask=mask, points=points, box=box)
        return region_grid(region, keep_largest_component=keep_largest_component)

    def embed(
        self,
        features: Sequence[ImageFeatures],
        prompts: Sequence[Sequence[int]],
        region_grids: Sequence[Sequence[torch.Tensor]] | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ``(inputs_embeds [B,L,H], attention_mask [B,L])`` of a batch."""
        if len(features) != len(prompts):
            raise ValueError(f"{len(features)} images but {len(prompts)} prompts")
        if region_grids is not None and len(region_grids) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(region_grids)} region grid lists")
        missing = [i for i, f in enumerate(features) if not f.has_clip]
        if missing:
            raise ValueError(
                f"ImageFeatures {missing} have no CLIP features; encode them with with_clip=True"
            )
        vision_device = self.placement("vision")[0]
        clip = torch.stack([f.clip_feats.to(vision_device) for f in features])
        grids = None
        if region_grids is not None:
            grids = [[g.to(vision_device) for g in sample] for sample in region_grids]
        embeds, mask = self.model.build_inputs_embeds(
            prompts, clip, grids, padding_side="left", generator=generator
        )
        limit = self.model.config.max_position_embeddings
        if (
            embeds.shape[1] > limit
        ):  # RoPE runs on (as the original does), but the model never saw such positions
            warnings.warn(
                f"the prompt is {embeds.shape[1]} positions long (image and region tokens included), longer than the "
                f"{limit} the model was trained for: its answers will not be reliable; shorten the question",
                stacklevel=3,
            )
        return embeds, mask

    @torch.no_grad()
    def prefill(
        self,
        features: Sequence[ImageFeatures],
        prompts: Sequence[Sequence[int]],
        region_grids: Sequence[Sequence[torch.Tensor]] | None = None,
        output_router_logits: bool = False,
        last_logits_only: bool = False,
    ) -> LLMOutput:
        """One forward pass over the (left-padded) prompts; ``hidden_states[:, -1]`` is each last prompt state.

        ``last_logits_only`` runs ``lm_head`` on the last row only (``logits [B, 1, V]``).
        """
        embeds, mask = self.embed(features, prompts, region_grids)
        return self.model.llm_forward(
            embeds, mask, output_router_logits=output_router_logits, last_logits_only=last_logits_only
        )

    @torch.no_grad()
    def generate(
        self,
        features: Sequence[ImageFeatures],
        prompts: Sequence[Sequence[int]],
        region_grids: Sequence[Sequence[torch.Tensor]] | None = None,
        max_new_tokens: int = MAX_NEW_TOKENS["image"],
        temperature: float = 0.0,
        seed: int | None = None,
        return_step_logits: bool = False,
    ) -> GenerationOutput:
        """KV-cache decoding of a left-padded batch: greedy, or sampling (demo worker) when temperature >= 1e-4."""
        # one generator per sample, each seeded alike: a sample draws what it draws alone, whatever its batch
        region_generator = None if seed is None else [torch.Generator().manual_seed(seed) for _ in prompts]
        embeds, mask = self.embed(features, prompts, region_grids, region_generator)
        generator = (
            None if seed is None else [torch.Generator(self.device).manual_seed(seed) for _ in prompts]
        )
        return self.model.greedy_generate(
            embeds, mask, max_new_tokens, self.tokenizer.eos_id, temperature, generator, return_step_logits
        )

    @torch.no_grad()
    def decode_masks(
        self, features: Sequence[ImageFeatures], seg_hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[SEG] states ``[N,H]`` (row n belongs to ``features[n]``) -> SAM ``(low_res [N,1,64,64], iou [N,1])``."""
        if seg_hidden.dim() != 2 or seg_hidden.shape[0] != len(features):
            raise ValueError(f"seg_hidden must be [{len(features)}, H], got {tuple(seg_hidden.shape)}")
        return self.decode_text_prompts(features, self.seg_embeddings(seg_hidden))

    @torch.no_grad()
    def decode_text_prompts(
        self, features: Sequence[ImageFeatures], text_embeds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM text prompts ``[N,256]`` (``seg_embeddings``) -> fp32 ``(low_res [N,1,64,64], iou [N,1])``."""
        missing = [i for i, f in enumerate(features) if not f.has_sam]
        if missing:
            raise ValueError(f"ImageFeatures {missing} have no sam_embedding; encode them with with_sam=True")
        device, dtype = self.placement("sam")
        embeddings = torch.stack([f.sam_embedding.to(device) for f in features])
        text = text_embeds.to(device, dtype)[:, None]
        low_res, iou = self.model.model.visual_model.decode(embeddings, text_embeds=text)
        return low_res.float(), iou.float()

    @torch.no_grad()
    def seg_embeddings(self, seg_hidden: torch.Tensor) -> torch.Tensor:
        """[SEG] states ``[N,H]`` -> SAM text prompts ``[N,256]`` (model dtype; ``text_hidden_fcs``)."""
        return self.model.seg_embeddings(seg_hidden.to(*self.placement("seg_head")))

    @staticmethod
    def postprocess(low_res: torch.Tensor, features: ImageFeatures) -> torch.Tensor:
        """One low-res mask ``[1,64,64]`` -> logits ``[H,W]`` at the original size (release crop quirk)."""
        return postprocess_mask_logits(low_res[None].float(), features.resize, features.original_size)[0, 0]

    @staticmethod
    def postprocess_batch(low_res: torch.Tensor, features: Sequence[ImageFeatures]) -> list[torch.Tensor]:
        """:meth:`postprocess` of ``low_res [N,1,64,64]`` (row n belongs to ``features[n]``); images of one size
        are interpolated in one call."""
        out: list[torch.Tensor | None] = [None] * len(features)
        groups: dict[tuple, list[int]] = {}
        for n, f in enumerate(features):
            groups.setdefault((tuple(f.resize), tuple(f.original_size)), []).append(n)
        for (resize, size), rows in groups.items():
            logits = postprocess_mask_logits(low_res[rows].float(), resize, size)[:, 0]
            for n, row in zip(rows, logits):
                out[n] = row
        return out  # type: ignore[return-value]

    def decode_text(self, ids: Sequence[int]) -> str:
        """Answer text as the release decodes it (``</s>`` dropped, MedPLIB tokens kept, stripped)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
