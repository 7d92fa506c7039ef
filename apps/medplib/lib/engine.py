"""One MedPLIB pipeline per server, shared by every infer task: loaded once, calls serialised, volumes cached.

Everything the app asks of the model goes through :class:`MedPLIBEngine`, in voxel (IJK) terms, so the
infer tasks never touch slicing or model details (those live in ``monai_medplib``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import MetaTensor

from monai_medplib.devices import resolve_device, resolve_dtype
from monai_medplib.io.readers import IMAGE_2D_SUFFIXES
from monai_medplib.transforms.slicing import plane_along_voxel_axis
from monai_medplib.user_input import parse_bool

from .prompts import Point, bad_request

logger = logging.getLogger(__name__)


class _LRU(OrderedDict):
    """A small dict that forgets its least recently used entries beyond ``size``."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def get(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            return default
        self.move_to_end(key)
        return self[key]

    def put(self, key: Any, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


class MedPLIBEngine:
    """The MedPLIB pipeline behind the MONAI Label tasks.

    Args:
        model: model directory or ``"demo"``.
        device: ``auto`` | ``cpu`` | ``cuda``.
        cache_volumes: how many loaded volumes to keep (keyed by path, mtime and size).
        force_seg: force ``<SEG>`` in grounding answers (for random-weight test models and benchmarks).
        fast_grounding: opt-in one-prefill grounding shortcut (checked per slice, generation where ``<SEG>`` is
            not the first token); it also reuses each slice's cached prompt prefix, so a second text on a slice
            prefills only its own tokens (figures: ``benchmarks/RESULTS.md``).
    """

    def __init__(
        self,
        model: str = "demo",
        device: str = "auto",
        cache_volumes: int = 4,
        force_seg: bool = False,
        fast_grounding: bool = False,
    ) -> None:
        if model != "demo" and not Path(model).is_dir():
            raise FileNotFoundError(f"--conf model {model!r} is neither 'demo' nor a model directory")
        self.model = model
        try:
            self.device = resolve_device(device)
        except ValueError as err:
            raise ValueError(f"--conf device: {err}") from err
        self.dtype = resolve_dtype(None, self.device)
        self.force_seg = force_seg
        self.fast_grounding = fast_grounding
        self._pipeline: Any = None
        self._model_lock = threading.RLock()  # one model, one caller at a time (threads share it)
        self._cache_lock = threading.Lock()
        self._volumes = _LRU(cache_volumes)
        self._groundings = _LRU(32)  # (image key, axis, slice, text) -> SliceGrounding, the refinement prior
        self.load_seconds: float | None = None

    @classmethod
    def from_conf(cls, conf: dict[str, str]) -> MedPLIBEngine:
        """Build from MONAI Label ``--conf`` strings (``model``, ``device``, ``force_seg``, ``fast_grounding``)."""
        return cls(
            model=conf.get("model", "demo"),
            device=conf.get("device", "auto"),
            force_seg=parse_bool(conf.get("force_seg", "false"), "--conf force_seg"),
            fast_grounding=parse_bool(conf.get("fast_grounding", "false"), "--conf fast_grounding"),
        )

    # -- model -------------------------------------------------------------------------------------
    @property
    def pipeline(self) -> Any:
        """The loaded :class:`~monai_medplib.pipeline.MedPLIBPipeline` (loaded on first use)."""
        if self._pipeline is None:
            self.load()
        return self._pipeline

    def load(self) -> None:
        """Load the model once (the app calls this at start-up unless ``--conf preload false``)."""
        from monai_medplib.pipeline import MedPLIBPipeline

        with self._model_lock:
            if self._pipeline is not None:
                return
            start = time.perf_counter()
            self._pipeline = MedPLIBPipeline.from_pretrained(self.model, device=self.device, dtype=self.dtype)
            self.load_seconds = time.perf_counter() - start
            logger.info(f"MedPLIB model {self.model!r} loaded on {self.device} in {self.load_seconds:.1f} s")

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
        }

    # -- images ------------------------------------------------------------------------------------
    def volume(self, path: str) -> MetaTensor:
        """The image at ``path`` as a channel-first ``MetaTensor`` ``(1, X, Y, Z)``; 4xx for what is not one."""
        if not path or not os.path.exists(path):
            raise bad_request(f"image not found: {path!r}", status=404)
        stat = os.stat(path)
        key = (os.path.realpath(path), stat.st_mtime_ns, stat.st_size)
        with self._cache_lock:
            cached = self._volumes.get(key)
        if cached is None:
            cached = load_volume(path)
            with self._cache_lock:
                self._volumes.put(key, cached)
        return cached

    @staticmethod
    def slice_axis(volume: MetaTensor) -> str:
        """The plane Slicer's ``slice`` / IJK ``k`` indexes (voxel axis 2)."""
        return plane_along_voxel_axis(volume, 2)

    @staticmethod
    def image_key(volume: MetaTensor) -> str:
        return str(volume.meta.get("filename_or_obj", id(volume)))

    # -- model calls (serialised); volumes come back as (X, Y, Z) arrays ----------------------------
    def ground(
        self, volume: MetaTensor, texts: list[str], slices: list[int] | None, axis: str
    ) -> tuple[np.ndarray, dict[str, int], dict[str, Any]]:
        """Ground every text ("liver" or a request) on the given slices (None = all).

        Returns the label volume, ``{text: label value}`` and the result's JSON summary.
        """
        with self._model_lock, pipeline_errors():
            result = self.pipeline.ground_volume(
                volume, texts, axis=axis, slices=slices, force_seg=self.force_seg, fast=self.fast_grounding
            )
        key = self.image_key(volume)
        with self._cache_lock:
            for (text, index), prior in result.slice_results.items():
                self._groundings.put((key, axis, index, text), prior)
        return result.label.as_tensor()[0].numpy(), result.label_names, result.summary()

    def answer(self, volume: MetaTensor, question: str, index: int, axis: str) -> str:
        """VQA about slice ``index``."""
        with self._model_lock, pipeline_errors():
            return self.pipeline.answer_volume(volume, question, index=index, axis=axis)

    def answer_region(
        self,
        volume: MetaTensor,
        question: str,
        axis: str,
        index: int | None = None,
        points: list[Point] | None = None,
        roi: tuple[int, ...] | None = None,
        scribble: np.ndarray | None = None,
    ) -> Any:
        """Region VQA on one slice (``index``, else the one the prompts choose); clicks, ROI and scribble
        combine into one region. Returns the pipeline's ``VolumeRegionAnswer`` (answer, slice, region voxels).
        """
        with self._model_lock, pipeline_errors():
            return self.pipeline.answer_volume_region(
                volume, question, points=points, roi=roi, scribble=scribble, axis=axis, index=index
            )

    def refine(
        self,
        volume: MetaTensor,
        index: int,
        foreground: list[Point],
        background: list[Point],
        axis: str,
        text: str | None,
    ) -> np.ndarray:
        """Refine the last grounding of ``text`` on slice ``index`` with clicks (grounds it first if needed);
        without ``text`` the clicks alone prompt SAM-Med2D. Returns a bool ``(X, Y, Z)`` volume."""
        prior = None
        if text:
            key = (self.image_key(volume), axis, index, text)
            with self._cache_lock:
                prior = self._groundings.get(key)
            if prior is None:
                self.ground(volume, [text], [index], axis)
                with self._cache_lock:
                    prior = self._groundings.get(key)
        points = list(foreground) + list(background)
        labels = [1] * len(foreground) + [0] * len(background)
        with self._model_lock, pipeline_errors():
            return self.pipeline.refine_volume(volume, index, points, labels, prior=prior, axis=axis)


