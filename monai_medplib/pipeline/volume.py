"""Volume calls as functions of a runner: grounding on every slice, region VQA and VQA on a slice, refinement.

A volume (NIfTI / NRRD / DICOM folder path, or a channel-first MetaTensor) is read and normalised once to 8 bit
(SA-Med2D percentiles by default; kept in the runner's volume cache), cut into display-oriented 2D slices along a
named anatomical plane (:mod:`~monai_medplib.transforms.slicing`), grounded in batches
(:func:`~monai_medplib.pipeline.grounding.ground_features`), and the 2D masks are written straight back into label
/ probability volumes with the input's shape and affine. Slices are views of the one normalised volume: no
per-slice copy of the volume is made. Every model step goes through the runner's primitives and the shared
feature cache, so a slice seen by one call is a cache hit for the others.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from tqdm.auto import tqdm

from ..processing import box_region_mask, point_region_mask
from ..tokenization import grounding_prompt
from ..transforms.intensity import volume_intensity
from ..transforms.prompts import MapPromptsToSliced
from ..transforms.slicing import SliceGeometry, check_volume, slice_geometry, volume_affine_ras
from ..user_input import parse_keyframes
from .grounding import ground_features
from .image import answer_batch, answer_region
from .keyframes import ground_keyframes
from .options import AnswerOptions, GroundingOptions
from .refinement import refine_grounding
from .results import (
    GroundingResult,
    PathCounts,
    SliceGrounding,
    VolumeGroundingResult,
    VolumeRegionAnswer,
    label_from_probs,
)
from .runner import MedPLIBRunner

__all__ = [
    "answer_volume",
    "answer_volume_region",
    "ground_volume",
    "prepare_volume",
    "prepared",
    "refine_volume",
]

VolumeLike = str | Path | MetaTensor | torch.Tensor | np.ndarray
Intensity = str | Callable[[torch.Tensor], torch.Tensor]
PROGRESS_FROM_SLICES = 32  # progress bar by default from this many slices on

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ volume input
def _as_volume(volume: VolumeLike) -> MetaTensor:
    if isinstance(volume, str | Path):
        from ..io.readers import load_volume  # lazy: ITK is slow to import

        return load_volume(volume)
    if isinstance(volume, np.ndarray):  # a flipped view or big-endian data: torch takes neither as it is
        volume = torch.from_numpy(np.ascontiguousarray(volume, dtype=volume.dtype.newbyteorder("=")))
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


def prepare_volume(volume: VolumeLike, intensity: Intensity = "samed2d") -> tuple[MetaTensor, torch.Tensor]:
    """``(input volume as a MetaTensor, its uint8 (X, Y, Z) tensor)``; a uint8 volume is used as is."""
    vol = _as_volume(volume)
    eight_bit = volume_intensity(intensity, vol.dtype)(vol)
    eight_bit = eight_bit.as_tensor() if isinstance(eight_bit, MetaTensor) else torch.as_tensor(eight_bit)
    if eight_bit.dtype != torch.uint8 or tuple(eight_bit.shape) != tuple(vol.shape):
        raise ValueError(
            f"intensity mapping must return a uint8 volume of shape {tuple(vol.shape)}, "
            f"got {eight_bit.dtype} {tuple(eight_bit.shape)}"
        )
    return vol, eight_bit


def _grey(plane: torch.Tensor) -> np.ndarray:
    """The ``(H, W)`` uint8 array of a one-channel slice view (contiguous: flips / transposes are resolved here)."""
    return np.ascontiguousarray(plane[0].numpy())


def _check_slices(geometry: SliceGeometry, slices: Sequence[int] | None) -> list[int]:
    if slices is None:
        return list(range(geometry.num_slices))
    if isinstance(slices, numbers.Integral):
        slices = [int(slices)]
    chosen = [geometry.check_index(i) for i in slices]
    if not chosen:
        raise ValueError("slices is empty: give slice indices or None for every slice")
    return list(dict.fromkeys(chosen))


def _requests(text: str | Sequence[str]) -> dict[str, str]:
    """``{text as given: the request the model gets}``; structure names become the trained request."""
    if not isinstance(text, str) and not (isinstance(text, Sequence) and not isinstance(text, bytes)):
        raise ValueError(f"text must be a non-empty string or a list of them, got {text!r}")
    texts = [text] if isinstance(text, str) else list(text)
    if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
        raise ValueError(f"text must be a non-empty string or a list of them, got {text!r}")
    if len(set(texts)) != len(texts):
        raise ValueError(f"texts must be distinct (each becomes one label), got {texts}")
    if len(texts) > 255:
        raise ValueError(f"at most 255 texts fit a uint8 label volume, got {len(texts)}")
    requests = {t: grounding_prompt(t) for t in texts}
    seen: dict[str, str] = {}
    for t, request in requests.items():
        if request in seen:
            raise ValueError(f"texts {seen[request]!r} and {t!r} ask for the same thing ({request!r})")
        seen[request] = t
    return requests


def _like(data: torch.Tensor, source: MetaTensor) -> MetaTensor:
    """A MetaTensor with ``source``'s affine and meta (the input geometry) around ``data``."""
    meta = {k: v for k, v in source.meta.items() if k != "affine"}
    return MetaTensor(data, affine=source.affine.clone(), meta=meta)


