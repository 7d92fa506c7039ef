"""What the pipeline's calls return: 2D groundings, volume groundings (with a JSON summary), volume region answers,
and the counts of which path each ``<SEG>`` state took."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from ..processing import MASK_THRESHOLD
from ..tokenization import plain_answer
from ..transforms.slicing import SliceGeometry

__all__ = [
    "GroundingResult",
    "PathCounts",
    "SliceGrounding",
    "VolumeGroundingResult",
    "VolumeRegionAnswer",
    "label_from_probs",
]


def _shape(value: Any) -> str:
    return "None" if value is None else "x".join(str(s) for s in np.shape(value))


@dataclass
class GroundingResult:
    """Outcome of :meth:`MedPLIBPipeline.ground` for one image.

    Attributes:
        mask: bool ``[H, W]`` at the original image size, ``sigmoid(logits) > 0.1`` (release threshold).
        probs: float32 ``[H, W]``, sigmoid of the post-processed logits (zeros when no ``<SEG>``).
        logits: float32 ``[H, W]`` post-processed mask logits, None when no ``<SEG>`` was generated.
        answer: generated text (MedPLIB tokens such as ``<SEG>`` kept, as the release decodes).
        has_seg: whether a ``<SEG>`` was generated (or forced); without it the mask is empty (release).
        token_ids: generated ids (EOS included when produced).
        low_res_logits: SAM logits ``[1, 64, 64]`` before post-processing (a prior for click refinement).
        iou_prediction: SAM's predicted IoU of the mask.
        seg_embedding: the ``<SEG>`` text prompt ``[256]`` (fp32) SAM decoded; click refinement reuses it.
        all_masks / all_probs: with ``all_seg=True``, one entry per ``<SEG>`` in answer order.
    """

    mask: np.ndarray
    probs: np.ndarray
    logits: np.ndarray | None
    answer: str
    has_seg: bool
    token_ids: list[int] = field(default_factory=list)
    low_res_logits: torch.Tensor | None = None
    iou_prediction: float | None = None
    seg_embedding: torch.Tensor | None = None
    all_masks: list[np.ndarray] = field(default_factory=list)
    all_probs: list[np.ndarray] = field(default_factory=list)

    def __repr__(self) -> str:
        return (
            f"GroundingResult(has_seg={self.has_seg}, answer={self.answer!r}, mask={_shape(self.mask)} "
            f"with {int(np.count_nonzero(self.mask))} px, masks={len(self.all_masks) or int(self.has_seg)})"
        )

    @classmethod
    def empty(cls, size: tuple[int, int], answer: str, token_ids: list[int]) -> GroundingResult:
        """Release behaviour without ``<SEG>``: no mask."""
        return cls(
            mask=np.zeros(size, dtype=bool),
            probs=np.zeros(size, dtype=np.float32),
            logits=None,
            answer=answer,
            has_seg=False,
            token_ids=token_ids,
        )

    @classmethod
    def from_logits(
        cls,
        logits: torch.Tensor,
        answer: str,
        token_ids: list[int],
        low_res: torch.Tensor | None = None,
        iou: torch.Tensor | None = None,
        seg_embedding: torch.Tensor | None = None,
    ) -> GroundingResult:
        """Build from post-processed logits ``[H, W]`` of the (first) ``<SEG>``."""
        logits = logits.detach().float().cpu()
        probs = torch.sigmoid(logits)
        return cls(
            mask=(probs > MASK_THRESHOLD).numpy(),
            probs=probs.numpy(),
            logits=logits.numpy(),
            answer=answer,
            has_seg=True,
            token_ids=token_ids,
            low_res_logits=None if low_res is None else low_res.detach().float().cpu(),
            iou_prediction=None if iou is None else float(iou.reshape(-1)[0]),
            seg_embedding=None if seg_embedding is None else seg_embedding.detach().float().cpu().reshape(-1),
        )

    @property
    def foreground_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def label_from_probs(probs: torch.Tensor) -> torch.Tensor:
    """One label map from several texts' probabilities ``(T, ...)``: the 1-based index of the most probable
    text where that probability passes the release threshold, 0 elsewhere (uint8)."""
    best, which = probs.max(dim=0)
    return torch.where(best > MASK_THRESHOLD, which + 1, 0).to(torch.uint8)


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
        """The counts, plus ``llm_passes``: prompts that ran the language model (any path)."""
        return {**self.__dict__, "llm_passes": self.generate + self.shortcut + self.forced}


@dataclass
class SliceGrounding:
    """One text grounded on one slice, kept as the prior of click refinement: the parts of a
    :class:`GroundingResult` that ``refine`` reads, without the full-size probabilities.

    Attributes:
        mask: bool ``(H, W)`` in the slice's display orientation.
        low_res_logits: SAM logits ``[1, 64, 64]`` (fp32; a refinement's ``mask_input``).
        answer: the model's answer on this slice.
        has_seg: whether ``<SEG>`` was produced (no ``<SEG>`` = empty mask, release behaviour).
        seg_embedding: the ``<SEG>`` text prompt ``[256]`` (fp32) SAM decoded; refinement prompts with it again.
        token_ids: the answer's token ids.
    """

    mask: np.ndarray = field(repr=False)
    low_res_logits: torch.Tensor | None = field(repr=False)
    answer: str
    has_seg: bool
    seg_embedding: torch.Tensor | None = field(default=None, repr=False)
    token_ids: list[int] = field(default_factory=list, repr=False)


@dataclass
class VolumeGroundingResult:
    """Output of :meth:`MedPLIBPipeline.ground_volume`; volumes are channel-first ``(1, X, Y, Z)`` on the input's
    voxel grid, with its affine and meta. Every per-text mapping is keyed by the texts as the caller gave them.

    Attributes:
        label: uint8 ``(1, X, Y, Z)``: ``label_names[text]`` where that text is the most probable grounded one.
        probs: float32 ``(T, X, Y, Z)``: channel ``t`` = sigmoid probability of text ``t`` (0 off the slices);
            assembled on first access from the per-slice probabilities, so an interactive call on one slice of
            a large CT does not allocate and zero a dense float volume per text.
        label_names: ``{text: label value}`` (1-based, in the order given).
        requests: ``{text: the request the model was given}`` (a structure name becomes "Please segment the X.").
        answers: ``{text: {slice index: answer}}`` (as decoded, MedPLIB tokens kept).
        has_seg: ``{text: {slice index: bool}}``.
        slices: the slice indices grounded (along ``axis``).
        axis: the anatomical plane.
        paths: how many prompts took each [SEG] path and how many slices were encoded / found in the cache.
        slice_results: ``{(text, slice index): SliceGrounding}``.
        slice_paths: with keyframe grounding, ``{text: {slice index: "key" | "bisected" | "propagated"}}``.
    """

    label: MetaTensor = field(repr=False)
    label_names: dict[str, int]
    answers: dict[str, dict[int, str]] = field(repr=False)
    has_seg: dict[str, dict[int, bool]] = field(repr=False)
    slices: list[int] = field(repr=False)
    axis: str
    paths: dict[str, int]
    requests: dict[str, str] = field(default_factory=dict, repr=False)
    slice_results: dict[tuple[str, int], SliceGrounding] = field(default_factory=dict, repr=False)
    slice_probs: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)
    geometry: SliceGeometry | None = field(default=None, repr=False)
    slice_paths: dict[str, dict[int, str]] = field(default_factory=dict, repr=False)

    @cached_property
    def probs(self) -> MetaTensor:
        probs = torch.zeros((len(self.label_names), *self.label.shape[1:]), dtype=torch.float32)
        for (t, index), slice_probs in self.slice_probs.items():
            self.geometry.put(probs[t : t + 1], slice_probs[None], index)
        meta = {k: v for k, v in self.label.meta.items() if k != "affine"}
        return MetaTensor(probs, affine=self.label.affine.clone(), meta=meta)

    @property
    def mask(self) -> MetaTensor:
        """bool ``(1, X, Y, Z)``: any text grounded."""
        return self.label > 0

    def voxel_ml(self) -> float:
        """Volume of one voxel in millilitres, from the label's affine (mm)."""
        affine = np.asarray(self.label.affine, dtype=np.float64)[:3, :3]
        return float(abs(np.linalg.det(affine))) / 1000.0

    def summary(self) -> dict[str, Any]:
        """The JSON-able report every front end prints: per text whether it was found, where, how much, and
        the model's own words (MedPLIB tokens removed, counted over the slices that said them)."""
        label = self.label.as_tensor() if isinstance(self.label, MetaTensor) else torch.as_tensor(self.label)
        per_voxel_ml = self.voxel_ml()
        dim = None if self.geometry is None else self.geometry.slice_dim + 1
        targets: dict[str, Any] = {}
        for text, value in self.label_names.items():
            region = label == value
            voxels = int(region.sum())
            with_mask: list[int] = []
            if voxels and dim is not None:
                other = tuple(d for d in range(label.ndim) if d != dim)
                grounded = set(self.has_seg[text]) | set(
                    self.slice_paths.get(text, {})
                )  # propagated ones too
                with_mask = [
                    int(i) for i in torch.nonzero(region.any(dim=other)).flatten() if int(i) in grounded
                ]
            words = Counter(plain_answer(a) for a in self.answers.get(text, {}).values())
            words.pop("", None)
            targets[text] = {
                "label": value,
                "request": self.requests.get(text, text),
                "found": voxels > 0,
                "voxels": voxels,
                "volume_ml": round(voxels * per_voxel_ml, 3),
                "slices_with_mask": with_mask,
                "slices_with_seg": sorted(i for i, ok in self.has_seg.get(text, {}).items() if ok),
                "answers": dict(words.most_common()),
            }
            if text in self.slice_paths:  # keyframe grounding: how each slice was produced
                targets[text]["slice_paths"] = dict(Counter(self.slice_paths[text].values()))
        return {
            "axis": self.axis,
            "slices": list(self.slices),
            "targets": targets,
            "paths": dict(self.paths),  # which [SEG] path each prompt took, encoder and cache use, LLM passes
        }


@dataclass
class VolumeRegionAnswer:
    """Output of :meth:`MedPLIBPipeline.answer_volume_region`.

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
    region: np.ndarray = field(repr=False)
    region_2d: np.ndarray = field(repr=False)
