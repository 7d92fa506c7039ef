"""2D calls as functions of a runner: VQA, region VQA and grounding on images, one at a time or batched.

Images may be a path, a PIL image, a numpy array ``(H, W)`` / ``(H, W, 3)`` (uint8 or float) or
:class:`~monai_medplib.pipeline.features.ImageFeatures` already computed. Batches are left-padded and give what
one-at-a-time calls give.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..processing import MaskLike
from ..special_tokens import REGION_START_TOKEN
from .features import ImageFeatures
from .grounding import ground_features
from .options import AnswerOptions, GroundingOptions
from .results import GroundingResult
from .runner import InputImage, MedPLIBRunner

__all__ = [
    "answer_batch",
    "answer_region",
    "answer_region_batch",
    "answers_of",
    "ground_batch",
    "region_grids_of",
]


@torch.no_grad()
def answers_of(
    runner: MedPLIBRunner,
    features: Sequence[ImageFeatures],
    questions: Sequence[str],
    grids: list[list[torch.Tensor]] | None,
    options: AnswerOptions,
    region: bool = False,
) -> list[str]:
    """Decode the answers of ``questions[b]`` about ``features[b]`` (region questions with their ``grids``)."""
    prompts = [runner.prompt_ids(q, region=region) for q in questions]
    out = runner.generate(features, prompts, grids, options.max_new_tokens, options.temperature, options.seed)
    return [runner.decode_text(ids) for ids in out.new_ids]


def _check_lists(images: Sequence[InputImage], texts: Sequence[str], name: str) -> None:
    """A batch call's images and texts are lists of equal length (one path and one question would otherwise be
    taken as lists of characters)."""
    for what, value in (("images", images), (name, texts)):
        if isinstance(value, str | bytes | Path) or not hasattr(value, "__len__"):
            raise TypeError(f"{what} must be a list (one item per sample), got {type(value).__name__}")
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} {name}")


def _check_texts(texts: Sequence[str], name: str) -> None:
    """Every question / request says something (an empty one would still make the model answer)."""
    blank = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if blank:
        which = name.removesuffix("s") if len(texts) == 1 else f"{name} {blank}"
        raise ValueError(f"{which}: empty or not text; give words")


def answer_batch(
    runner: MedPLIBRunner,
    images: Sequence[InputImage],
    questions: Sequence[str],
    options: AnswerOptions | None = None,
) -> list[str]:
    """Answer each question about its image (VQA), in one left-padded batch."""
    _check_lists(images, questions, "questions")
    _check_texts(questions, "questions")
    if not images:
        return []
    features = runner.encode_images(images, with_sam=False)
    return answers_of(runner, features, questions, None, AnswerOptions.merge(options))


def region_grids_of(
    runner: MedPLIBRunner,
    features: Sequence[ImageFeatures],
    regions: Sequence[MaskLike | Sequence[MaskLike]],
    keep_largest_component: bool = False,
) -> list[list[torch.Tensor]]:
    """Per image, the 24x24 grids of its region masks (``regions[b]``: one mask, or a list of masks for a
    question with several ``<region>`` places, as MeCoVQA-R entries have)."""
    return [
        [
            runner.region_grid(f.original_size, mask=m, keep_largest_component=keep_largest_component)
            for m in (r if isinstance(r, list | tuple) else [r])
        ]
        for f, r in zip(features, regions)
    ]


def answer_region_batch(
    runner: MedPLIBRunner,
    images: Sequence[InputImage],
    questions: Sequence[str],
    regions: Sequence[MaskLike | Sequence[MaskLike]] | None,
    options: AnswerOptions | None = None,
    *,
    official_eval_region: bool = False,
    keep_largest_component: bool = False,
) -> list[str]:
    """Answer each question about a region of its image (region VQA), in one left-padded batch.

    The region feature is injected between ``<region></region>`` as the demo worker does; a question may mark the
    spot with ``<region>``, else ``<region></region>`` is appended. ``official_eval_region=True`` reproduces the
    official ``vqa_infer.py`` evaluation, which drops the region (no feature inserted; the masks are not read).
    ``keep_largest_component`` uses the dataset path's grid (largest 8-connected component only).
    """
    _check_lists(images, questions, "questions")
    if regions is not None and not len(images) == len(questions) == len(regions):
        raise ValueError(f"{len(images)} images, {len(questions)} questions, {len(regions)} regions")
    _check_texts(questions, "questions")
    if not images:
        return []
    features = runner.encode_images(images, with_sam=False)
    grids = None
    if not official_eval_region:
        if regions is None:
            raise ValueError("region VQA needs a region per question (or official_eval_region=True)")
        for i, (question, region) in enumerate(zip(questions, regions)):
            _check_places(question, len(region) if isinstance(region, list | tuple) else 1, f"regions[{i}]")
        grids = region_grids_of(runner, features, regions, keep_largest_component)
    return answers_of(runner, features, questions, grids, AnswerOptions.merge(options), region=True)


def _check_places(question: str, given: int, where: str) -> None:
    places = max(1, question.count(REGION_START_TOKEN))  # no <region>: one is appended
    if given != places:
        raise ValueError(
            f"{where}: {given} mask(s) for a question with {places} <region> place(s); give one mask per place "
            "(answer_region_batch takes a list of masks per question; or official_eval_region=True to answer "
            "without the region)"
        )


def answer_region(
    runner: MedPLIBRunner,
    image: InputImage,
    question: str,
    *,
    mask: MaskLike | None = None,
    points: Sequence[Sequence[float]] | None = None,
    box: Sequence[float] | None = None,
    options: AnswerOptions | None = None,
    official_eval_region: bool = False,
    keep_largest_component: bool = False,
) -> str:
    """Answer a question about one region given as ``mask``, ``points`` ((x, y) pixels) or ``box``
    (``(x0, y0, x1, y1)``); see :func:`answer_region_batch` for the region conventions."""
    _check_texts([question], "question")
    features = runner.encode_images([image], with_sam=False)
    grids = None
    if not official_eval_region:
        _check_places(question, 1, "the region")
        size = features[0].original_size
        grids = [[runner.region_grid(size, mask, points, box, keep_largest_component)]]
    return answers_of(runner, features, [question], grids, AnswerOptions.merge(options), region=True)[0]


def ground_batch(
    runner: MedPLIBRunner,
    images: Sequence[InputImage],
    texts: Sequence[str],
    options: GroundingOptions | None = None,
) -> list[GroundingResult]:
    """Segment what each text asks for in its image: one generation batch, one SAM decoder batch."""
    _check_lists(images, texts, "texts")
    _check_texts(texts, "texts")
    features = runner.encode_images(images, with_sam=True)
    return ground_features(runner, features, [runner.prompt_ids(t) for t in texts], options)