def prepared(
    runner: MedPLIBRunner, volume: VolumeLike, intensity: Intensity = "samed2d"
) -> tuple[MetaTensor, torch.Tensor]:
    """:func:`prepare_volume` through the runner's volume cache: read and normalised once per source, once even
    when several threads ask at the same time (a server can warm it before taking the model lock)."""
    return runner.volume_cache.get(volume, lambda: prepare_volume(volume, intensity), intensity)


def _open(
    runner: MedPLIBRunner, volume: VolumeLike, axis: str, intensity: Intensity
) -> tuple[MetaTensor, torch.Tensor, SliceGeometry]:
    vol, eight_bit = prepared(runner, volume, intensity)
    geometry = slice_geometry(volume_affine_ras(vol), vol.shape[1:], axis)
    return vol, eight_bit, geometry


# ------------------------------------------------------------------------------------------ calls
def _exact(
    runner: MedPLIBRunner,
    pixels: Callable[[int], np.ndarray],
    count: int,
    prompts: list[list[int]],
    options: GroundingOptions,
    counts: PathCounts,
    batch_size: int,
    bar: tqdm,
) -> Iterator[tuple[int, int, GroundingResult]]:
    """The release's way: every slice through CLIP, the LLM and SAM; yields ``(text, position, result)``."""
    for start in range(0, count, batch_size):
        batch = range(start, min(start + batch_size, count))
        features = runner.encode_images([pixels(p) for p in batch], counts=counts)
        pairs = [(s, t) for s in range(len(batch)) for t in range(len(prompts))]
        grounded = ground_features(
            runner, [features[s] for s, _ in pairs], [prompts[t] for _, t in pairs], options, counts
        )
        for (s, t), result in zip(pairs, grounded):
            yield t, batch[s], result
        bar.update(len(batch))


@torch.no_grad()
def ground_volume(
    runner: MedPLIBRunner,
    volume: VolumeLike,
    text: str | Sequence[str],
    axis: str = "axial",
    slices: Sequence[int] | None = None,
    *,
    batch_size: int = 8,
    intensity: Intensity = "samed2d",
    progress: bool | None = None,
    keep_slice_results: bool = True,
    options: GroundingOptions | None = None,
    keyframes: int | None = None,
    keyframe_check: float = 0.9,
    keyframe_interpolation: str = "nearest",
) -> VolumeGroundingResult:
    """Ground one or several texts on every (or the listed) slice of a volume.

    Args:
        runner: the model.
        volume: NIfTI / NRRD file, DICOM series folder, or a channel-first ``(1, X, Y, Z)`` MetaTensor.
        text: a structure name ("liver", becomes "Please segment the liver."), a request, or several of them
            (one label value each, in the order given); results are keyed by the texts as given.
        axis: "axial", "coronal" or "sagittal".
        slices: slice indices along ``axis``; None = all.
        batch_size: slices per batch through CLIP / SAM / the LLM (the LLM batch is slices x texts).
        intensity: "samed2d" (per-volume 0.5/99.5 percentiles), "uint8" (already 8-bit), a CT window
            preset name, or a callable mapping the volume to uint8.
        progress: tqdm bar; None = on from 32 slices.
        keep_slice_results: keep per-slice 2D masks, SAM logits and text prompts (refinement priors).
        options: decoding (default :meth:`GroundingOptions.for_volume`): ``fast`` (the checked one-prefill
            shortcut), ``force_seg`` (random-weight models, benchmarks), ``seg_rule``, ``max_new_tokens``.
        keyframes: opt-in (beyond the release): run the LLM on every k-th slice (plus the ends and the slices
            the adaptive check adds) and decode the others with their neighbouring keys' prompt embedding
            (:mod:`~monai_medplib.pipeline.keyframes`); None = exact, every slice (the release's way).
        keyframe_check: Dice two neighbouring keys' prompts must reach on their interval's middle slice.
        keyframe_interpolation: "nearest" key's prompt or "linear" between the two keys.

    Returns:
        :class:`~monai_medplib.pipeline.results.VolumeGroundingResult` in the input's geometry.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if keyframes is not None:  # True / 2.5 / "x" are refused, not read as 1 or a type error
        keyframes = parse_keyframes(keyframes, "keyframes", allow_off=False)
    requests = _requests(text)
    texts = list(requests)
    opts = GroundingOptions.for_volume() if options is None else options
    vol, eight_bit, geometry = _open(runner, volume, axis, intensity)
    chosen = _check_slices(geometry, slices)
    prompts = [runner.prompt_ids(requests[t]) for t in texts]
    counts = PathCounts()

    def pixels(position: int) -> np.ndarray:
        return _grey(geometry.take(eight_bit, chosen[position]))

    slice_paths: dict[str, dict[int, str]] = {}
    if keyframes is None:
        show = len(chosen) >= PROGRESS_FROM_SLICES if progress is None else progress
        bar = tqdm(total=len(chosen), desc=f"grounding {axis} slices", unit="slice", disable=not show)
        with bar:
            grounded = list(_exact(runner, pixels, len(chosen), prompts, opts, counts, batch_size, bar))
    else:
        # keys and propagation follow the volume's order, not the order the slices were listed in
        chosen = sorted(chosen)
        kf = ground_keyframes(
            runner,
            pixels,
            len(chosen),
            prompts,
            keyframes,
            opts,
            check_dice=keyframe_check,
            interpolation=keyframe_interpolation,
            batch_size=batch_size,
            counts=counts,
        )
        grounded = [
            (t, p, result) for (t, p), result in sorted(kf.results.items(), key=lambda kv: kv[0][::-1])
        ]
        for (t, p), path in kf.paths.items():
            slice_paths.setdefault(texts[t], {})[chosen[p]] = path
    slice_probs: dict[tuple[int, int], torch.Tensor] = {}  # (text, slice) -> (H, W), display orientation
    answers: dict[str, dict[int, str]] = {t: {} for t in texts}
    has_seg: dict[str, dict[int, bool]] = {t: {} for t in texts}
    results: dict[tuple[str, int], SliceGrounding] = {}
    for t, position, result in grounded:
        index, name = chosen[position], texts[t]
        if slice_paths.get(name, {}).get(index) != "propagated":  # a propagated slice said nothing itself
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
    label = _labels_from_slices(slice_probs, len(texts), geometry, tuple(vol.shape[1:]), chosen)
    for name in texts:
        if chosen and not any(has_seg[name].values()):
            logger.info("%r: no slice produced <SEG>; not found on the %d %s slices", name, len(chosen), axis)
    paths = counts.as_dict()
    if keyframes is not None:
        paths.update(keyframes=keyframes, keyframe_checks=kf.checks)
    return VolumeGroundingResult(
        label=_like(label, vol),
        label_names={t: n + 1 for n, t in enumerate(texts)},
        answers=answers,
        has_seg=has_seg,
        slices=chosen,
        axis=axis,
        paths=paths,
        requests=requests,
        slice_results=results,
        slice_probs=slice_probs,
        geometry=geometry,
        slice_paths=slice_paths,
    )


@torch.no_grad()
def answer_volume_region(
    runner: MedPLIBRunner,
    volume: VolumeLike,
    question: str,
    points: Sequence[Sequence[float]] | None = None,
    roi: Sequence[float] | None = None,
    scribble: np.ndarray | torch.Tensor | None = None,
    axis: str = "axial",
    *,
    index: int | None = None,
    intensity: Intensity = "samed2d",
    options: AnswerOptions | None = None,
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
    vol, eight_bit, geometry = _open(runner, volume, axis, intensity)
    if points is not None and len(points) == 0:
        raise ValueError("points is empty: give at least one (i, j, k) voxel")
    if points is not None and not all(isinstance(p, Sequence | np.ndarray) and len(p) == 3 for p in points):
        raise ValueError(
            f"points must be a list of (i, j, k) voxels, e.g. [(60, 57, 64)]; got {points!r:.80}"
        )
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
    opts = AnswerOptions.for_volume() if options is None else options
    answer = answer_region(runner, grey, question, mask=region_2d, options=opts)
    region = torch.zeros((1, *geometry.spatial_shape), dtype=torch.bool)
    geometry.put(region, torch.from_numpy(region_2d)[None], index)
    return VolumeRegionAnswer(answer, index, axis, region[0].numpy(), region_2d)


@torch.no_grad()
def answer_volume(
    runner: MedPLIBRunner,
    volume: VolumeLike,
    question: str,
    index: int,
    axis: str = "axial",
    *,
    intensity: Intensity = "samed2d",
    options: AnswerOptions | None = None,
) -> str:
    """VQA about one slice of a volume (features come from the cache when the slice was seen)."""
    _, eight_bit, geometry = _open(runner, volume, axis, intensity)
    grey = _grey(geometry.take(eight_bit, geometry.check_index(index)))
    opts = AnswerOptions.for_volume() if options is None else options
    return answer_batch(runner, [grey], [question], opts)[0]


def refine_volume(
    runner: MedPLIBRunner,
    volume: VolumeLike,
    index: int,
    points: Sequence[Sequence[float]],
    labels: Sequence[int],
    prior: Any = None,
    axis: str = "axial",
    *,
    intensity: Intensity = "samed2d",
) -> np.ndarray:
    """Click refinement on slice ``index``: IJK clicks are mapped to the slice and refined in 2D
    (:func:`~monai_medplib.pipeline.refinement.refine_grounding`); the refined mask comes back as a bool
    ``(X, Y, Z)`` volume (zero off the slice)."""
    vol, eight_bit, geometry = _open(runner, volume, axis, intensity)
    index = geometry.check_index(index)
    mapped = MapPromptsToSliced(axis=axis)({"image": vol, "points": list(points), "slice_index": index})
    grey = _grey(geometry.take(eight_bit, index))
    result = refine_grounding(runner, grey, mapped["points_2d"], list(labels), prior=prior)
    mask2d = np.asarray(result.mask, dtype=bool)
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
