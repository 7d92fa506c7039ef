"""Batched grounding primitives: cached image features, the [SEG] state of many prompts at once, mask decoding.

Three ways to get the [SEG] state of a prompt (spec 5.4, clean rule: the final-norm state that predicts the
first ``<SEG>``), counted per call in :class:`PathCounts`:

* ``generate`` (default, faithful): greedy decoding of a left-padded batch; the answer text is complete.
* ``shortcut`` (opt-in ``fast=True``): one prefill. Where ``<SEG>`` is the argmax at the last prompt position
  the answer starts with ``<SEG>`` and its state *is* that last position, so decoding is skipped (the answer
  is reported as the ``<SEG>`` token alone; MeCoVQA-G answers are always ``<SEG></s>``). Samples whose argmax
  is anything else fall back to ``generate``.
* ``forced`` (``force_seg=True``): the answer is forced to ``<SEG></s>`` as the fixtures' oracle did with
  ``forced_decoder_ids``; one prefill, no check. For random-weight models and benchmarks only.

Batches are left-padded; position ids follow the attention mask, so a padded sample computes what it would
alone (checked to 1e-4 by the tests). Nothing here imports MONAI or reads files.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from transformers.cache_utils import DynamicCache

from .feature_cache import FeatureCache, SliceFeatures, content_key
from .modeling.medplib import IMAGE_TOKEN_INDEX, MedPLIBForCausalLM
from .processing import (
    CLIP_MEAN,
    CLIP_PAD_FILL,
    CLIP_SIZE,
    CLIP_STD,
    SAM_MEAN,
    SAM_SIZE,
    SAM_STD,
    binarize,
    clip_pixels,
    postprocess_mask_logits,
    preprocess_shape,
    sam_pixels,
)

__all__ = [
    "GROUNDING_MODES",
    "PathCounts",
    "SegState",
    "decode_masks",
    "encode_images",
    "grey_pixels",
    "model_tag",
    "seg_states",
]

GROUNDING_MODES = ("generate", "shortcut", "forced")


@dataclass
class PathCounts:
    """How many prompts took each [SEG] path, encoder work (``encoded``) vs cache reuse (``cached``), and image
    prompt-prefix states computed vs reused (``prefix_computed`` / ``prefix_cached``)."""

    generate: int = 0
    shortcut: int = 0
    forced: int = 0
    encoded: int = 0
    cached: int = 0
    prefix_computed: int = 0
    prefix_cached: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class SegState:
    """Result of the language side for one prompt.

    Attributes:
        hidden: the [SEG] final-norm hidden state ``[H]`` (None when no ``<SEG>`` was produced).
        answer: decoded answer text (release decode: MedPLIB tokens such as ``<SEG>`` are kept).
        path: "generate", "shortcut" or "forced".
    """

    hidden: torch.Tensor | None
    answer: str
    path: str
    new_ids: list[int] = field(default_factory=list)

    @property
    def has_seg(self) -> bool:
        return self.hidden is not None


def model_tag(model: MedPLIBForCausalLM) -> tuple:
    """Cache-key tag of a model instance: features depend on the weights, their dtype and device."""
    return (id(model), str(model.dtype), str(model.device))


# ------------------------------------------------------------------------------------------ image side
def _grey_resize(grey: np.ndarray, long_side: int) -> np.ndarray:
    new_h, new_w = preprocess_shape(grey.shape[0], grey.shape[1], long_side)
    return np.asarray(Image.fromarray(grey).resize((new_w, new_h), Image.BILINEAR))


@functools.cache
def _lookup_tables() -> tuple[np.ndarray, np.ndarray]:
    """Per channel, the normalised float32 value of every uint8 level, computed with the exact arithmetic of
    ``processing.clip_pixels`` (``float32(x * (1/255))`` then ``(x - mean) / std`` in float32) and
    ``processing.sam_pixels`` (``(float32(x) - mean) / std``), so a table lookup is bit-identical to them."""
    levels = np.arange(256, dtype=np.uint8)
    scaled = (levels * (1 / 255)).astype(np.float32)
    clip = np.stack([(scaled - np.float32(CLIP_MEAN[c])) / np.float32(CLIP_STD[c]) for c in range(3)]).astype(
        np.float32
    )
    as_float = torch.from_numpy(levels).float()
    sam = np.stack(
        [((as_float - torch.tensor(SAM_MEAN[c])) / torch.tensor(SAM_STD[c])).numpy() for c in range(3)]
    )
    return clip, sam


def grey_pixels(greys: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """CLIP ``[B,3,336,336]`` and SAM ``[B,3,256,256]`` inputs of same-size 8-bit grey images, in one pass.

    Bit-identical to ``processing.clip_pixels`` / ``sam_pixels`` of the grey image repeated to RGB (PIL resamples
    every band with the same arithmetic, so one band is resized and the per-channel constants broadcast), but
    the resize runs once per image instead of three times and the arithmetic once per batch.
    """
    shapes = {g.shape for g in greys}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"grey_pixels needs same-size 2D uint8 images, got shapes {sorted(shapes)}")
    clip_small = np.stack([_grey_resize(g, CLIP_SIZE) for g in greys])
    sam_small = np.stack([_grey_resize(g, SAM_SIZE) for g in greys])
    batch, (h, w), (sh, sw) = len(greys), clip_small.shape[1:], sam_small.shape[1:]
    clip_lut, sam_lut = _lookup_tables()
    # CLIP: pad the uint8 image with the per-channel fill, then the per-value normalisation table
    clip = np.empty((batch, 3, CLIP_SIZE, CLIP_SIZE), dtype=np.float32)
    top, left = (CLIP_SIZE - h) // 2, (CLIP_SIZE - w) // 2
    for c in range(3):
        clip[:, c] = clip_lut[c, CLIP_PAD_FILL[c]]
        clip[:, c, top : top + h, left : left + w] = clip_lut[c][clip_small]
    # SAM: normalise first, then centre pad with 0
    sam = torch.zeros((batch, 3, SAM_SIZE, SAM_SIZE), dtype=torch.float32)
    top, left = (SAM_SIZE - sh) // 2, (SAM_SIZE - sw) // 2
    for c in range(3):
        sam[:, c, top : top + sh, left : left + sw] = torch.from_numpy(sam_lut[c][sam_small])
    return torch.from_numpy(clip), sam, (int(sh), int(sw))


def _pixels(images: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    if all(img.ndim == 2 for img in images) and len({img.shape for img in images}) == 1:
        clip, sam, resize = grey_pixels(images)
        return clip, sam, [resize] * len(images)
    clip_in, sam_in, resizes = [], [], []
    for img in images:
        clip_in.append(clip_pixels(img))
        pixels, resize = sam_pixels(img)
        sam_in.append(pixels)
        resizes.append(resize)
    return torch.stack(clip_in), torch.stack(sam_in), resizes


@torch.no_grad()
def encode_images(
    model: MedPLIBForCausalLM,
    images: Sequence[np.ndarray],
    cache: FeatureCache | None = None,
    counts: PathCounts | None = None,
) -> list[SliceFeatures]:
    """CLIP features and SAM embeddings of 8-bit images; cache misses go through both encoders as one batch.

    ``images`` are uint8 RGB ``(H, W, 3)`` or grey ``(H, W)`` (= grey repeated to RGB, prepared faster; a grey
    image and its RGB copy have different cache keys). Identical images within the call are encoded once.
    """
    tag = model_tag(model)
    keys = [content_key(img, tag) for img in images]
    found: dict[str, SliceFeatures] = {}
    for key in dict.fromkeys(keys):
        hit = cache.get(key) if cache is not None else None
        if hit is not None:
            found[key] = hit
    missing = [k for k in dict.fromkeys(keys) if k not in found]
    if missing:
        first = [images[keys.index(k)] for k in missing]
        clip_in, sam_in, resizes = _pixels(first)
        device, dtype = model.device, model.dtype
        clip = model.clip_features(clip_in.to(device, dtype))
        sam = model.model.visual_model.encode_image(sam_in.to(device, dtype))
        for n, k in enumerate(missing):
            shape = (int(first[n].shape[0]), int(first[n].shape[1]))
            # clone: a view would keep the whole batch alive and under-count the cache's bytes
            feats = SliceFeatures(clip[n].clone(), sam[n].clone(), resizes[n], shape, k)
            found[k] = feats
            if cache is not None:
                cache.put(k, feats)
    if counts is not None:
        counts.encoded += len(missing)
        counts.cached += len(keys) - len(missing)
    return [found[k] for k in keys]


# ------------------------------------------------------------------------------------------ language side
def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True).strip()


@dataclass(frozen=True)
class PrefixState:
    """Per-layer keys / values ``[heads, P, head_dim]`` of the prompt rows up to ``<im_end>`` for one image.

    Causal attention makes these rows independent of the question that follows, so every question about the
    image can continue from them and prefill only its own tokens.
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]


