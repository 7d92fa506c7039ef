"""Whole-volume grounding and region VQA for :class:`~monai_medplib.inference.MedPLIBPipeline`.

A volume (NIfTI / NRRD / DICOM folder path, or a channel-first MetaTensor) is normalised once to 8 bit
(SA-Med2D percentiles by default), cut into display-oriented 2D slices along a named anatomical plane
(``transforms.slicing``), grounded in batches (``fast_grounding``), and the 2D masks are written straight
back into label / probability volumes with the input's shape and affine. Slices are views of the one
normalised volume: no per-slice copy of the volume is made.

:class:`VolumeMixin` is the volume half of :class:`~monai_medplib.inference.MedPLIBPipeline`: it cuts, batches
and reassembles, and leaves every model step to the pipeline's primitives (``encode_images`` through the shared
feature cache, ``ground_features``, ``answer`` / ``answer_region``, ``refine``), so a slice seen by one method is
a cache hit for the others.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from tqdm.auto import tqdm

from .fast_grounding import PathCounts
from .processing import box_region_mask, point_region_mask
from .results import label_from_probs
from .tokenization import grounding_prompt
from .transforms.intensity import CT_WINDOWS, CTWindow, Passthrough8Bit, SAMed2DNormalize
from .transforms.prompts import MapPromptsToSliced
from .transforms.slicing import SliceGeometry, check_volume, slice_geometry, volume_affine_ras

__all__ = ["SliceGrounding", "VolumeGroundingResult", "VolumeMixin", "VolumeRegionAnswer", "prepare_volume"]

VolumeLike = str | Path | MetaTensor | torch.Tensor | np.ndarray
Intensity = str | Callable[[torch.Tensor], torch.Tensor]
PROGRESS_FROM_SLICES = 32  # progress bar by default from this many slices on

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ results
@dataclass
class SliceGrounding:
    """One text grounded on one slice, kept as the prior of click refinement: the parts of a
    :class:`~monai_medplib.results.GroundingResult` that ``refine`` reads, without the full-size probabilities.

    Attributes:
        mask: bool ``(H, W)`` in the slice's display orientation.
        low_res_logits: SAM logits ``[1, 64, 64]`` (fp32; a refinement's ``mask_input``).
        answer: the model's answer on this slice.
        has_seg: whether ``<SEG>`` was produced (no ``<SEG>`` = empty mask, release behaviour).
        seg_embedding: the ``<SEG>`` text prompt ``[256]`` (fp32) SAM decoded; refinement prompts with it again.
        token_ids: the answer's token ids.
    """

    mask: np.ndarray
    low_res_logits: torch.Tensor | None
    answer: str
    has_seg: bool
    seg_embedding: torch.Tensor | None = None
    token_ids: list[int] = field(default_factory=list)


@dataclass
class VolumeGroundingResult:
    """Output of :meth:`VolumeMixin.ground_volume`; volumes share the input's shape, affine and meta.

    Attributes:
        label: uint8 ``(1, X, Y, Z)``: ``label_names[text]`` where that text is the most probable grounded one.
        probs: float32 ``(T, X, Y, Z)``: channel ``t`` = sigmoid probability of ``texts[t]`` (0 off the slices);
            assembled on first access from the per-slice probabilities, so an interactive call on one slice of
            a large CT does not allocate and zero a dense float volume per text.
        label_names: ``{text: label value}`` (1-based, in the order given).
        answers: ``{text: {slice index: answer}}``.
        has_seg: ``{text: {slice index: bool}}``.
        slices: the slice indices grounded (along ``axis``).
        axis: the anatomical plane.
        paths: how many prompts took each [SEG] path and how many slices were encoded / found in the cache.
        slice_results: ``{(text, slice index): SliceGrounding}``.
    """

    label: MetaTensor
    label_names: dict[str, int]
    answers: dict[str, dict[int, str]]
    has_seg: dict[str, dict[int, bool]]
    slices: list[int]
    axis: str
    paths: dict[str, int]
    slice_results: dict[tuple[str, int], SliceGrounding] = field(default_factory=dict, repr=False)
    slice_probs: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)
    geometry: SliceGeometry | None = field(default=None, repr=False)

    @cached_property
    def probs(self) -> MetaTensor:
        probs = torch.zeros((len(self.label_names), *self.label.shape[1:]), dtype=torch.float32)
        for (t, index), slice_probs in self.slice_probs.items():
            self.geometry.put(probs[t : t + 1], slice_probs[None], index)
        return _like(probs, self.label)

    @property
    def mask(self) -> MetaTensor:
        """bool ``(1, X, Y, Z)``: any text grounded."""
        return self.label > 0


@dataclass
class VolumeRegionAnswer:
    """Output of :meth:`VolumeMixin.answer_volume_region`.

    Attributes:
        answer: the model's answer.
        slice_index: the slice the prompt was mapped to (along ``axis``).
        axis: the anatomical plane.
        region: bool ``(X, Y, Z)``: the region the model was given, back in voxel space.
        region_2d: bool ``(H, W)`` region on the slice (display orientation).
    """

    answer: str
    slice_index: int
    axis: str
    region: np.ndarray
    region_2d: np.ndarray


# ------------------------------------------------------------------------------------------ volume input
def _as_volume(volume: VolumeLike) -> MetaTensor:
    if isinstance(volume, str | Path):
        from .io.readers import load_volume  # lazy: ITK is slow to import

        return load_volume(volume)
    if isinstance(volume, np.ndarray):
        volume = torch.from_numpy(volume)
    if not isinstance(volume, torch.Tensor):
        raise TypeError(f"volume must be a path, MetaTensor, tensor or array, got {type(volume).__name__}")
    if not isinstance(volume, MetaTensor):
        if volume.ndim == 3:  # a bare (X, Y, Z) array: add the channel, identity affine
            volume = volume[None]
        volume = MetaTensor(volume)
    check_volume(volume, "volume")
    if volume.shape[0] != 1:
        raise ValueError(f"volume must have one channel (1, X, Y, Z), got shape {tuple(volume.shape)}")
    return volume


def _normaliser(intensity: Intensity) -> Callable[[torch.Tensor], torch.Tensor]:
    if callable(intensity):
        return intensity
    if intensity == "samed2d":
        return SAMed2DNormalize()
    if intensity in ("uint8", "none"):
        return Passthrough8Bit()
    if intensity in CT_WINDOWS:
        return CTWindow(intensity)
    raise ValueError(
        f"unknown intensity {intensity!r}: use 'samed2d', 'uint8', a CT window preset {sorted(CT_WINDOWS)} "
        "or a callable returning a uint8 volume"
    )


def prepare_volume(volume: VolumeLike, intensity: Intensity = "samed2d") -> tuple[MetaTensor, torch.Tensor]:
    """``(input volume as a MetaTensor, its uint8 (X, Y, Z) tensor)``; a uint8 volume is used as is."""
    vol = _as_volume(volume)
    if vol.dtype == torch.uint8 and intensity == "samed2d":
        intensity = "uint8"  # already 8-bit: the percentile stretch would change what the user sees
    eight_bit = _normaliser(intensity)(vol)
    eight_bit = eight_bit.as_tensor() if isinstance(eight_bit, MetaTensor) else torch.as_tensor(eight_bit)
    if eight_bit.dtype != torch.uint8 or tuple(eight_bit.shape) != tuple(vol.shape):
        raise ValueError(
            f"intensity mapping must return a uint8 volume of shape {tuple(vol.shape)}, "
            f"got {eight_bit.dtype} {tuple(eight_bit.shape)}"
        )
    return vol, eight_bit


class _VolumeMemo:
    """Remembers the last normalised volumes per source object (weakly) so interactive calls skip the percentiles.

    A tensor modified in place bumps its version counter and is normalised again.
    """

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._entries: list[tuple[Any, tuple, MetaTensor, torch.Tensor]] = []
        self._lock = threading.Lock()

    @staticmethod
    def _key(volume: Any, intensity: Intensity) -> tuple | None:
        if isinstance(volume, str | Path):
            path = Path(volume)
            if not path.exists():
                return None
            stat = path.stat()
            return ("path", str(path.resolve()), stat.st_mtime_ns, stat.st_size, repr(intensity))
        if isinstance(volume, torch.Tensor):
            return (
                "tensor",
                volume.data_ptr(),
                tuple(volume.shape),
                volume.stride(),
                volume._version,
                repr(intensity),
            )
        return None

    def get(self, volume: VolumeLike, intensity: Intensity) -> tuple[MetaTensor, torch.Tensor]:
        key = self._key(volume, intensity)
        with self._lock:
            for ref, k, vol, eight in self._entries:
                if k == key and (ref is None or ref() is volume):
                    return vol, eight
        vol, eight = prepare_volume(volume, intensity)
        if key is not None:
            ref = weakref.ref(volume) if isinstance(volume, torch.Tensor) else None
            with self._lock:
                self._entries = [(ref, key, vol, eight), *self._entries][: self.size]
        return vol, eight


def _grey(plane: torch.Tensor) -> np.ndarray:
    """The ``(H, W)`` uint8 array of a one-channel slice view (contiguous: flips / transposes are resolved here)."""
    return np.ascontiguousarray(plane[0].numpy())


def _check_slices(geometry: SliceGeometry, slices: Sequence[int] | None) -> list[int]:
    if slices is None:
        return list(range(geometry.num_slices))
    if isinstance(slices, int):
        slices = [slices]
    chosen = [geometry.check_index(i) for i in slices]
    if not chosen:
        raise ValueError("slices is empty: give slice indices or None for every slice")
    return list(dict.fromkeys(chosen))


def _texts(text: str | Sequence[str]) -> list[str]:
    texts = [text] if isinstance(text, str) else list(text)
    if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
        raise ValueError(f"text must be a non-empty string or a list of them, got {text!r}")
    if len(set(texts)) != len(texts):
        raise ValueError(f"texts must be distinct (each becomes one label), got {texts}")
    if len(texts) > 255:
        raise ValueError(f"at most 255 texts fit a uint8 label volume, got {len(texts)}")
    return texts


def _like(data: torch.Tensor, source: MetaTensor) -> MetaTensor:
    """A MetaTensor with ``source``'s affine and meta (the input geometry) around ``data``."""
    meta = {k: v for k, v in source.meta.items() if k != "affine"}
    return MetaTensor(data, affine=source.affine.clone(), meta=meta)


# ------------------------------------------------------------------------------------------ the mixin
class VolumeMixin:
    """Volume-level methods of ``MedPLIBPipeline`` (see the module docstring for what the pipeline provides)."""

    model: Any
    tokenizer: Any
    template: str

    def _volume_memo(self) -> _VolumeMemo:
        memo = getattr(self, "_volume_memo_store", None)
        if memo is None:
            memo = _VolumeMemo()
            self._volume_memo_store = memo
        return memo

    def _open(
        self, volume: VolumeLike, axis: str, intensity: Intensity
    ) -> tuple[MetaTensor, torch.Tensor, SliceGeometry]:
        vol, eight_bit = self._volume_memo().get(volume, intensity)
        geometry = slice_geometry(volume_affine_ras(vol), vol.shape[1:], axis)
        return vol, eight_bit, geometry

    # -- grounding
    @torch.no_grad()
    def ground_volume(
        self,
        volume: VolumeLike,
        text: str | Sequence[str],
        axis: str = "axial",
        slices: Sequence[int] | None = None,
        *,
        batch_size: int = 8,
        fast: bool = False,
        force_seg: bool = False,
        max_new_tokens: int = 64,
        intensity: Intensity = "samed2d",
        progress: bool | None = None,
        keep_slice_results: bool = True,
        seg_rule: str = "release",
    ) -> VolumeGroundingResult:
        """Ground one or several texts on every (or the listed) slice of a volume.

        Args:
            volume: NIfTI / NRRD file, DICOM series folder, or a channel-first ``(1, X, Y, Z)`` MetaTensor.
            text: one grounding request ("Please segment the liver.") or several (one label value each).
            axis: "axial", "coronal" or "sagittal".
            slices: slice indices along ``axis``; None = all.
            batch_size: slices per batch through CLIP / SAM / the LLM (the LLM batch is slices x texts).
            fast: opt-in one-prefill [SEG] shortcut, verified per slice (see ``fast_grounding``).
            force_seg: force the answer ``<SEG></s>`` on every slice (random-weight models, benchmarks).
            max_new_tokens: decoding budget where generation runs.
            intensity: "samed2d" (per-volume 0.5/99.5 percentiles), "uint8" (already 8-bit), a CT window
                preset name, or a callable mapping the volume to uint8.
            progress: tqdm bar; None = on from 32 slices.
            keep_slice_results: keep per-slice 2D masks, SAM logits and text prompts (refinement priors).
            seg_rule: which state of a generated answer is decoded, as in ``MedPLIBPipeline.ground``.

        Returns:
            :class:`VolumeGroundingResult` in the input's geometry.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        texts = _texts(text)
        vol, eight_bit, geometry = self._open(volume, axis, intensity)
        chosen = _check_slices(geometry, slices)
        prompts = [self.prompt_ids(t) for t in texts]
        counts = PathCounts()
        slice_probs: dict[tuple[int, int], torch.Tensor] = {}  # (text, slice) -> (H, W), display orientation
        answers: dict[str, dict[int, str]] = {t: {} for t in texts}
        has_seg: dict[str, dict[int, bool]] = {t: {} for t in texts}
        results: dict[tuple[str, int], SliceGrounding] = {}
        show = len(chosen) >= PROGRESS_FROM_SLICES if progress is None else progress
        bar = tqdm(total=len(chosen), desc=f"grounding {axis} slices", unit="slice", disable=not show)
        try:
            for start in range(0, len(chosen), batch_size):
                batch = chosen[start : start + batch_size]
                features = self.encode_images(
                    [_grey(geometry.take(eight_bit, i)) for i in batch], counts=counts
                )
                pairs = [(s, t) for s in range(len(batch)) for t in range(len(texts))]
                grounded = self.ground_features(
                    [features[s] for s, _ in pairs],
                    [prompts[t] for _, t in pairs],
                    fast=fast,
                    force_seg=force_seg,
                    max_new_tokens=max_new_tokens,
                    seg_rule=seg_rule,
                    counts=counts,
                )
                for (s, t), result in zip(pairs, grounded):
                    index, name = batch[s], texts[t]
                    answers[name][index] = result.answer
                    has_seg[name][index] = result.has_seg
                    if result.has_seg:
                        slice_probs[(t, index)] = torch.from_numpy(result.probs)
                    if keep_slice_results:
                        results[(name, index)] = SliceGrounding(
                            result.mask,
                            result.low_res_logits,
                            result.answer,
                            result.has_seg,
                            result.seg_embedding,
                            result.token_ids,
                        )
                bar.update(len(batch))
        finally:
            bar.close()
        label = _labels_from_slices(slice_probs, len(texts), geometry, tuple(vol.shape[1:]), chosen)
        for name in texts:
            if chosen and not any(has_seg[name].values()):
                # Usually a bare structure name: the model was trained on requests.
                logger.warning(
                    "no slice produced <SEG> for %r; MedPLIB grounds requests such as %r "
                    "(monai_medplib.tokenization.grounding_prompt turns names into them)",
                    name,
                    grounding_prompt(name) if name.strip() else "Please segment the liver.",
                )
        return VolumeGroundingResult(
            label=_like(label, vol),
            label_names={t: n + 1 for n, t in enumerate(texts)},
            answers=answers,
            has_seg=has_seg,
            slices=chosen,
            axis=axis,
            paths=counts.as_dict(),
            slice_results=results,
            slice_probs=slice_probs,
            geometry=geometry,
        )

    # -- region VQA and slice VQA
    @torch.no_grad()
    def answer_volume_region(
        self,
        volume: VolumeLike,
        question: str,
        points: Sequence[Sequence[float]] | None = None,
        roi: Sequence[float] | None = None,
        scribble: np.ndarray | torch.Tensor | None = None,
        axis: str = "axial",
        *,
        index: int | None = None,
        max_new_tokens: int = 256,
        intensity: Intensity = "samed2d",
    ) -> VolumeRegionAnswer:
        """Region VQA from 3D prompts: IJK ``points``, an IJK ``roi`` ``[i0, i1, j0, j1, k0, k1]`` or a
        ``scribble`` label volume, mapped to one slice of ``axis`` (``index``, else the points' slice, the
        ROI's middle slice, or the scribbles' middle slice). On that slice points become the demo's 41x41
        squares, the ROI a filled box, the scribble its own mask; their union is the region.

        Raises:
            ValueError: no prompt, a point outside the volume, points on different slices, an ROI outside the
                volume, or a scribble volume of another shape.
        """
        if points is None and roi is None and scribble is None:
            raise ValueError("answer_volume_region needs points=, roi= or scribble=")
        vol, eight_bit, geometry = self._open(volume, axis, intensity)
        if points is not None and len(points) == 0:
            raise ValueError("points is empty: give at least one (i, j, k) voxel")
        data = {"image": vol, "points": points, "roi": roi, "scribbles": scribble, "slice_index": index}
        mapped = MapPromptsToSliced(axis=axis)(data)
        index = int(mapped["slice_index"])
        shape = geometry.slice_shape
        region_2d = np.asarray(mapped["mask_2d"], dtype=bool).copy()
        if mapped["points_2d"]:
            region_2d |= point_region_mask(shape, mapped["points_2d"]).astype(bool)
        if mapped["box_2d"] is not None:
            region_2d |= box_region_mask(shape, mapped["box_2d"]).astype(bool)
        if not region_2d.any():
            raise ValueError(f"the prompt leaves no region on {axis} slice {index}")
        grey = _grey(geometry.take(eight_bit, index))
        answer = self.answer_region(grey, question, mask=region_2d, max_new_tokens=max_new_tokens)
        region = torch.zeros((1, *geometry.spatial_shape), dtype=torch.bool)
        geometry.put(region, torch.from_numpy(region_2d)[None], index)
        return VolumeRegionAnswer(answer, index, axis, region[0].numpy(), region_2d)

    @torch.no_grad()
    def answer_volume(
        self,
        volume: VolumeLike,
        question: str,
        index: int,
        axis: str = "axial",
        *,
        max_new_tokens: int = 256,
        intensity: Intensity = "samed2d",
    ) -> str:
        """VQA about one slice of a volume (features come from the cache when the slice was seen)."""
        _, eight_bit, geometry = self._open(volume, axis, intensity)
        grey = _grey(geometry.take(eight_bit, geometry.check_index(index)))
        return self.answer(grey, question, max_new_tokens=max_new_tokens)

    def refine_volume(
        self,
        volume: VolumeLike,
        index: int,
        points: Sequence[Sequence[float]],
        labels: Sequence[int],
        prior: Any = None,
        axis: str = "axial",
        *,
        intensity: Intensity = "samed2d",
    ) -> np.ndarray:
        """Click refinement on slice ``index``: IJK clicks are mapped to the slice and handed to the pipeline's
        2D ``refine``; the refined mask comes back as a bool ``(X, Y, Z)`` volume (zero off the slice)."""
        vol, eight_bit, geometry = self._open(volume, axis, intensity)
        index = geometry.check_index(index)
        mapped = MapPromptsToSliced(axis=axis)({"image": vol, "points": list(points), "slice_index": index})
        grey = _grey(geometry.take(eight_bit, index))
        result = self.refine(grey, mapped["points_2d"], list(labels), prior=prior)
        mask2d = np.asarray(getattr(result, "mask", result), dtype=bool)
        out = torch.zeros((1, *geometry.spatial_shape), dtype=torch.bool)
        geometry.put(out, torch.from_numpy(mask2d)[None], index)
        return out[0].numpy()


def _labels_from_slices(
    slice_probs: dict[tuple[int, int], torch.Tensor],
    num_texts: int,
    geometry: SliceGeometry,
    spatial: tuple[int, ...],
    slices: Sequence[int],
) -> torch.Tensor:
    """uint8 ``(1, X, Y, Z)``: 1-based index of the most probable text where it passes the release threshold.

    Only the grounded slices are visited (an interactive one-slice call stays cheap on a large volume).
    """
    by_slice: dict[int, dict[int, torch.Tensor]] = {}
    for (t, index), probs in slice_probs.items():
        by_slice.setdefault(index, {})[t] = probs
    label = torch.zeros((1, *spatial), dtype=torch.uint8)
    for index in slices:
        found = by_slice.get(index)
        if not found:
            continue  # no text produced <SEG> here: background
        blank = torch.zeros_like(next(iter(found.values())))
        stacked = torch.stack([found.get(t, blank) for t in range(num_texts)])
        geometry.put(label, label_from_probs(stacked)[None], index)
    return label
