"""Keyframe grounding of a volume (opt-in, beyond the release): the language model runs on key slices only.

Exact volume grounding runs CLIP, the LLM prefill / generation and ``text_hidden_fcs`` on every slice; at full
size the LLM is ~95 % of the cost. The ``<SEG>`` prompt embedding of one structure changes little between
neighbouring slices, so here the LLM path runs on *key* slices only (the first and last slice of the range and
every k-th between), and every slice is decoded by SAM-Med2D (its own image embedding) with the prompt embedding
of its neighbouring keys, nearest or linearly interpolated.

An adaptive check keeps it honest: the middle slice of each interval between two keys is decoded with both keys'
prompts; if the two masks disagree (Dice below ``check_dice``), or a key has no ``<SEG>`` or an empty mask while
the other has one, the middle slice becomes a key (its own LLM pass) and both halves are checked again. An
interval whose two keys both produced no ``<SEG>`` stays empty. Every slice records the path that produced it:
``"key"`` (an initial key, exact), ``"bisected"`` (made a key by the check, exact) or ``"propagated"``.

What this cannot see (the risks named in the results): a structure lying wholly between two keys that agree it is
absent, and slices past a structure's ends that inherit a neighbour's prompt while the check passed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..processing import binarize
from .features import ImageFeatures
from .grounding import seg_states
from .options import GroundingOptions
from .results import GroundingResult, PathCounts
from .runner import MedPLIBRunner

__all__ = [
    "INTERPOLATIONS",
    "KeyframeGrounding",
    "SLICE_PATHS",
    "ground_keyframes",
    "key_positions",
]

INTERPOLATIONS = ("nearest", "linear")
SLICE_PATHS = ("key", "bisected", "propagated")


@dataclass
class _Key:
    """The LLM's output on one key slice for one text, and the key's own mask."""

    embedding: torch.Tensor | None  # SAM prompt [256] (model dtype), None without <SEG>
    answer: str
    token_ids: list[int]
    decoded: tuple[torch.Tensor, torch.Tensor] | None = None  # (logits [H, W], low-res [1, 64, 64])

    @property
    def empty(self) -> bool:
        """No <SEG>, or a mask with no pixel over the release threshold."""
        return self.decoded is None or not bool(binarize(self.decoded[0]).any())


@dataclass
class KeyframeGrounding:
    """Per (text, slice): the 2D result and the path that produced it; plus how many LLM passes ran."""

    results: dict[tuple[int, int], GroundingResult] = field(default_factory=dict)
    paths: dict[tuple[int, int], str] = field(default_factory=dict)
    llm_passes: int = 0
    checks: int = 0


def key_positions(count: int, every: int) -> list[int]:
    """Positions (0-based, in slice order) of the initial keys: the first, every ``every``-th, and the last."""
    if every < 1:
        raise ValueError(f"keyframes must be >= 1, got {every}")
    if count < 1:
        return []
    return sorted({*range(0, count, every), count - 1})


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


class _Decoder:
    """SAM decoding of prompt embeddings on slices, with the release post-processing and threshold."""

    def __init__(self, runner: MedPLIBRunner, features: Callable[[int], ImageFeatures]) -> None:
        self.runner = runner
        self.features = features

    def __call__(self, jobs: Sequence[tuple[int, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(slice position, prompt [256])]`` -> per job ``(logits [H, W] fp32, low-res [1, 64, 64])``."""
        if not jobs:
            return []
        feats = [self.features(p) for p, _ in jobs]
        low_res, _ = self.runner.decode_text_prompts(feats, torch.stack([e for _, e in jobs]))
        return list(zip(self.runner.postprocess_batch(low_res, feats), low_res))


def _run_keys(
    runner: MedPLIBRunner,
    features: Callable[[int], ImageFeatures],
    pairs: Sequence[tuple[int, int]],
    prompts: Sequence[Sequence[int]],
    options: GroundingOptions,
    counts: PathCounts,
    batch_size: int,
) -> dict[tuple[int, int], _Key]:
    """The LLM path on ``(text, slice position)`` pairs, in batches: ``{pair: _Key}``."""
    out: dict[tuple[int, int], _Key] = {}
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        feats = [features(p) for _, p in chunk]
        states = seg_states(runner, feats, [prompts[t] for t, _ in chunk], options, counts=counts)
        with_seg = [n for n, s in enumerate(states) if s.has_seg]
        embeds = (
            runner.seg_embeddings(torch.stack([states[n].hidden for n in with_seg])) if with_seg else None
        )
        for n, (pair, state) in enumerate(zip(chunk, states)):
            embedding = embeds[with_seg.index(n)] if n in with_seg else None
            out[pair] = _Key(embedding, runner.decode_text(state.new_ids), list(state.new_ids))
    return out


