"""Every file a result becomes: label volumes (NIfTI, DICOM-SEG), 2D masks and overlays (PNG), answers (JSON).

The CLI, the bundle and the MONAI Label app all write through these functions, and every one of them writes
atomically (:mod:`~monai_medplib.io.atomic`). Geometry comes from the label's own affine, which
:func:`~monai_medplib.pipeline.volume.ground_volume` copies from the input volume.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..transforms.intensity import CTWindow, volume_intensity
from ..transforms.slicing import ExtractSlice, slice_geometry, volume_affine_ras
from .atomic import atomic_write_bytes, atomic_write_text
from .dicom_seg import write_dicom_seg
from .nifti import save_nifti
from .readers import NIFTI_SUFFIXES

# Overlay colours by label value (1 -> the first, cycling after the last): distinct on grey CT / MR, and none of
# them the reference outline's green.
LABEL_COLOURS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0),
    (0, 140, 255),
    (255, 200, 0),
    (200, 0, 255),
    (0, 230, 230),
    (255, 110, 0),
    (255, 0, 150),
    (150, 110, 255),
)
OVERLAY_COLOUR = LABEL_COLOURS[0]
OVERLAY_ALPHA = 0.45
REFERENCE_COLOUR = (40, 220, 60)  # outline of a reference label in overlays
LEGEND_ROW = 16  # pixels per legend line


def _finite(value: Any) -> Any:
    """``value`` with NaN / infinite floats as None: JSON has no NaN (strict parsers refuse the file)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_json(path: str | Path, content: Any) -> Path:
    """``content`` as indented JSON (non-JSON values through ``str``, NaN / infinity as ``null``), written
    atomically."""
    return atomic_write_text(
        path, json.dumps(_finite(content), indent=2, default=str, allow_nan=False) + "\n"
    )


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """An 8-bit grey ``(H, W)`` or RGB ``(H, W, 3)`` array as PNG, written atomically."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue())


def save_mask_png(mask: np.ndarray, path: str | Path) -> Path:
    """A boolean mask as an 8-bit PNG (0 background, 255 foreground)."""
    return save_png(np.asarray(mask, dtype=bool).astype(np.uint8) * 255, path)


def label_colour(value: int) -> tuple[int, int, int]:
    """The overlay colour of label ``value`` (1-based)."""
    return LABEL_COLOURS[(int(value) - 1) % len(LABEL_COLOURS)]


def overlay_image(
    rgb: np.ndarray,
    mask: np.ndarray,
    colour: tuple[int, int, int] = OVERLAY_COLOUR,
    alpha: float = OVERLAY_ALPHA,
) -> np.ndarray:
    """``rgb`` uint8 ``[H, W, 3]`` with ``mask`` blended in ``colour``."""
    if rgb.shape[:2] != mask.shape:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {rgb.shape[:2]}")
    out = rgb.astype(np.float32)
    tint = np.asarray(colour, dtype=np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * tint
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def overlay_labels(rgb: np.ndarray, label: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """``rgb`` uint8 ``[H, W, 3]`` with every label value of ``label`` ``[H, W]`` blended in its own colour
    (:func:`label_colour`; a bool mask is label 1)."""
    label = np.asarray(label)
    if label.dtype == bool:
        label = label.astype(np.uint8)
    out = rgb
    for value in np.unique(label[label > 0]):
        out = overlay_image(out, label == value, label_colour(int(value)), alpha)
    return out if out is not rgb else rgb.copy()


def with_legend(rgb: np.ndarray, label_names: Mapping[str, int]) -> np.ndarray:
    """``rgb`` with a black strip below it naming each label in its colour (one line per label, names cut to the
    image's width)."""
    from PIL import ImageDraw

    width = rgb.shape[1]
    strip = Image.new("RGB", (width, 4 + LEGEND_ROW * len(label_names)), (0, 0, 0))
    draw = ImageDraw.Draw(strip)
    for row, (name, value) in enumerate(label_names.items()):
        top = 3 + row * LEGEND_ROW
        draw.rectangle((4, top + 2, 14, top + 12), fill=label_colour(value))
        text, room = f"{value}: {name}", width - 24
        if draw.textlength(text, font_size=11) > room:
            while len(text) > 1 and draw.textlength(text + "...", font_size=11) > room:
                text = text[:-1]
            text += "..."
        draw.text((20, top + 1), text, fill=label_colour(value), font_size=11)
    return np.concatenate([rgb, np.asarray(strip, dtype=np.uint8)], axis=0)


def save_overlay_png(
    rgb: np.ndarray, label: np.ndarray, path: str | Path, label_names: Mapping[str, int] | None = None
) -> Path:
    """The image with each label value (a bool mask: label 1, red) blended in its own colour, as PNG; given
    ``label_names`` (``{name: value}``), a legend strip is added below the image."""
    out = overlay_labels(rgb, label)
    return save_png(out if not label_names else with_legend(out, label_names), path)


def write_label_volume(
    label: torch.Tensor,
    label_names: Mapping[str, int],
    out_dir: str | Path,
    stem: str,
    dicom_source: str | Path | None = None,
    ext: str = ".nii.gz",
    seg_stem: str | None = None,
) -> dict[str, Path]:
    """Save a grounded label volume as ``<stem><ext>`` and, given its source series, a DICOM-SEG.

    Args:
        label: ``(1, X, Y, Z)`` MetaTensor on the source volume's voxel grid (its affine is written).
        label_names: ``{text: label value}``; the texts become the DICOM-SEG segment labels.
        out_dir: folder to write into (created).
        stem: file name stem.
        dicom_source: the DICOM series folder the volume was read from, if any.
        ext: ``.nii.gz`` or ``.nii``.
        seg_stem: DICOM-SEG file stem (default ``<stem>_seg``).

    Returns:
        ``{"nifti": path}`` plus ``{"dicom_seg": path}`` when a DICOM source was given and something was grounded
        (a DICOM-SEG holds at least one segmented frame), else ``{"dicom_seg_skipped": reason}``.
    """
    if ext not in NIFTI_SUFFIXES:
        raise ValueError(f"label volumes are written as {NIFTI_SUFFIXES}, got {ext!r}")
    out_dir = Path(out_dir)
    paths: dict[str, Any] = {}
    # the DICOM-SEG first: a series it cannot describe is refused before any file is written
    if dicom_source is not None:
        if not Path(dicom_source).is_dir():
            paths["dicom_seg_skipped"] = "DICOM-SEG is written for DICOM series folders, not single files"
        elif not bool((label > 0).any()):
            paths["dicom_seg_skipped"] = "empty segmentation: nothing was grounded"
        else:
            segments = {value: text for text, value in label_names.items()}
            out = out_dir / f"{seg_stem or stem + '_seg'}.dcm"
            paths["dicom_seg"] = write_dicom_seg(label, dicom_source, out, segments)
    return {"nifti": save_nifti(label, out_dir / f"{stem}{ext}"), **paths}


def representative_slices(mask: np.ndarray, axis_index: int, count: int = 4) -> list[int]:
    """``count`` slice indices along voxel axis ``axis_index`` spread over the mask's extent (or the volume's)."""
    other = tuple(a for a in range(mask.ndim) if a != axis_index)
    present = np.flatnonzero(mask.any(axis=other))
    lo, hi = (present[0], present[-1]) if present.size else (0, mask.shape[axis_index] - 1)
    picks = np.linspace(lo, hi, count + 2)[1:-1] if hi > lo else [lo]
    return sorted({int(round(p)) for p in picks})


def save_overlay_montage(
    image: torch.Tensor,
    label: torch.Tensor,
    path: str | Path,
    axis: str = "axial",
    reference: torch.Tensor | None = None,
    window: str | None = "abdomen",
    count: int = 4,
    label_names: Mapping[str, int] | None = None,
) -> tuple[Path, list[int]]:
    """A PNG of ``count`` representative slices side by side: the image (a CT window preset, or with ``window=None``
    the model's own SA-Med2D normalisation), each label value tinted in its own colour (:func:`label_colour`),
    reference label (if given) outlined in green, and given ``label_names`` a legend below. Slices are shown in the
    radiological display orientation of :mod:`monai_medplib.transforms.slicing`.

    Returns:
        The PNG path and the slice indices shown.
    """
    extract = ExtractSlice(axis=axis)
    shown = CTWindow(window)(image) if window is not None else volume_intensity("samed2d", image.dtype)(image)
    slice_dim = slice_geometry(volume_affine_ras(label), label.shape[1:], axis).slice_dim
    indices = representative_slices(np.asarray(label[0] > 0), slice_dim, count)
    tiles = []
    for index in indices:
        grey = np.asarray(extract(shown, index=index)[0], dtype=np.uint8)
        rgb = np.repeat(grey[..., None], 3, axis=-1)
        rgb = overlay_labels(rgb, np.asarray(extract(label, index=index)[0]).astype(np.uint8))
        if reference is not None:
            ref = np.asarray(extract(reference, index=index)[0]) > 0
            rgb[_outline(ref)] = REFERENCE_COLOUR
        tiles.append(rgb)
    montage = np.concatenate(tiles, axis=1)
    return save_png(montage if not label_names else with_legend(montage, label_names), path), indices


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner
