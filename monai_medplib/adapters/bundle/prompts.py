"""Validation of the MONAI Bundle's vista3d-style ``input_dict`` prompts (see :func:`parse_prompt`).

Keys: ``image`` (2D image, volume file or DICOM series folder), ``text`` (grounding, one or several),
``question`` (VQA; with ``points`` + ``point_labels``, ``box`` or ``region_mask`` it is region VQA), ``axis`` and
``slices`` (volumes), and an optional ``id`` naming the outputs. Every error names the key at fault.

MONAI's config parser reads a value that is exactly ``@name`` as a reference to another config item, one starting
with ``$`` as a Python expression and one starting with ``%`` as a macro, before this module sees it. A text or
question that really starts with one of these characters is written with a backslash (``\\@home``, ``\\$5``):
:data:`ESCAPE` is removed here, once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...io.dicom_image import dicom_frame_count
from ...io.readers import DICOM_SUFFIX, IMAGE_2D_SUFFIXES, VOLUME_SUFFIXES, file_stem
from ...transforms.planes import AXES

__all__ = [
    "AXES",
    "IMAGE_2D_SUFFIXES",
    "PROMPT_KEYS",
    "VOLUME_SUFFIXES",
    "BundlePrompt",
    "parse_prompt",
    "study_id_of",
    "unescape",
]

ESCAPE = "\\"  # before a leading @, $ or %: the character is text, not MONAI config syntax
_CONFIG_SIGILS = ("@", "$", "%")

PROMPT_KEYS = (
    "id",
    "image",
    "text",
    "question",
    "points",
    "point_labels",
    "box",
    "region_mask",
    "axis",
    "slices",
)


@dataclass(frozen=True)
class BundlePrompt:
    """A validated ``input_dict``.

    Attributes:
        id: study name used for the output folder and file names.
        image: the 2D image file, volume file or DICOM series folder.
        is_volume: True for NIfTI / NRRD / MHA / DICOM inputs.
        is_dicom_series: the input is a DICOM series folder (a DICOM-SEG is written beside the NIfTI).
        texts: grounding requests (one label value each, in order); empty when not grounding.
        question: VQA question, or None.
        points: foreground points ((x, y) pixels on 2D images, (i, j, k) voxels on volumes) or None.
        ignored_points: how many points had label 0 / -1 (a MedPLIB region has no background points).
        box: 2D ``[x0, y0, x1, y1]`` or volume ROI ``[i0, i1, j0, j1, k0, k1]``, or None.
        region_mask: mask file of the region (2D image, or label volume on the volume's grid), or None.
        axis: slicing plane for volumes.
        slices: slice indices along ``axis`` (None: all slices for grounding, the middle one for VQA).
    """

    id: str
    image: Path
    is_volume: bool
    is_dicom_series: bool
    texts: tuple[str, ...] = ()
    question: str | None = None
    points: tuple[tuple[float, ...], ...] | None = None
    ignored_points: int = 0
    box: tuple[float, ...] | None = None
    region_mask: Path | None = None
    axis: str = "axial"
    slices: tuple[int, ...] | None = None

    @property
    def has_region(self) -> bool:
        return self.points is not None or self.box is not None or self.region_mask is not None


def _bad(key: str, message: str) -> ValueError:
    return ValueError(f"input_dict['{key}']: {message}")


def study_id_of(image: str | os.PathLike) -> str:
    """Output name of a study: the file name without its image suffix, or the DICOM folder's name."""
    return file_stem(image)


def _is_volume(path: Path) -> bool:
    if path.is_dir():
        return True
    name = path.name.lower()
    if name.endswith(IMAGE_2D_SUFFIXES):
        return False
    if name.endswith(DICOM_SUFFIX):  # one frame: an X-ray / ultrasound / single slice, grounded as a 2D image
        return dicom_frame_count(path) > 1
    if name.endswith(VOLUME_SUFFIXES):
        return True
    raise _bad(
        "image",
        f"unsupported file type {path.name!r}: use a 2D image {IMAGE_2D_SUFFIXES}, a volume "
        f"{VOLUME_SUFFIXES} or a DICOM series folder",
    )


def _numbers(key: str, value: Any) -> list[float]:
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise _bad(key, f"must be a non-empty list of numbers, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise _bad(key, f"must hold finite numbers, got {v!r}")
        out.append(float(v))
    return out


def unescape(text: str) -> str:
    """``text`` without the :data:`ESCAPE` that protects a leading ``@``, ``$`` or ``%`` from MONAI's parser."""
    if text.startswith(ESCAPE) and text[1:2] in _CONFIG_SIGILS:
        return text[1:]
    return text


def _texts(value: Any) -> tuple[str, ...]:
    texts = [value] if isinstance(value, str) else value
    if (
        not isinstance(texts, Sequence)
        or not texts
        or any(not isinstance(t, str) or not t.strip() for t in texts)
    ):
        raise _bad("text", f"must be a non-empty string or a list of them, got {value!r}")
    texts = [unescape(t) for t in texts]
    if len(set(texts)) != len(texts):
        raise _bad("text", f"texts must be distinct (each becomes one label value), got {list(texts)}")
    return tuple(texts)


def _points(d: Mapping[str, Any], is_volume: bool) -> tuple[tuple[tuple[float, ...], ...] | None, int]:
    if d.get("points") is None:
        if d.get("point_labels") is not None:
            raise _bad("point_labels", "given without 'points'")
        return None, 0
    points = d["points"]
    dims = 3 if is_volume else 2
    shape = (
        "[[i, j, k], ...] voxel indices of the volume" if is_volume else "[[x, y], ...] pixels of the image"
    )
    if not isinstance(points, Sequence) or isinstance(points, str) or not points:
        raise _bad("points", f"must be a non-empty list {shape}, got {points!r}")
    coords = [tuple(_numbers("points", p)) for p in points]
    if any(len(p) != dims for p in coords):
        raise _bad("points", f"must be {shape}, got {points!r}")
    labels = d.get("point_labels")
    if labels is None:
        labels = [1] * len(coords)
    if not isinstance(labels, Sequence) or isinstance(labels, str) or len(labels) != len(coords):
        raise _bad("point_labels", f"must match points: {len(coords)} points but point_labels={labels!r}")
    if any(isinstance(v, bool) or v not in (1, 0, -1) for v in labels):
        raise _bad(
            "point_labels", f"values must be 1 (region), 0 (background) or -1 (ignore), got {labels!r}"
        )
    kept = tuple(p for p, v in zip(coords, labels) if v == 1)
    if not kept:
        raise _bad(
            "point_labels", "no point is labelled 1: a MedPLIB region needs at least one foreground point"
        )
    return kept, len(coords) - len(kept)


def _slices(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    values = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(values, Sequence)
        or isinstance(values, str)
        or not values
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values)
    ):
        raise _bad(
            "slices", f"must be a slice index or a non-empty list of indices (ints >= 0), got {value!r}"
        )
    return tuple(values)


def parse_prompt(input_dict: Mapping[str, Any]) -> BundlePrompt:
    """Validate a bundle ``input_dict`` and return it as a :class:`BundlePrompt`.

    Raises:
        ValueError: an unknown key, a missing or ill-formed value, or prompts that do not fit together; the
            message names the ``input_dict`` key at fault.
        FileNotFoundError: ``image`` or ``region_mask`` does not exist.
    """
    if not isinstance(input_dict, Mapping):
        raise ValueError(f"input_dict must be a dict of prompts, got {type(input_dict).__name__}")
    d = {k: v for k, v in input_dict.items() if v is not None}
    unknown = sorted(set(d) - set(PROMPT_KEYS))
    if unknown:
        raise ValueError(f"input_dict has unknown keys {unknown}; allowed keys: {list(PROMPT_KEYS)}")
    if "image" not in d:
        raise _bad("image", "is required: the path of a 2D image, a volume or a DICOM series folder")
    if not isinstance(d["image"], str | os.PathLike):
        raise _bad("image", f"must be a path, got {type(d['image']).__name__}")
    image = Path(d["image"]).expanduser()
    if not image.exists():
        raise FileNotFoundError(f"input_dict['image']: file not found: {image}")
    is_volume = _is_volume(image)
    if "text" not in d and "question" not in d:
        raise ValueError("input_dict needs 'text' (grounding) or 'question' (VQA / region VQA)")
    texts = _texts(d["text"]) if "text" in d else ()
    question = d.get("question")
    if question is not None and (not isinstance(question, str) or not question.strip()):
        raise _bad("question", f"must be a non-empty string, got {question!r}")
    if question is not None:
        question = unescape(question)
    points, ignored = _points(d, is_volume)
    box = None
    if "box" in d:
        box = tuple(_numbers("box", d["box"]))
        expected = "[i0, i1, j0, j1, k0, k1] voxel ROI" if is_volume else "[x0, y0, x1, y1] pixels"
        if len(box) != (6 if is_volume else 4):
            raise _bad(
                "box", f"must be {expected} for a {'volume' if is_volume else '2D image'}, got {list(box)}"
            )
    region_mask = None
    if "region_mask" in d:
        region_mask = Path(d["region_mask"]).expanduser()
        if not region_mask.exists():
            raise FileNotFoundError(f"input_dict['region_mask']: file not found: {region_mask}")
    regions = [
        k for k, v in (("points", points), ("box", box), ("region_mask", region_mask)) if v is not None
    ]
    if regions and question is None:
        raise ValueError(
            f"input_dict: region prompts {regions} need a 'question' (region VQA); grounding "
            "('text') takes no region prompt"
        )
    if len(regions) > 1 and not is_volume:
        raise ValueError(f"input_dict: give one region prompt for a 2D image, got {regions}")
    axis = d.get("axis", "axial")
    if axis not in AXES:
        raise _bad("axis", f"must be one of {list(AXES)}, got {axis!r}")
    slices = _slices(d.get("slices"))
    if not is_volume:
        for key in ("axis", "slices"):
            if key in d:
                raise _bad(key, f"applies to volumes only; {image.name} is a 2D image")
    if regions and slices is not None and len(slices) != 1:
        raise _bad("slices", f"region VQA reads one slice: give one index, got {list(slices)}")
    study = d.get("id", study_id_of(image))
    if not isinstance(study, str) or not study.strip() or any(c in study for c in "/\\\0"):
        raise _bad("id", f"must be a non-empty name without path separators, got {study!r}")
    if study.strip(".") == "":  # "." and ".." name the output folder itself or the one above it
        origin = "" if "id" in d else f" (taken from the image path {str(image)!r}: give an 'id')"
        raise _bad("id", f"must name a folder inside output_dir, got {study!r}{origin}")
    return BundlePrompt(
        id=study,
        image=image,
        is_volume=is_volume,
        is_dicom_series=image.is_dir() or (is_volume and image.name.lower().endswith(DICOM_SUFFIX)),
        texts=texts,
        question=question,
        points=points,
        ignored_points=ignored,
        box=box,
        region_mask=region_mask,
        axis=axis,
        slices=slices,
    )
