"""``MedPLIBPipeline``: the user-facing face of the pipeline, one line per call.

Every method hands over to a function of :mod:`~monai_medplib.pipeline.image`,
:mod:`~monai_medplib.pipeline.refinement` or :mod:`~monai_medplib.pipeline.volume`; the batched primitives are
inherited from :class:`~monai_medplib.pipeline.runner.MedPLIBRunner`. Decoding settings come as ``options=``
(:class:`~monai_medplib.pipeline.options.AnswerOptions` / ``GroundingOptions``) or as the same fields in keywords
(``fast=True``, ``max_new_tokens=64``), keywords winning. Defaults follow the official evaluation: greedy decoding,
up to 1024 new tokens on 2D calls, the ``vicuna_v1`` template.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from ..checkpoint import load_medplib, resolve_model_path
from ..devices import resolve_device, resolve_dtype
from ..processing import MaskLike
from . import image as image_calls
from . import refinement as refine_calls
from . import volume as volume_calls
from .cache import VolumeCache
from .options import AnswerOptions, GroundingOptions
from .results import GroundingResult, VolumeGroundingResult, VolumeRegionAnswer
from .runner import InputImage, MedPLIBRunner

__all__ = ["MedPLIBPipeline"]


def _options(cls: type[AnswerOptions], base: AnswerOptions, options: Any, overrides: dict) -> Any:
    return cls.merge(base if options is None else options, **overrides)


class MedPLIBPipeline(MedPLIBRunner):
    """MedPLIB inference on 2D images (path, PIL image, numpy ``(H, W)`` / ``(H, W, 3)``, uint8 or float) and on
    volumes (NIfTI / NRRD path, DICOM series folder, channel-first MetaTensor).

    Build it with :meth:`from_pretrained` (``"demo"`` or a model directory), or from a loaded model and tokenizer
    (arguments as :class:`~monai_medplib.pipeline.runner.MedPLIBRunner`).
    """

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path = "demo",
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        template: str = "vicuna_v1",
        volume_cache: VolumeCache | None = None,
        quantization: str | None = None,
        device_map: str | dict[str, Any] | None = None,
        **load_kwargs: Any,
    ) -> MedPLIBPipeline:
        """Load a MedPLIB model directory strictly (``load_kwargs`` go to :func:`~monai_medplib.checkpoint.load_medplib`).

        ``device`` defaults to CUDA when available, else CPU; ``dtype`` to bfloat16 on CUDA, float32 on CPU;
        ``volume_cache`` sizes the store of prepared volumes (a server keeps as many as it serves).
        ``quantization="int8"`` / ``"int4"`` quantises the LLM's linear layers while loading (the ``quant`` extra;
        the LLM then computes in bfloat16, CLIP and SAM-Med2D in ``dtype``); it happens at every load, as no safe
        file format holds quantised weights. ``device_map`` (instead of ``device``) places the model's units on
        several devices: ``"auto"`` or a dict such as ``{"vision": "cuda:0", "sam": "cuda:0", "seg_head":
        "cuda:0", "embed": "cuda:0", "layers.0-15": "cuda:0", "layers.16-31": "cuda:1", "head": "cuda:1"}``
        (see :mod:`~monai_medplib.modeling.placement`). Both are checked before any weight is read.
        """
        path = resolve_model_path(path)
        if device_map is not None and device is not None:
            raise ValueError(f"give device ({device!r}) or device_map, not both")
        device = resolve_device(device)
        model, _, tokenizer = load_medplib(
            path,
            dtype=resolve_dtype(dtype, device),
            device=device,
            quantization=quantization,
            device_map=device_map,
            **load_kwargs,
        )
        if tokenizer is None:
            raise FileNotFoundError(f"{path} is not a complete MedPLIB checkpoint: no tokenizer.model in it")
        return cls(model, tokenizer, template=template, volume_cache=volume_cache)

    # ------------------------------------------------------------------------------------------ 2D
    def answer(
        self, image: InputImage, question: str, options: AnswerOptions | None = None, **overrides: Any
    ) -> str:
        """Answer a question about the whole image (VQA)."""
        return image_calls.answer_batch(self, [image], [question], AnswerOptions.merge(options, **overrides))[
            0
        ]

    def answer_batch(
        self,
        images: Sequence[InputImage],
        questions: Sequence[str],
        options: AnswerOptions | None = None,
        **overrides: Any,
    ) -> list[str]:
        """:meth:`answer` for several (image, question) pairs in one left-padded batch."""
        return image_calls.answer_batch(self, images, questions, AnswerOptions.merge(options, **overrides))

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
        options: AnswerOptions | None = None,
        **overrides: Any,
    ) -> str:
        """Answer a question about a region given as ``mask``, ``points`` ((x, y) pixels) or ``box``
        (``(x0, y0, x1, y1)``); see :func:`~monai_medplib.pipeline.image.answer_region_batch`."""
        return image_calls.answer_region(
            self,
            image,
            question,
            mask=mask,
            points=points,
            box=box,
            options=AnswerOptions.merge(options, **overrides),
            official_eval_region=official_eval_region,
            keep_largest_component=keep_largest_component,
        )

    def answer_region_batch(
        self,
        images: Sequence[InputImage],
        questions: Sequence[str],
        regions: Sequence[MaskLike | Sequence[MaskLike]],
        *,
        official_eval_region: bool = False,
        keep_largest_component: bool = False,
        options: AnswerOptions | None = None,
        **overrides: Any,
    ) -> list[str]:
        """:meth:`answer_region` for several (image, question, region mask or masks) triples in one batch."""
        return image_calls.answer_region_batch(
            self,
            images,
            questions,
            regions,
            AnswerOptions.merge(options, **overrides),
            official_eval_region=official_eval_region,
            keep_largest_component=keep_largest_component,
        )

    def ground(
        self, image: InputImage, text: str, options: GroundingOptions | None = None, **overrides: Any
    ) -> GroundingResult:
        """Segment what ``text`` asks for: generate, take the ``<SEG>`` state, decode it with SAM-Med2D.

        Release behaviour by default (see :class:`~monai_medplib.pipeline.options.GroundingOptions`): only the
        first ``<SEG>`` is decoded with the release selection rule; no ``<SEG>`` -> empty mask, ``has_seg=False``.
        """
        return image_calls.ground_batch(self, [image], [text], GroundingOptions.merge(options, **overrides))[
            0
        ]

    def ground_batch(
        self,
        images: Sequence[InputImage],
        texts: Sequence[str],
        options: GroundingOptions | None = None,
        **overrides: Any,
    ) -> list[GroundingResult]:
        """:meth:`ground` for several (image, text) pairs: one generation batch, one SAM decoder batch."""
        return image_calls.ground_batch(self, images, texts, GroundingOptions.merge(options, **overrides))

    def refine(
        self,
        image: InputImage,
        points: Sequence[Sequence[float]],
        labels: Sequence[int],
        prior: Any = None,
        text: str | None = None,
        options: GroundingOptions | None = None,
        **overrides: Any,
    ) -> GroundingResult:
        """Refine a grounded mask with clicks (beyond the release; opt-in); see
        :func:`~monai_medplib.pipeline.refinement.refine_grounding`. ``points`` are every click so far as
        ``(x, y)`` pixels, ``labels`` 1 positive / 0 negative; ``prior`` a previous result of this image; ``text``
        is grounded first (with ``options``) when no prior is given."""
        if overrides and (prior is not None or not text):
            raise ValueError(f"options {sorted(overrides)} only apply when text is grounded (no prior given)")
        opts = GroundingOptions.merge(options, **overrides) if options is not None or overrides else None
        return refine_calls.refine_grounding(self, image, points, labels, prior, text, opts)

    # ------------------------------------------------------------------------------------------ volumes
    def prepare_volume(
        self, volume: volume_calls.VolumeLike, intensity: volume_calls.Intensity = "samed2d"
    ) -> tuple[MetaTensor, torch.Tensor]:
        """Read and normalise a volume into the volume cache ahead of the calls that will use it; returns
        ``(volume as MetaTensor, its uint8 (X, Y, Z) copy)``; see :func:`~monai_medplib.pipeline.volume.prepared`."""
        return volume_calls.prepared(self, volume, intensity)

    def ground_volume(
        self,
        volume: volume_calls.VolumeLike,
        text: str | Sequence[str],
        axis: str = "axial",
        slices: Sequence[int] | None = None,
        *,
        batch_size: int = 8,
        intensity: volume_calls.Intensity = "samed2d",
        progress: bool | None = None,
        keep_slice_results: bool = True,
        keyframes: int | None = None,
        keyframe_check: float = 0.9,
        keyframe_interpolation: str = "nearest",
        options: GroundingOptions | None = None,
        **overrides: Any,
    ) -> VolumeGroundingResult:
        """Ground structure names or requests on every (or the listed) slice; ``keyframes=k`` (opt-in) runs the
        LLM on key slices only; see :func:`~monai_medplib.pipeline.volume.ground_volume`."""
        return volume_calls.ground_volume(
            self,
            volume,
            text,
            axis,
            slices,
            batch_size=batch_size,
            intensity=intensity,
            progress=progress,
            keep_slice_results=keep_slice_results,
            options=_options(GroundingOptions, GroundingOptions.for_volume(), options, overrides),
            keyframes=keyframes,
            keyframe_check=keyframe_check,
            keyframe_interpolation=keyframe_interpolation,
        )

    def answer_volume_region(
        self,
        volume: volume_calls.VolumeLike,
        question: str,
        points: Sequence[Sequence[float]] | None = None,
        roi: Sequence[float] | None = None,
        scribble: np.ndarray | torch.Tensor | None = None,
        axis: str = "axial",
        *,
        index: int | None = None,
        intensity: volume_calls.Intensity = "samed2d",
        options: AnswerOptions | None = None,
        **overrides: Any,
    ) -> VolumeRegionAnswer:
        """Region VQA from 3D prompts (IJK points, ROI or scribble); see
        :func:`~monai_medplib.pipeline.volume.answer_volume_region`."""
        return volume_calls.answer_volume_region(
            self,
            volume,
            question,
            points,
            roi,
            scribble,
            axis,
            index=index,
            intensity=intensity,
            options=_options(AnswerOptions, AnswerOptions.for_volume(), options, overrides),
        )

    def answer_volume(
        self,
        volume: volume_calls.VolumeLike,
        question: str,
        index: int,
        axis: str = "axial",
        *,
        intensity: volume_calls.Intensity = "samed2d",
        options: AnswerOptions | None = None,
        **overrides: Any,
    ) -> str:
        """VQA about one slice of a volume; see :func:`~monai_medplib.pipeline.volume.answer_volume`."""
        return volume_calls.answer_volume(
            self,
            volume,
            question,
            index,
            axis,
            intensity=intensity,
            options=_options(AnswerOptions, AnswerOptions.for_volume(), options, overrides),
        )

    def refine_volume(
        self,
        volume: volume_calls.VolumeLike,
        index: int,
        points: Sequence[Sequence[float]],
        labels: Sequence[int],
        prior: Any = None,
        axis: str = "axial",
        *,
        intensity: volume_calls.Intensity = "samed2d",
    ) -> np.ndarray:
        """Click refinement on one slice of a volume; see :func:`~monai_medplib.pipeline.volume.refine_volume`."""
        return volume_calls.refine_volume(
            self, volume, index, points, labels, prior, axis, intensity=intensity
        )