def _prefix_ids(ids: Sequence[int]) -> tuple[int, ...] | None:
    """Prompt ids up to and including the token after the image (``<im_end>``), or None without an image."""
    ids = list(ids)
    if IMAGE_TOKEN_INDEX not in ids or ids.index(IMAGE_TOKEN_INDEX) + 1 >= len(ids) - 1:
        return None
    return tuple(ids[: ids.index(IMAGE_TOKEN_INDEX) + 2])


def _prefix_states(model, prefixes, clip_feats, image_keys, cache, counts) -> list[PrefixState]:
    keys = [f"prefix|{image_keys[b]}|{content_key(np.asarray(prefixes[b]))}" for b in range(len(prefixes))]
    found: dict[str, PrefixState] = {}
    for key in dict.fromkeys(keys):
        hit = cache.get(key) if cache is not None else None
        if hit is not None:
            found[key] = hit
    missing = [k for k in dict.fromkeys(keys) if k not in found]
    if missing:
        rows = [keys.index(k) for k in missing]
        embeds, mask = model.build_inputs_embeds([prefixes[b] for b in rows], clip_feats[rows])
        kv = model.llm_forward(embeds, mask, use_cache=True, last_logits_only=True).past_key_values
        for n, key in enumerate(missing):
            state = PrefixState(
                tuple(layer.keys[n].clone() for layer in kv.layers),
                tuple(layer.values[n].clone() for layer in kv.layers),
            )
            found[key] = state
            if cache is not None:
                cache.put(key, state)
    counts.prefix_computed += len(missing)
    counts.prefix_cached += len(keys) - len(missing)
    return [found[k] for k in keys]


