"""One MedPLIB pipeline per server, shared by every infer task: loaded once, calls serialised, volumes cached.

Everything the app asks of the model goes through :class:`MedPLIBEngine`, in voxel (IJK) terms, so the
infer tasks never touch slicing or model details (those live in ``monai_medplib``).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .prompts import Point, bad_request

logger = logging.getLogger(__name__)

DEFAULT_PIPELINE = "monai_medplib.inference:MedPLIBPipeline"
IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def resolve_device(device: str | None) -> tuple[str, torch.dtype]:
    """``auto`` -> CUDA in bf16 when a GPU is present, else CPU in fp32; ``cpu`` / ``cuda`` force it."""
    device = (device or "auto").lower()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"--conf device must be auto, cpu or cuda; got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--conf device cuda was given but no CUDA device is available")
    return device, (torch.bfloat16 if device.startswith("cuda") else torch.float32)


def import_object(spec: str) -> Any:
    """``"package.module:Name"`` -> the object."""
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"expected 'module:Name', got {spec!r}")
    return getattr(importlib.import_module(module_name), attr)


class _LRU(OrderedDict):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def get_or(self, key: Any, make: Any) -> Any:
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = make()
        self[key] = value
        while len(self) > self.size:
            self.popitem(last=False)
        return value


class MedPLIBEngine:
    """The MedPLIB pipeline behind the MONAI Label tasks.

    Args:
        model: model directory or ``"demo"``.
        device: ``auto`` | ``cpu`` | ``cuda``.
        pipeline: ``module:Class`` with a ``from_pretrained(path, device=, dtype=)`` constructor
            (default :class:`monai_medplib.inference.MedPLIBPipeline`).
        cache_volumes: how many loaded volumes to keep (keyed by path + mtime).
        force_seg: force ``<SEG>`` in grounding answers (for random-weight test models and benchmarks).
    """

    def __init__(
        self,
        model: str = "demo",
        device: str = "auto",
        pipeline: str = DEFAULT_PIPELINE,
        cache_volumes: int = 4,
        force_seg: bool = False,
    ) -> None:
        if model != "demo" and not Path(model).is_dir():
            raise FileNotFoundError(f"--conf model {model!r} is neither 'demo' nor a model directory")
        self.model = model
        self.device, self.dtype = resolve_device(device)
        self.pipeline_spec = pipeline
        self.force_seg = force_seg  # random-weight / benchmark models: force <SEG> so masks are decoded
        self._pipeline: Any = None
        self._model_lock = threading.RLock()  # one model, one caller at a time (threads share it)
        self._cache_lock = threading.Lock()
        self._volumes = _LRU(cache_volumes)
        self._groundings = _LRU(32)  # (image key, slice, text) -> 2D prior for click refinement
        self.load_seconds: float | None = None

    @classmethod
    def from_conf(cls, conf: dict[str, str]) -> MedPLIBEngine:
        """Build from MONAI Label ``--conf`` strings (``model``, ``device``, ``pipeline``)."""
        return cls(
            model=conf.get("model", "demo"),
            device=conf.get("device", "auto"),
            pipeline=conf.get("pipeline", DEFAULT_PIPELINE),
            force_seg=conf.get("force_seg", "false").lower() in ("true", "1", "yes"),
        )

    # -- model -------------------------------------------------------------------------------------
    @property
    def pipeline(self) -> Any:
        """The loaded pipeline (loaded on first use; ``load()`` at app start makes that the only time)."""
        if self._pipeline is None:
            self.load()
        return self._pipeline

    def load(self) -> None:
        with self._model_lock:
            if self._pipeline is not None:
                return
            start = time.perf_counter()
            factory = import_object(self.pipeline_spec)
            self._pipeline = factory.from_pretrained(self.model, device=self.device, dtype=self.dtype)
            self.load_seconds = time.perf_counter() - start
            logger.info(f"MedPLIB model {self.model!r} loaded on {self.device} in {self.load_seconds:.1f} s")

    def describe(self) -> dict[str, Any]:
        return {"model": self.model, "device": self.device, "dtype": str(self.dtype).replace("torch.", "")}

    # -- images ------------------------------------------------------------------------------------
    def volume(self, path: str) -> Any:
        """The image at ``path`` as a channel-first ``MetaTensor`` ``(1, X, Y, Z)``; 4xx for what is not one."""
        if not path or not os.path.exists(path):
            raise bad_request(f"image not found: {path!r}", status=404)
        stat = os.stat(path)
        key = (os.path.realpath(path), stat.st_mtime_ns, stat.st_size)
        with self._cache_lock:
            cached = self._volumes.get(key)
        if cached is not None:
            return cached
        vol = load_volume(path)
        with self._cache_lock:
            self._volumes.get_or(key, lambda: vol)
        return vol

    @staticmethod
    def slice_axis(volume: Any) -> str:
        """The anatomical plane whose slices run along voxel axis k (what Slicer's ``slice`` indexes).

        For the usual axially stored CT/MR that is "axial"; a volume stored coronally gets "coronal", so a
        2D task always works on the plane the user's IJK ``k`` refers to.
        """
        from monai_medplib.transforms.slicing import PLANES, slice_geometry, volume_affine_ras

        affine = volume_affine_ras(volume)
        for axis in PLANES:
            if slice_geometry(affine, volume.shape[1:], axis).slice_dim == 2:
                return axis
        return "axial"

    @staticmethod
    def image_key(volume: Any) -> str:
        return str(volume.meta.get("filename_or_obj", id(volume)))

    # -- model calls (serialised); results come back as (X, Y, Z) voxel arrays ----------------------
    def ground(
        self, volume: Any, texts: list[str], slices: list[int] | None, axis: str
    ) -> tuple[np.ndarray, dict[str, int], dict[str, Any]]:
        """Ground every text on the given slices (None = all).

        Returns the label volume (value i+1 = ``texts[i]``), ``{text: value}`` and per-text answers.
        """
        prompts = [grounding_prompt(t) for t in texts]
        options = {"force_seg": True} if self.force_seg else {}
        with self._model_lock, pipeline_errors():
            result = self.pipeline.ground_volume(volume, prompts, axis=axis, slices=slices, **options)
        self._remember_grounding(volume, dict(zip(prompts, texts)), result, axis)
        label = voxel_array(result.label, volume.shape[1:]).astype(np.int32)
        by_prompt = label_name_map(getattr(result, "label_names", None), prompts)
        names = {text: by_prompt[prompt] for prompt, text in zip(prompts, texts)}
        answers = getattr(result, "answers", None) or {}
        answers = {text: answers.get(prompt, {}) for prompt, text in zip(prompts, texts)}
        return label, names, jsonable(answers)

    def answer(self, volume: Any, question: str, index: int, axis: str) -> str:
        """VQA about slice ``index``."""
        with self._model_lock, pipeline_errors():
            return str(self.pipeline.answer_volume(volume, question, index=index, axis=axis))

    def answer_region(
        self,
        volume: Any,
        question: str,
        axis: str,
        points: list[Point] | None = None,
        roi: tuple[int, ...] | None = None,
        scribble: np.ndarray | None = None,
    ) -> tuple[str, np.ndarray | None]:
        """Region VQA; the region in voxels (clicks, an inclusive IJK box, or a boolean label volume).

        Returns the answer and the region the model was given (``None`` if the pipeline does not say).
        """
        with self._model_lock, pipeline_errors():
            result = self.pipeline.answer_volume_region(
                volume, question, points=points, roi=roi, scribble=scribble, axis=axis
            )
        if isinstance(result, str):
            return result, None
        region = getattr(result, "region", None)
        region = None if region is None else voxel_array(region, volume.shape[1:]) > 0
        return str(result.answer), region

    def refine(
        self,
        volume: Any,
        index: int,
        foreground: list[Point],
        background: list[Point],
        axis: str,
        text: str | None,
    ) -> np.ndarray:
        """Refine the last grounding of ``text`` on slice ``index`` with clicks (grounds first if none)."""
        prior = self.grounding_prior(volume, index, text, axis)
        points = list(foreground) + list(background)
        labels = [1] * len(foreground) + [0] * len(background)
        with self._model_lock, pipeline_errors():
            result = self.pipeline.refine_volume(volume, index, points, labels, prior=prior, axis=axis)
        mask = getattr(result, "label", getattr(result, "mask", result))
        return voxel_array(mask, volume.shape[1:]) > 0

    def grounding_prior(self, volume: Any, index: int, text: str | None, axis: str) -> Any:
        """The cached 2D grounding of ``text`` on this slice (grounding it now if there is none)."""
        key = (self.image_key(volume), axis, index, text)
        with self._cache_lock:
            prior = self._groundings.get(key)
        if prior is None and text:
            self.ground(volume, [text], [index], axis)
            with self._cache_lock:
                prior = self._groundings.get(key)
        return prior

    def _remember_grounding(
        self, volume: Any, prompt_to_text: dict[str, str], result: Any, axis: str
    ) -> None:
        priors = getattr(result, "slice_results", None)  # {(prompt, slice index): 2D slice grounding}
        if not priors:
            return
        with self._cache_lock:
            for (prompt, index), prior in priors.items():
                if prompt in prompt_to_text:
                    key = (self.image_key(volume), axis, index, prompt_to_text[prompt])
                    self._groundings[key] = prior
                    while len(self._groundings) > self._groundings.size:
                        self._groundings.popitem(last=False)


def grounding_prompt(text: str) -> str:
    """A target name ("liver") -> the grounding request the model was trained on; sentences pass unchanged."""
    from monai_medplib.data.demo_dataset import GROUNDING_PHRASES  # "Please segment the {target}." first

    text = text.strip()
    if text.endswith((".", "?", "!")) or len(text.split()) > 6:
        return text
    return GROUNDING_PHRASES[0].format(target=text)


@contextlib.contextmanager
def pipeline_errors() -> Iterator[None]:
    """The pipeline's input errors (ValueError) as 400, a missing capability as 501."""
    try:
        yield
    except ValueError as e:
        raise bad_request(f"the model rejected the request: {e}") from e
    except NotImplementedError as e:
        raise bad_request(f"not available with this model: {e}", 501) from e


def voxel_array(value: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A pipeline result (tensor / MetaTensor / array, with or without a channel dim) as an (X, Y, Z) array."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = value.float().numpy() if value.dtype == torch.bfloat16 else value.numpy()
    arr = np.asarray(value)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.shape != tuple(shape):
        raise RuntimeError(
            f"the pipeline returned a volume of shape {arr.shape}; the image has {tuple(shape)}"
        )
    return arr


def label_name_map(names: Any, texts: list[str]) -> dict[str, int]:
    """``{name: value}`` from a pipeline's label names (dict either way round, or a list from 1)."""
    if isinstance(names, dict) and names:
        first_key = next(iter(names))
        if isinstance(first_key, int | np.integer):
            return {str(v): int(k) for k, v in names.items() if int(k) != 0}
        return {str(k): int(v) for k, v in names.items() if int(v) != 0}
    if isinstance(names, list | tuple) and names:
        return {str(n): i + 1 for i, n in enumerate(names)}
    return {t: i + 1 for i, t in enumerate(texts)}


def jsonable(value: Any) -> Any:
    """Make a pipeline's per-slice answers JSON-serialisable (tuple keys, numpy scalars, tensors)."""
    if isinstance(value, dict):
        return {
            str(k if not isinstance(k, tuple) else "/".join(map(str, k))): jsonable(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


def load_volume(path: str) -> Any:
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