@contextlib.contextmanager
def pipeline_errors() -> Iterator[None]:
    """The pipeline's input errors (ValueError) as 400, a missing capability as 501."""
    try:
        yield
    except ValueError as e:
        raise bad_request(f"the model rejected the request: {e}") from e
    except NotImplementedError as e:
        raise bad_request(f"not available with this model: {e}", 501) from e


def load_volume(path: str) -> MetaTensor:
    """Read an image file / DICOM folder as ``(1, X, Y, Z)``; 415 if unreadable, 400 if it is not a 3D volume."""
    from monai_medplib.io.readers import load_volume as read_volume

    suffix = "".join(Path(path).suffixes).lower()
    if suffix.endswith(IMAGE_2D_SUFFIXES):
        raise bad_request(
            f"this task needs a 3D volume; got a 2D picture ({suffix}). Use a CT / MR series, NIfTI or NRRD volume."
        )
    try:
        img = read_volume(path)
    except FileNotFoundError as e:
        raise bad_request(str(e), 404) from e
    except ValueError as e:  # 2D / 4D images, mixed series
        raise bad_request(f"this task needs a 3D volume: {e}") from e
    except Exception as e:  # every reader failed: not an image at all
        raise bad_request(f"could not read the image {Path(path).name!r} as a medical image: {e}", 415) from e
    if min(img.shape[1:]) < 2:
        raise bad_request(f"this task needs a 3D volume; got shape {tuple(img.shape)} (a single slice)")
    return img


def load_label(path: str, shape: tuple[int, ...]) -> np.ndarray:
    """A label volume uploaded with the request (Slicer scribbles) as ``(X, Y, Z)`` ints matching ``shape``."""
    from monai.transforms import LoadImage

    try:
        lab = LoadImage(image_only=True)(path)
    except Exception as e:
        raise bad_request(f"could not read the uploaded label {Path(path).name!r}: {e}", 415) from e
    arr = np.asarray(lab)
    if arr.ndim == 4 and 1 in (arr.shape[0], arr.shape[-1]):
        arr = arr.squeeze(0 if arr.shape[0] == 1 else -1)
    if arr.shape != tuple(shape):
        raise bad_request(f"the uploaded label has shape {arr.shape}; the image has {tuple(shape)}")
    return np.rint(arr).astype(np.int32)
