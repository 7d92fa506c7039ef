"""2D inference API: VQA, region VQA and pixel grounding on one image or a batch (spec 5).

:class:`MedPLIBPipeline` has two layers:

* user calls: :meth:`~MedPLIBPipeline.answer`, :meth:`~MedPLIBPipeline.answer_region`,
  :meth:`~MedPLIBPipeline.ground` (and ``*_batch`` variants), :meth:`~MedPLIBPipeline.refine` (clicks);
* batched primitives they are built from, for callers that organise their own work (the volume layer):
  :meth:`~MedPLIBPipeline.encode_images` (CLIP + SAM once per image, through an optional
  :class:`~monai_medplib.features.FeatureCache`), :meth:`~MedPLIBPipeline.prompt_ids`,
  :meth:`~MedPLIBPipeline.region_grid`, :meth:`~MedPLIBPipeline.prefill` / :meth:`~MedPLIBPipeline.generate`
  (left padded), :meth:`~MedPLIBPipeline.decode_masks` and :meth:`~MedPLIBPipeline.postprocess`.

Every method that takes an image also takes :class:`~monai_medplib.features.ImageFeatures`.
Defaults follow the official evaluation: greedy decoding, up to 1024 new tokens, the ``vicuna_v1`` template.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_medplib
from .features import FeatureCache, ImageFeatures, image_key
from .modeling.generation import GenerationOutput
from .modeling.medplib import LLMOutput, MedPLIBForCausalLM
from .processing import (
    SAM_SIZE,
    ImageLike,
    binarize,
    clip_pixels,
    load_rgb,
    postprocess_mask_logits,
    preprocess_shape,
    region_grid,
    sam_pixels,
)
from .refinement import refine_grounding
from .region_prompts import MaskLike, region_mask_from_prompt
from .results import GroundingResult
from .tokenization import MedPLIBTokenizer, build_prompt, get_template

DEFAULT_MAX_NEW_TOKENS = 1024  # official evaluation (vqa_infer.py)
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


class MedPLIBPipeline:
    """MedPLIB inference on 2D images (path, PIL image, numpy ``(H, W)`` / ``(H, W, 3)``, uint8 or float).

    Args:
        model: a loaded :class:`~monai_medplib.modeling.medplib.MedPLIBForCausalLM` (eval mode).
        tokenizer: its tokenizer.
        template: ``"vicuna_v1"`` (official evaluation) or ``"llava_v1"`` (training / demo wording).
        feature_cache: optional store of :class:`ImageFeatures` keyed by image content.
        encode_batch_size: images per CLIP / SAM encoder call.
    """

    def __init__(
        self,
        model: MedPLIBForCausalLM,
        tokenizer: MedPLIBTokenizer,
        template: str = "vicuna_v1",
        feature_cache: FeatureCache | None = None,
        encode_batch_size: int = 8,
    ) -> None:
        get_template(template)  # fail early on an unknown name
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = template
        self.feature_cache = feature_cache
        self.encode_batch_size = max(1, int(encode_batch_size))

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
    @torch.no_grad()
    def encode_images(self, images: Sequence[InputImage], with_sam: bool = True) -> list[ImageFeatures]:
        """Run the vision encoders once per image, batched; cached features are reused and new ones stored.

        ``with_sam=False`` skips the SAM encoder (enough for VQA). Given :class:`ImageFeatures` pass through.
        """
        out: list[ImageFeatures | None] = [None] * len(images)
        rgbs: dict[int, np.ndarray] = {}
        keys: dict[int, str] = {}
        for i, image in enumerate(images):
            if isinstance(image, ImageFeatures):
                if with_sam and not image.has_sam:
                    raise ValueError(f"ImageFeatures #{i} has no sam_embedding; encode it with with_sam=True")
                out[i] = image
                continue
            rgbs[i] = load_rgb(image)
            if self.feature_cache is not None:
                keys[i] = image_key(rgbs[i])
                out[i] = self.feature_cache.get(keys[i])
        need_clip = [i for i in rgbs if out[i] is None]
        for i, feats in zip(need_clip, self._encode(need_clip, rgbs, self._clip_batch)):
            height, width = rgbs[i].shape[:2]
            out[i] = ImageFeatures(feats, (height, width), preprocess_shape(height, width, SAM_SIZE))
        need_sam = [i for i in rgbs if with_sam and not out[i].has_sam]
        for i, embedding in zip(need_sam, self._encode(need_sam, rgbs, self._sam_batch)):
            out[i] = replace(out[i], sam_embedding=embedding)
        if self.feature_cache is not None:
            for i in sorted(set(need_clip) | set(need_sam)):
                self.feature_cache.put(keys[i], out[i])
        return out  # type: ignore[return-value]

    def _encode(self, indices: list[int], rgbs: dict[int, np.ndarray], encoder) -> list[torch.Tensor]:
        results: list[torch.Tensor] = []
        for start in range(0, len(indices), self.encode_batch_size):
            results.extend(encoder([rgbs[i] for i in indices[start : start + self.encode_batch_size]]))
        return results

    def _clip_batch(self, rgbs: list[np.ndarray]) -> torch.Tensor:
        pixels = torch.stack([clip_pixels(rgb) for rgb in rgbs]).to(self.device, self.dtype)
        return self.model.clip_features(pixels)

    def _sam_batch(self, rgbs: list[np.ndarray]) -> torch.Tensor:
        pixels = torch.stack([sam_pixels(rgb)[0] for rgb in rgbs]).to(self.device, self.dtype)
        return self.model.model.visual_model.encode_image(pixels)

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
    ) -> LLMOutput:
        """One forward pass over the (left-padded) prompts; ``hidden_states[:, -1]`` is each last prompt state."""
        embeds, mask = self.embed(features, prompts, region_grids)
        return self.model.llm_forward(embeds, mask, output_router_logits=output_router_logits)

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
        missing = [i for i, f in enumerate(features) if not f.has_sam]
        if missing:
            raise ValueError(f"ImageFeatures {missing} have no sam_embedding; encode them with with_sam=True")
        text_embeds = self.seg_embeddings(seg_hidden)
        embeddings = torch.stack([f.sam_embedding.to(self.device) for f in features])
        low_res, iou = self.model.model.visual_model.decode(embeddings, text_embeds=text_embeds[:, None])
        return low_res.float(), iou.float()

    @torch.no_grad()
    def seg_embeddings(self, seg_hidden: torch.Tensor) -> torch.Tensor:
        """[SEG] states ``[N,H]`` -> SAM text prompts ``[N,256]`` (model dtype; ``text_hidden_fcs``)."""
        return self.model.seg_embeddings(seg_hidden.to(self.device, self.dtype))

    @staticmethod
    def postprocess(low_res: torch.Tensor, features: ImageFeatures) -> torch.Tensor:
        """One low-res mask ``[1,64,64]`` -> logits ``[H,W]`` at the original size (release crop quirk)."""
        return postprocess_mask_logits(low_res[None].float(), features.resize, features.original_size)[0, 0]

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
        prompts = [self.prompt_ids(q) for q in questions]
        out = self.generate(features, prompts, None, max_new_tokens, temperature, seed)
        return [self.decode_text(ids) for ids in out.new_ids]

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
        features = self.encode_images([image], with_sam=False)[0]
        grid = self.region_grid(features.original_size, mask, points, box, keep_largest_component)
        grids = None if official_eval_region else [[grid]]
        prompt = self.prompt_ids(question, region=True)
        out = self.generate([features], [prompt], grids, max_new_tokens, temperature, seed)
        return self.decode_text(out.new_ids[0])

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
    ) -> GroundingResult:
        """Segment what ``text`` asks for: generate, take the ``<SEG>`` state, decode it with SAM-Med2D.

        Release behaviour by default: only the first ``<SEG>`` is decoded, with the release selection rule
        (``seg_rule="release"``: exactly one ``<SEG>`` -> the state before the last generated token, which equals
        the clean rule for ``<SEG></s>`` answers; ``"clean"`` = the state that predicted the ``<SEG>``); no
        ``<SEG>`` -> empty mask and ``has_seg=False``. Opt-ins: ``all_seg`` decodes every ``<SEG>`` (clean rule,
        ``all_masks``); ``force_seg`` makes the answer ``<SEG></s>`` without generating (as the fixture harness
        forced it), so models that never emit ``<SEG>`` still give a mask.
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
    ) -> list[GroundingResult]:
        """:meth:`ground` for several (image, text) pairs: one generation batch, one SAM decoder batch."""
        if seg_rule not in SEG_RULES:
            raise ValueError(f"seg_rule must be one of {SEG_RULES}, got {seg_rule!r}")
        features = self.encode_images(images, with_sam=True)
        prompts = [self.prompt_ids(t) for t in texts]
        if force_seg:
            # Forcing "<SEG></s>": the [SEG] state is the last prompt state (spec 5.4, j = 0); the forced tokens
            # would only be fed back after it, so one prefill pass gives exactly what forced decoding gives.
            last = self.prefill(features, prompts).hidden_states[:, -1]
            token_ids = [[self.tokenizer.seg_id, self.tokenizer.eos_id] for _ in prompts]
            states = [[last[b]] for b in range(len(prompts))]
        else:
            out = self.generate(features, prompts, None, max_new_tokens, temperature, seed)
            token_ids = out.new_ids
            states = [self._seg_states(out, b, all_seg, seg_rule) for b in range(len(prompts))]
        owners = [b for b, sample in enumerate(states) for _ in sample]
        if owners:
            seg_hidden = torch.stack([s for sample in states for s in sample])
            low_res, iou = self.decode_masks([features[b] for b in owners], seg_hidden)
            # Kept on the result as the text prompt of click refinement (a small MLP: recomputing is cheap).
            seg_embeds = self.seg_embeddings(seg_hidden)
        results, row = [], 0
        for b, sample in enumerate(states):
            answer = self.decode_text(token_ids[b])
            if not sample:
                results.append(GroundingResult.empty(features[b].original_size, answer, token_ids[b]))
                continue
            logits = [self.postprocess(low_res[row + k], features[b]) for k in range(len(sample))]
            result = GroundingResult.from_logits(
                logits[0], answer, token_ids[b], low_res[row], iou[row], seg_embeds[row]
            )
            if all_seg:
                result.all_probs = [torch.sigmoid(x).cpu().numpy() for x in logits]
                result.all_masks = [binarize(x).cpu().numpy() for x in logits]
            results.append(result)
            row += len(sample)
        return results

    def _seg_states(self, out: GenerationOutput, b: int, all_seg: bool, seg_rule: str) -> list[torch.Tensor]:
        seg_id = self.tokenizer.seg_id
        ids = out.new_ids[b]
        if all_seg:
            return [out.hidden_for_token(b, j) for j, token in enumerate(ids) if token == seg_id]
        state = out.seg_hidden_states(seg_id, release_quirk=seg_rule == "release")[b]
        return [] if state is None else [state]

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