def _last_states_from_prefix(model, prompt_ids, clip_feats, image_keys, cache, counts):
    """``(last hidden [B,H], last logits [B,V])`` continuing from per-image prefix states, or None when the prompts
    do not share one prefix length (then the caller prefills whole prompts)."""
    prefixes = [_prefix_ids(ids) for ids in prompt_ids]
    if any(p is None for p in prefixes) or len({len(p) for p in prefixes}) != 1:
        return None
    states = _prefix_states(model, prefixes, clip_feats, image_keys, cache, counts)
    rows = len(prefixes[0]) - 1 + clip_feats.shape[1]  # the image placeholder expands to 576 rows
    embeds, mask = model.build_inputs_embeds(prompt_ids, clip_feats, padding_side="right")
    suffix, suffix_mask = embeds[:, rows:], mask[:, rows:]
    kv = DynamicCache(config=model.model.config)
    for layer in range(len(states[0].keys)):
        kv.update(
            torch.stack([s.keys[layer] for s in states]),
            torch.stack([s.values[layer] for s in states]),
            layer,
        )
    full_mask = torch.cat([mask[:, :rows], suffix_mask], dim=1)
    out = model.llm_forward(suffix, full_mask, past_key_values=kv, use_cache=True)
    last = suffix_mask.sum(dim=1) - 1  # right padding: each prompt's own last row
    batch = torch.arange(len(prompt_ids), device=last.device)
    return out.hidden_states[batch, last], out.logits[batch, last]