@torch.no_grad()
def ground_keyframes(
    runner: MedPLIBRunner,
    slice_pixels: Callable[[int], np.ndarray],
    count: int,
    prompts: Sequence[Sequence[int]],
    every: int,
    options: GroundingOptions,
    *,
    check_dice: float = 0.9,
    interpolation: str = "nearest",
    batch_size: int = 8,
    counts: PathCounts | None = None,
) -> KeyframeGrounding:
    """Ground ``prompts`` (one per text) on ``count`` slices with the LLM on key slices only (module docstring).

    Args:
        runner: the model.
        slice_pixels: position (0..count-1, in slice order) -> the slice's 8-bit image.
        count: number of slices.
        prompts: model ids of each text's request.
        every: initial key spacing k (first, last and every k-th slice).
        options: decoding of the key slices (as exact grounding).
        check_dice: masks of an interval's middle slice under both keys' prompts must agree at least this much.
        interpolation: ``"nearest"`` key's prompt, or ``"linear"`` between the two keys.
        batch_size: slices per encoder / LLM / decoder batch.
        counts: incremented with the [SEG] paths and encoder use (keys only run the LLM).

    Returns:
        Results keyed by ``(text index, slice position)``.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if not 0.0 <= check_dice <= 1.0:
        raise ValueError(f"check_dice must be in [0, 1], got {check_dice}")
    counts = counts if counts is not None else PathCounts()
    out = KeyframeGrounding()
    cache: dict[int, ImageFeatures] = {}

    def features(position: int) -> ImageFeatures:
        return cache[position]

    def encode(positions: Sequence[int], with_clip: bool) -> None:
        todo = [p for p in positions if p not in cache or (with_clip and not cache[p].has_clip)]
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            encoded = runner.encode_images(
                [slice_pixels(p) for p in chunk], with_clip=with_clip, counts=counts
            )
            cache.update(zip(chunk, encoded))

    decode = _Decoder(runner, features)
    texts = range(len(prompts))
    keys: dict[tuple[int, int], _Key] = {}

    def run_keys(pairs: list[tuple[int, int]]) -> None:
        encode(sorted({p for _, p in pairs}), with_clip=True)
        new = _run_keys(runner, features, pairs, prompts, options, counts, batch_size)
        seg = [pair for pair, key in new.items() if key.embedding is not None]
        for start in range(0, len(seg), batch_size):
            chunk = seg[start : start + batch_size]
            for pair, decoded in zip(chunk, decode([(p, new[(t, p)].embedding) for t, p in chunk])):
                new[pair].decoded = decoded
        keys.update(new)
        out.llm_passes += len(pairs)

    initial = key_positions(count, every)
    run_keys([(t, p) for p in initial for t in texts])
    encode(range(count), with_clip=False)
    for t in texts:
        for p in initial:
            out.paths[(t, p)] = "key"

    # adaptive check, breadth first: every round decodes all pending intervals' middles, then runs the LLM on the
    # middles that failed, for all texts in one batch
    pending = [(t, a, b) for t in texts for a, b in zip(initial, initial[1:]) if b - a > 1]
    accepted: list[tuple[int, int, int]] = []
    while pending:
        jobs, decided = [], []
        for t, a, b in pending:
            ka, kb = keys[(t, a)], keys[(t, b)]
            if ka.embedding is None and kb.embedding is None:
                accepted.append((t, a, b))  # both keys say absent: the interval stays empty
            elif ka.empty or kb.empty:
                decided.append((t, a, b, False))  # a key without <SEG> or without mask: look closer
            else:
                mid = (a + b) // 2
                jobs += [(mid, ka.embedding), (mid, kb.embedding)]
                decided.append((t, a, b, None))
        masks = iter(decode(jobs))
        split: list[tuple[int, int, int]] = []
        for t, a, b, verdict in decided:
            if verdict is None:
                out.checks += 1
                mask_a, mask_b = binarize(next(masks)[0]), binarize(next(masks)[0])
                verdict = _dice(mask_a, mask_b) >= check_dice
            (accepted if verdict else split).append((t, a, b))
        run_keys([(t, (a + b) // 2) for t, a, b in split])
        pending = []
        for t, a, b in split:
            mid = (a + b) // 2
            out.paths[(t, mid)] = "bisected"
            pending += [(t, lo, hi) for lo, hi in ((a, mid), (mid, b)) if hi - lo > 1]

    # every slice's mask: keys with their own prompt (decoded already), interiors of accepted intervals with the
    # propagated one
    for (t, p), key in keys.items():
        if key.decoded is None:
            out.results[(t, p)] = GroundingResult.empty(cache[p].original_size, key.answer, key.token_ids)
        else:
            logits, low_res = key.decoded
            out.results[(t, p)] = GroundingResult.from_logits(
                logits, key.answer, key.token_ids, low_res, seg_embedding=key.embedding
            )
    jobs, owners = [], []
    for t, a, b in accepted:
        ka, kb = keys[(t, a)], keys[(t, b)]
        for p in range(a + 1, b):
            out.paths[(t, p)] = "propagated"
            near = ka if p - a <= b - p else kb
            if ka.embedding is None and kb.embedding is None:
                out.results[(t, p)] = GroundingResult.empty(cache[p].original_size, near.answer, [])
                continue
            if interpolation == "linear":
                w = (p - a) / (b - a)
                embedding = ((1 - w) * ka.embedding.float() + w * kb.embedding.float()).to(ka.embedding.dtype)
            else:
                embedding = near.embedding
            jobs.append((p, embedding))
            owners.append((t, p, near))
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        for (t, p, key), (logits, low_res), (_, embedding) in zip(
            owners[start : start + batch_size], decode(chunk), chunk
        ):
            out.results[(t, p)] = GroundingResult.from_logits(
                logits, key.answer, key.token_ids, low_res, seg_embedding=embedding
            )
    return out
