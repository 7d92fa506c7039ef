"""2D inference API: VQA, region VQA and pixel grounding on one image or a batch (spec 5).

:class:`MedPLIBPipeline` has two layers:

* user calls: :meth:`~MedPLIBPipeline.answer`, :meth:`~MedPLIBPipeline.answer_region`,
  :meth:`~MedPLIBPipeline.ground` (and ``*_batch`` variants), :meth:`~MedPLIBPipeline.refine` (clicks);
* volume calls from :class:`~monai_medplib.volume.VolumeMixin`: ``ground_volume``, ``answer_volume_region``,
  ``answer_volume``, ``refine_volume``;
* batched primitives they are built from, for callers that organise their own work:
  :meth:`~MedPLIBPipeline.encode_images` (CLIP + SAM once per image, through the pipeline's
  :class:`~monai_medplib.feature_cache.FeatureCache`), :meth:`~MedPLIBPipeline.prompt_ids`,
  :meth:`~MedPLIBPipeline.region_grid`, :meth:`~MedPLIBPipeline.prefill` / :meth:`~MedPLIBPipeline.generate`
  (left padded), :meth:`~MedPLIBPipeline.ground_features` (the one grounding core, see
  :mod:`~monai_medplib.fast_grounding`), :meth:`~MedPLIBPipeline.decode_masks` and
  :meth:`~MedPLIBPipeline.postprocess`.

Every method that takes an image also takes :class:`~monai_medplib.features.ImageFeatures`. The 2D and the
volume methods share one bounded feature cache, so a slice grounded by ``ground_volume`` is a cache hit for a
later ``refine`` / ``answer`` on the same pixels.
Defaults follow the official evaluation: greedy decoding, up to 1024 new tokens, the ``vicuna_v1`` template.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_medplib
from .fast_grounding import PathCounts, image_prefix_length, seg_states
from .feature_cache import DEFAULT_CACHE_BYTES, FeatureCache, content_key
from .features import ImageFeatures, image_cache_bytes
from .modeling.generation import GenerationOutput
from .modeling.medplib import LLMOutput, MedPLIBForCausalLM
from .processing import (
    SAM_SIZE,
    ImageLike,
    binarize,
    clip_pixels_batch,
    load_pixels,
    postprocess_mask_logits,
    preprocess_shape,
    region_grid,
    sam_pixels_batch,
)
from .refinement import refine_grounding
from .region_prompts import MaskLike, region_mask_from_prompt
from .results import GroundingResult
from .tokenization import MedPLIBTokenizer, build_prompt, get_template
from .volume import VolumeMixin

DEFAULT_MAX_NEW_TOKENS = 1024  # official evaluation (vqa_infer.py)
CACHED_IMAGES = 4  # the default cache holds at least this many images' features and prompt-prefix states
SEG_RULES = ("release", "clean")
InputImage = ImageLike | ImageFeatures


def resolve_model_path(path: str | Path) -> Path:
    """``"demo"`` -> the bundled demo model directory; anything else is taken as a directory path."""
    if str(path) != "demo":
        return Path(path)
    try:
        from .demo_model import DEMO_MODEL_DIR
    except ModuleNotFoundError as err:
        if err.name != f"{__package__}.demo_model":
            raise
        raise FileNotFoundError(
            "the demo model is not part of this installation (monai_medplib.demo_model is missing); "
            "pass the path of a MedPLIB model directory instead of 'demo'"
        ) from err
    if not (Path(DEMO_MODEL_DIR) / "config.json").is_file():
        raise FileNotFoundError(
            f"the demo model has no weights in this installation ({DEMO_MODEL_DIR} holds no config.json); "
            "pass the path of a MedPLIB model directory instead of 'demo'"
        )
    return Path(DEMO_MODEL_DIR)


class MedPLIBPipeline(VolumeMixin):
    """MedPLIB inference on 2D images (path, PIL image, numpy ``(H, W)`` / ``(H, W, 3)``, uint8 or float) and,
    through :class:`~monai_medplib.volume.VolumeMixin`, on volumes.

    Args:
        model: a loaded :class:`~monai_medplib.modeling.medplib.MedPLIBForCausalLM` (eval mode).
        tokenizer: its tokenizer.
        template: ``"vicuna_v1"`` (official evaluation) or ``"llava_v1"`` (training / demo wording).
        feature_cache: the store of :class:`ImageFeatures` (and prompt-prefix states) keyed by image content;
            default: a new :class:`~monai_medplib.feature_cache.FeatureCache` of ``cache_bytes``.
        cache_bytes: size of the default cache (0 turns caching off); default: room for
            :data:`CACHED_IMAGES` images of this model (features and prompt-prefix states, see
            :func:`~monai_medplib.features.image_cache_bytes`; 2.6 GB for the release 7b-2e in fp32), at
            least :data:`~monai_medplib.feature_cache.DEFAULT_CACHE_BYTES`.
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
        on_gpu = self.device.type != "cpu"
        self.encode_batch_size = max(1, int(encode_batch_size or (8 if on_gpu else 1)))
        self.prefill_batch_size = prefill_batch_size or (None if on_gpu else 1)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path = "demo",
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        template: str = "vicuna_v1",
        **load_kwargs,
    ) -> MedPLIBPipeline:
        """Load a MedPLIB model directory strictly (``load_kwargs`` go to :func:`load_medplib`).

        ``device`` defaults to CUDA when available, else CPU; ``dtype`` to bfloat16 on CUDA, float32 on CPU.
        """
        path = resolve_model_path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"MedPLIB model directory not found: {path}")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model, _, tokenizer = load_medplib(path, dtype=dtype, device=device, **load_kwargs)
        if tokenizer is None:
            raise FileNotFoundError(f"{path} is not a complete MedPLIB checkpoint: no tokenizer.model in it")
        return cls(model, tokenizer, template=template)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

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
        self, images: Sequence[InputImage], with_sam: bool = True, *, counts: PathCounts | None = None
    ) -> list[ImageFeatures]:
        """Run the vision encoders once per image, batched; cached features are reused and new ones stored.

        ``with_sam=False`` skips the SAM encoder (enough for VQA). Given :class:`ImageFeatures` pass through.
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
        need_clip = [i for i in pixels if out[i] is None]
        for i, feats in zip(need_clip, self._encode(need_clip, pixels, self._clip_batch)):
            height, width = pixels[i].shape[:2]
            resize = preprocess_shape(height, width, SAM_SIZE)
            out[i] = ImageFeatures(feats, (height, width), resize, key=keys.get(i, ""))
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

    def _encode(self, indices: list[int], pixels: dict[int, np.ndarray], encoder) -> list[torch.Tensor]:
        results: list[torch.Tensor] = []
        for start in range(0, len(indices), self.encode_batch_size):
            batch = encoder([pixels[i] for i in indices[start : start + self.encode_batch_size]])
            # clone: a row view would keep the whole batch alive and under-count the cache's bytes
            results.extend(row.clone() for row in batch)
        return results

    def _clip_batch(self, images: list[np.ndarray]) -> torch.Tensor:
        return self.model.clip_features(clip_pixels_batch(images).to(self.device, self.dtype))

    def _sam_batch(self, images: list[np.ndarray]) -> torch.Tensor:
        pixels, _ = sam_pixels_batch(images)
        return self.model.model.visual_model.encode_image(pixels.to(self.device, self.dtype))

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
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ``(inputs_embeds [B,L,H], attention_mask [B,L])`` of a batch."""
        if len(features) != len(prompts):
            raise ValueError(f"{len(features)} images but {len(prompts)} prompts")
        if region_grids is not None and len(region_grids) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(region_grids)} region grid lists")
        clip = torch.stack([f.clip_feats.to(self.device) for f in features])
        grids = None
        if region_grids is not None:
            grids = [[g.to(self.device) for g in sample] for sample in region_grids]
        return self.model.build_inputs_embeds(prompts, clip, grids, padding_side="left", generator=generator)

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
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float = 0.0,
        seed: int | None = None,
        return_step_logits: bool = False,
    ) -> GenerationOutput:
        """KV-cache decoding of a left-padded batch: greedy, or sampling (demo worker) when temperature >= 1e-4."""
        region_generator = None if seed is None else torch.Generator().manual_seed(seed)
        embeds, mask = self.embed(features, prompts, region_grids, region_generator)
        generator = None if seed is None else torch.Generator(self.device).manual_seed(seed)
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
        embeddings = torch.stack([f.sam_embedding.to(self.device) for f in features])
        text = text_embeds.to(self.device, self.dtype)[:, None]
        low_res, iou = self.model.model.visual_model.decode(embeddings, text_embeds=text)
        return low_res.float(), iou.float()

    @torch.no_grad()
    def seg_embeddings(self, seg_hidden: torch.Tensor) -> torch.Tensor:
        """[SEG] states ``[N,H]`` -> SAM text prompts ``[N,256]`` (model dtype; ``text_hidden_fcs``)."""
        return self.model.seg_embeddings(seg_hidden.to(self.device, self.dtype))

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

    # ------------------------------------------------------------------------------------------ user calls
    def answer(
        self,
        image: InputImage,
        question: str,
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> str:
        """Answer a question about the whole image (VQA)."""
        return self.answer_batch(
            [image], [question], max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
        )[0]

    def answer_batch(
        self,
        images: Sequence[InputImage],
        questions: Sequence[str],
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> list[str]:
        """:meth:`answer` for several (image, question) pairs in one left-padded batch."""
        features = self.encode_images(images, with_sam=False)
        return self._answers(features, questions, None, max_new_tokens, temperature, seed)

    def answer_region(
        self,
        image: InputImage,
        question: str,
        *,
        mask: MaskLike | None = None,
        points: Sequence[Sequence[float]] | None = None,
        box: Sequence[float] | None = None,
        official_eval_region: bool = False,
        keep_largest_component: bool = False,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> str:
        """Answer a question about a region given as ``mask``, ``points`` ((x, y) pixels) or ``box``.

        The region feature is injected between ``<region></region>`` as the demo worker does; the question may
        mark the spot with ``<region>``, else ``<region></region>`` is appended. ``official_eval_region=True``
        reproduces the official ``vqa_infer.py`` evaluation, which drops the region (no feature inserted).
        ``keep_largest_component`` uses the dataset path's grid (largest 8-connected component only).
        """
        features = self.encode_images([image], with_sam=False)
        grids = None
        if not official_eval_region:
            grids = [[self.region_grid(features[0].original_size, mask, points, box, keep_largest_component)]]
        return self._answers(features, [question], grids, max_new_tokens, temperature, seed, region=True)[0]

    def answer_region_batch(
        self,
        images: Sequence[InputImage],
        questions: Sequence[str],
        regions: Sequence[MaskLike | Sequence[MaskLike]],
        *,
        official_eval_region: bool = False,
        keep_largest_component: bool = False,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> list[str]:
        """:meth:`answer_region` for several (image, question, region mask) triples in one left-padded batch.

        ``regions[b]`` is one mask, or a list of masks for a question with several ``<region>`` places (as
        MeCoVQA-R entries have); the masks of unused regions are not read with ``official_eval_region``.
        """
        if not len(images) == len(questions) == len(regions):
            raise ValueError(f"{len(images)} images, {len(questions)} questions, {len(regions)} regions")
        features = self.encode_images(images, with_sam=False)
        grids = None
        if not official_eval_region:
            grids = [
                [
                    self.region_grid(f.original_size, mask=m, keep_largest_component=keep_largest_component)
                    for m in (r if isinstance(r, list | tuple) else [r])
                ]
                for f, r in zip(features, regions)
            ]
        return self._answers(features, questions, grids, max_new_tokens, temperature, seed, region=True)

    def _answers(
        self, features, questions, grids, max_new_tokens, temperature, seed, region: bool = False
    ) -> list[str]:
        prompts = [self.prompt_ids(q, region=region) for q in questions]
        out = self.generate(features, prompts, grids, max_new_tokens, temperature, seed)
        return [self.decode_text(ids) for ids in out.new_ids]

    def ground(
        self,
        image: InputImage,
        text: str,
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float = 0.0,
        seed: int | None = None,
        force_seg: bool = False,
        all_seg: bool = False,
        seg_rule: str = "release",
        fast: bool = False,
    ) -> GroundingResult:
        """Segment what ``text`` asks for: generate, take the ``<SEG>`` state, decode it with SAM-Med2D.

        Release behaviour by default: only the first ``<SEG>`` is decoded, with the release selection rule
        (``seg_rule="release"``: exactly one ``<SEG>`` -> the state before the last generated token, which equals
        the clean rule for ``<SEG></s>`` answers; ``"clean"`` = the state that predicted the ``<SEG>``); no
        ``<SEG>`` -> empty mask and ``has_seg=False``. Opt-ins: ``all_seg`` decodes every ``<SEG>`` (clean rule,
        ``all_masks``); ``force_seg`` makes the answer ``<SEG></s>`` without generating (as the fixture harness
        forced it), so models that never emit ``<SEG>`` still give a mask; ``fast`` takes the one-prefill
        shortcut where ``<SEG>`` is the first greedy token (see :mod:`~monai_medplib.fast_grounding`).
        """
        return self.ground_batch(
            [image],
            [text],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            force_seg=force_seg,
            all_seg=all_seg,
            seg_rule=seg_rule,
            fast=fast,
        )[0]

    def ground_batch(
        self,
        images: Sequence[InputImage],
        texts: Sequence[str],
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float = 0.0,
        seed: int | None = None,
        force_seg: bool = False,
        all_seg: bool = False,
        seg_rule: str = "release",
        fast: bool = False,
    ) -> list[GroundingResult]:
        """:meth:`ground` for several (image, text) pairs: one generation batch, one SAM decoder batch."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        features = self.encode_images(images, with_sam=True)
        return self.ground_features(
            features,
            [self.prompt_ids(t) for t in texts],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            force_seg=force_seg,
            all_seg=all_seg,
            seg_rule=seg_rule,
            fast=fast,
        )

    @torch.no_grad()
    def ground_features(
        self,
        features: Sequence[ImageFeatures],
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float = 0.0,
        seed: int | None = None,
        force_seg: bool = False,
        all_seg: bool = False,
        seg_rule: str = "release",
        fast: bool = False,
        counts: PathCounts | None = None,
    ) -> list[GroundingResult]:
        """The grounding core (2D and volumes): [SEG] states of ``prompts[b]`` about ``features[b]``, one SAM
        decoder batch, post-processing; ``counts`` gets the path each prompt took."""
        if seg_rule not in SEG_RULES:
            raise ValueError(f"seg_rule must be one of {SEG_RULES}, got {seg_rule!r}")
        states = seg_states(
            self,
            features,
            prompts,
            fast=fast,
            force_seg=force_seg,
            all_seg=all_seg,
            seg_rule=seg_rule,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            counts=counts,
        )
        owners = [b for b, state in enumerate(states) for _ in state.states]
        if owners:
            # the text prompts are kept on the results: click refinement decodes with them again
            seg_embeds = self.seg_embeddings(torch.stack([s for state in states for s in state.states]))
            owner_features = [features[b] for b in owners]
            low_res, iou = self.decode_text_prompts(owner_features, seg_embeds)
            logits = self.postprocess_batch(low_res, owner_features)
        results, row = [], 0
        for b, state in enumerate(states):
            answer = self.decode_text(state.new_ids)
            if not state.has_seg:
                results.append(GroundingResult.empty(features[b].original_size, answer, state.new_ids))
                continue
            result = GroundingResult.from_logits(
                logits[row], answer, state.new_ids, low_res[row], iou[row], seg_embeds[row]
            )
            if all_seg:
                mine = logits[row : row + len(state.states)]
                result.all_probs = [torch.sigmoid(x).cpu().numpy() for x in mine]
                result.all_masks = [binarize(x).cpu().numpy() for x in mine]
            results.append(result)
            row += len(state.states)
        return results

    def refine(
        self,
        image: InputImage,
        points: Sequence[Sequence[float]],
        labels: Sequence[int],
        prior: GroundingResult | None = None,
        text: str | None = None,
        **ground_options,
    ) -> GroundingResult:
        """Refine a grounded mask with clicks (beyond the release; opt-in). See :func:`refine_grounding`.

        ``points`` are every click so far as original-image ``(x, y)`` pixels, ``labels`` 1 positive / 0 negative;
        ``prior`` a previous :meth:`ground` or :meth:`refine` result of this image; ``text`` is grounded first
        (with ``ground_options``) when no prior is given.
        """
        return refine_grounding(self, image, points, labels, prior, text, **ground_options)