@torch.no_grad()
def seg_states(
    model: MedPLIBForCausalLM,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    clip_feats: torch.Tensor,
    *,
    fast: bool = False,
    force_seg: bool = False,
    max_new_tokens: int = 64,
    counts: PathCounts | None = None,
    image_keys: Sequence[str] | None = None,
    cache: FeatureCache | None = None,
) -> list[SegState]:
    """The [SEG] state and answer of every prompt of a batch (``prompt_ids[b]`` goes with ``clip_feats[b]``).

    Args:
        model: the MedPLIB model.
        tokenizer: its :class:`~monai_medplib.tokenization.MedPLIBTokenizer`.
        prompt_ids: per sample the prompt ids with ``-200`` for the image (lengths may differ).
        clip_feats: ``[B, 576, C]`` CLIP features.
        fast: take the one-prefill shortcut where ``<SEG>`` is the argmax at the last prompt position.
        force_seg: force the answer ``<SEG></s>`` (random-weight models; no check).
        max_new_tokens: decoding budget of the ``generate`` path.
        counts: incremented per path.
        image_keys: per sample, the content key of its image; with it (and ``fast`` or ``force_seg``) the prompt
            rows up to ``<im_end>`` are prefilled once per image and kept in ``cache``, so another question about
            a seen image prefills only its own tokens.
        cache: where those prefix states live (bounded with the image features).
    """
    if len(prompt_ids) != clip_feats.shape[0]:
        raise ValueError(f"{len(prompt_ids)} prompts but {clip_feats.shape[0]} CLIP feature rows")
    seg_id = tokenizer.seg_id
    counts = counts if counts is not None else PathCounts()
    states: list[SegState | None] = [None] * len(prompt_ids)
    todo = list(range(len(prompt_ids)))
    if force_seg or fast:
        last = None
        if image_keys is not None:
            last = _last_states_from_prefix(model, prompt_ids, clip_feats, image_keys, cache, counts)
        if last is None:
            embeds, mask = model.build_inputs_embeds(prompt_ids, clip_feats, padding_side="left")
            out = model.llm_forward(embeds, mask, last_logits_only=True)
            last = out.hidden_states[:, -1], out.logits[:, -1]
        last_hidden, predicted = last[0], last[1].argmax(dim=-1)
        forced_answer = _decode(tokenizer, [seg_id, tokenizer.eos_id])
        todo = []
        for b in range(len(prompt_ids)):
            if force_seg:
                states[b] = SegState(last_hidden[b], forced_answer, "forced", [seg_id, tokenizer.eos_id])
                counts.forced += 1
            elif int(predicted[b]) == seg_id:
                states[b] = SegState(last_hidden[b], _decode(tokenizer, [seg_id]), "shortcut", [seg_id])
                counts.shortcut += 1
            else:
                todo.append(b)
    if todo:
        embeds, mask = model.build_inputs_embeds(
            [prompt_ids[b] for b in todo], clip_feats[todo], padding_side="left"
        )
        gen = model.greedy_generate(embeds, mask, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id)
        hidden = gen.seg_hidden_states(seg_id)
        for n, b in enumerate(todo):
            states[b] = SegState(hidden[n], _decode(tokenizer, gen.new_ids[n]), "generate", gen.new_ids[n])
        counts.generate += len(todo)
    return states  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ masks
@torch.no_grad()
def decode_masks(
    model: MedPLIBForCausalLM,
    hidden: torch.Tensor,
    features: Sequence[SliceFeatures],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[SEG] states ``[N, H]`` + the matching image features -> ``(low_res [N,1,64,64], probs [N,H,W], masks)``.

    All images must share one original size (slices of one volume); probabilities are fp32
    ``sigmoid(logits)`` at the original size after the release crop quirk, masks are ``probs > 0.1``.
    """
    sizes = {(f.resize, f.original_size) for f in features}
    if len(sizes) != 1:
        raise ValueError(f"decode_masks needs images of one size, got {sorted(sizes)}")
    resize, original = next(iter(sizes))
    text = model.seg_embeddings(hidden.to(model.dtype))[:, None]
    image = torch.stack([f.sam_embedding for f in features])
    low_res, _ = model.model.visual_model.decode(image, text_embeds=text)
    logits = postprocess_mask_logits(low_res.float(), resize, original)[:, 0]
    return low_res.float(), torch.sigmoid(logits), binarize(logits)
