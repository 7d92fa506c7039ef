"""One MedPLIB pipeline per server, shared by every infer task: loaded once, calls serialised, volumes cached
(single-flight and bounded in bytes: concurrent requests for an image decode it once), sizes checked on the
header before any decode.

Everything the app asks of the model goes through :class:`MedPLIBEngine`, in voxel (IJK) terms, so the
infer tasks never touch slicing or model details (those live in ``monai_medplib``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import MetaTensor

from monai_medplib.devices import resolve_device, resolve_dtype, resolve_quantization
from monai_medplib.io.readers import IMAGE_2D_SUFFIXES, VolumeLimits, VolumeTooLarge, probe_volume
from monai_medplib.pipeline.cache import DEFAULT_VOLUME_CACHE_BYTES, FeatureCache, VolumeCache
from monai_medplib.transforms.slicing import plane_along_voxel_axis
from monai_medplib.user_input import UserInputError, parse_bool, parse_int, parse_keyframes

from .prompts import Point, bad_request

logger = logging.getLogger(__name__)


# every --conf option of the app (README "--conf options"): a misspelt one must not start a server without it
CONF_KEYS = (
    "model",
    "device",
    "quantization",
    "models",
    "preload",
    "force_seg",
    "fast_grounding",
    "keyframes",
    "grounding_text",
    "vqa_question",
    "region_question",
    "max_voxels",
    "max_volume_mb",
    "volume_cache_mb",
    "decode_slots",
    "list_masks",
)


def check_conf_keys(conf: dict[str, str]) -> None:
    """Refuse ``--conf`` keys the app does not read, naming the closest known one.

    Raises:
        UserInputError: an unknown key (``quantisation`` would otherwise start an unquantised server in silence).
    """
    import difflib

    for key in sorted(set(conf) - set(CONF_KEYS)):
        near = difflib.get_close_matches(key, CONF_KEYS, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise UserInputError(
            f"--conf {key}: not an option of the MedPLIB app{hint}; its options: {', '.join(CONF_KEYS)}"
        )


GROUNDING_CACHE_BYTES = 256 * 2**20  # per-slice probabilities kept as refinement priors


class MedPLIBEngine:
    """The MedPLIB pipeline behind the MONAI Label tasks.

    Args:
        model: model directory or ``"demo"``.
        device: ``auto`` | ``cpu`` | ``cuda``.
        cache_volumes: how many loaded volumes to keep (keyed by path, mtime and size).
        volume_cache_bytes: and at most this many bytes of them.
        limits: size limits checked on an image's header before it is decoded.
        force_seg: force ``<SEG>`` in grounding answers (for random-weight test models and benchmarks).
        fast_grounding: opt-in one-prefill grounding shortcut (checked per slice, generation where ``<SEG>`` is
            not the first token); it also reuses each slice's cached prompt prefix, so a second text on a slice
            prefills only its own tokens (figures: ``benchmarks/RESULTS.md``).
        keyframes: opt-in keyframe grounding of whole volumes (the LLM on every k-th slice; None = exact); a
            request's own ``keyframes`` overrides it.
        quantization: ``"int8"`` / ``"int4"``: quantise the LLM's linear layers while loading (the ``quant``
            extra); None keeps the released weights.
        decode_slots: how many volumes may be decoded at the same time (each needs a few times its decoded size
            while it decodes).
    """

    def __init__(
        self,
        model: str = "demo",
        device: str = "auto",
        cache_volumes: int = 4,
        force_seg: bool = False,
        fast_grounding: bool = False,
        volume_cache_bytes: int = DEFAULT_VOLUME_CACHE_BYTES,
        limits: VolumeLimits | None = None,
        keyframes: int | None = None,
        quantization: str | None = None,
        decode_slots: int = 2,
    ) -> None:
        if model != "demo" and not Path(model).is_dir():
            raise FileNotFoundError(f"--conf model {model!r} is neither 'demo' nor a model directory")
        self.model = model
        try:
            self.device = resolve_device(device)
        except ValueError as err:
            raise ValueError(f"--conf device: {err}") from err
        self.dtype = resolve_dtype(None, self.device)
        try:
            self.quantization = resolve_quantization(quantization)
        except ValueError as err:
            raise UserInputError(f"--conf quantization: {err}") from None
        self.force_seg = force_seg
        self.fast_grounding = fast_grounding
        self.keyframes = keyframes
        self._pipeline: Any = None
        self._model_lock = threading.RLock()  # one model, one caller at a time (threads share it)
        self.limits = limits or VolumeLimits()
        self._volumes = VolumeCache(max_bytes=volume_cache_bytes, max_entries=cache_volumes)
        self._decode_slots = threading.Semaphore(decode_slots)
        self._groundings = FeatureCache(
            GROUNDING_CACHE_BYTES
        )  # (image, axis, slice, text) -> refinement prior
        self.load_seconds: float | None = None

    @classmethod
    def from_conf(cls, conf: dict[str, str]) -> MedPLIBEngine:
        """Build from MONAI Label ``--conf`` strings (``model``, ``device``, ``force_seg``, ``fast_grounding``,
        ``max_voxels``, ``max_volume_mb``, ``volume_cache_mb``, ``decode_slots``; the app README lists them)."""
        defaults = VolumeLimits()
        limits = VolumeLimits(
            max_voxels=parse_int(conf.get("max_voxels", defaults.max_voxels), "--conf max_voxels", minimum=1),
            max_bytes=parse_int(
                conf.get("max_volume_mb", defaults.max_bytes // 2**20), "--conf max_volume_mb", minimum=1
            )
            * 2**20,
        )
        cache_mb = conf.get("volume_cache_mb", DEFAULT_VOLUME_CACHE_BYTES // 2**20)
        return cls(
            model=conf.get("model", "demo"),
            device=conf.get("device", "auto"),
            force_seg=parse_bool(conf.get("force_seg", "false"), "--conf force_seg"),
            fast_grounding=parse_bool(conf.get("fast_grounding", "false"), "--conf fast_grounding"),
            volume_cache_bytes=parse_int(cache_mb, "--conf volume_cache_mb", minimum=0) * 2**20,
            limits=limits,
            keyframes=parse_keyframes(conf.get("keyframes"), "--conf keyframes"),
            quantization=conf.get("quantization"),
            decode_slots=parse_int(conf.get("decode_slots", 2), "--conf decode_slots", minimum=1),
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
            # the pipeline keeps as many prepared (normalised) volumes as the engine keeps decoded ones
            prepared = VolumeCache(max_bytes=self._volumes.max_bytes, max_entries=self._volumes.max_entries)
            self._pipeline = MedPLIBPipeline.from_pretrained(
                self.model,
                device=self.device,
                dtype=self.dtype,
                volume_cache=prepared,
                quantization=self.quantization,
            )
            self.load_seconds = time.perf_counter() - start
            logger.info(f"MedPLIB model {self.model!r} loaded on {self.device} in {self.load_seconds:.1f} s")

    def describe(self) -> dict[str, Any]:
        """What serves the requests (``GET /info/`` and every reply): ``dtype`` is the image encoders' and
        ``llm_dtype`` the LLM's (bfloat16 when the LLM is quantised)."""
        from monai_medplib.modeling.quantization import QUANTIZED_LLM_DTYPE

        llm_dtype = QUANTIZED_LLM_DTYPE if self.quantization else self.dtype
        return {
            "model": self.model,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "llm_dtype": str(llm_dtype).replace("torch.", ""),
            "quantization": self.quantization or "none",
        }

    def stats(self) -> dict[str, int]:
        """How many volumes were decoded so far and the bytes the volume cache holds (``GET /info/``)."""
        return {"volumes_decoded": self._volumes.prepared, "volume_cache_bytes": self._volumes.nbytes}

    # -- images ------------------------------------------------------------------------------------
    def volume(self, path: str) -> MetaTensor:
        """The image at ``path`` as a channel-first ``MetaTensor`` ``(1, X, Y, Z)``; 4xx for what is not one.

        Concurrent requests for the same file wait for one decode and get the same object (the pipeline's own
        caches recognise it)."""
        if not path or not os.path.exists(path):
            raise bad_request(f"image not found: {Path(path).name!r}", status=404)
        volume = self._volumes.get(path, lambda: self._decode(path))
        self._prepare(volume, path)  # again only if the pipeline has dropped it meanwhile
        return volume

    def _decode(self, path: str) -> MetaTensor:
        # At most ``decode_slots`` volumes decode at once: requests for many different images cannot hold many
        # decodes' peak memory (a few times the volume each) at the same time. Outside the model lock.
        with self._decode_slots:
            volume = load_volume(path, self.limits)
            self._prepare(volume, path)
        return volume

    def _prepare(self, volume: MetaTensor, path: str) -> None:
        try:
            self.pipeline.prepare_volume(volume)
        except ValueError as e:  # nothing to normalise: every voxel NaN / infinite
            raise bad_request(f"the image {Path(path).name!r} cannot be used: {e}") from e

    @staticmethod
    def slice_axis(volume: MetaTensor) -> str:
        """The plane Slicer's ``slice`` / IJK ``k`` indexes (voxel axis 2)."""
        return plane_along_voxel_axis(volume, 2)

    @staticmethod
    def image_key(volume: MetaTensor) -> str:
        """The key of the image a volume was read from: its path with the file's mtime and size, so a grounding
        of a file that was since replaced (``PUT /datastore/image`` with the same id) is not refined."""
        source = volume.meta.get("filename_or_obj")
        key = VolumeCache.key_of(source) if isinstance(source, str) else None
        return repr(key) if key is not None else str(id(volume))

    # -- model calls (serialised); volumes come back as (X, Y, Z) arrays ----------------------------
    def ground(
        self,
        volume: MetaTensor,
        texts: list[str],
        slices: list[int] | None,
        axis: str,
        keyframes: int | None | str = "default",
    ) -> tuple[np.ndarray, dict[str, int], dict[str, Any]]:
        """Ground every text ("liver" or a request) on the given slices (None = all); ``keyframes`` overrides the
        ``--conf keyframes`` setting (None = exact).

        Returns the label volume, ``{text: label value}`` and the result's JSON summary.
        """
        every = self.keyframes if keyframes == "default" else keyframes
        with self._model_lock, pipeline_errors():
            result = self.pipeline.ground_volume(
                volume,
                texts,
                axis=axis,
                slices=slices,
                force_seg=self.force_seg,
                fast=self.fast_grounding,
                keyframes=every,
            )
        key = self.image_key(volume)
        for (text, index), prior in result.slice_results.items():
            self._groundings.put(repr((key, axis, index, text)), prior)
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
            key = repr((self.image_key(volume), axis, index, text))
            prior = self._groundings.get(key)
            if prior is None:
                self.ground(volume, [text], [index], axis)
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


def load_volume(path: str, limits: VolumeLimits | None = None) -> MetaTensor:
    """Read an image file / DICOM folder as ``(1, X, Y, Z)``: 413 over ``limits`` (checked on the header, before
    decoding), 415 if unreadable, 400 if it is not a 3D volume. Messages name the file, never a server path."""
    from monai_medplib.io.readers import load_volume as read_volume

    name = Path(path).name
    suffix = "".join(Path(path).suffixes).lower()
    if suffix.endswith(IMAGE_2D_SUFFIXES):
        raise bad_request(
            f"this task needs a 3D volume; got a 2D picture ({suffix}). Use a CT / MR series, NIfTI or NRRD volume."
        )
    try:
        if limits is not None:
            limits.check(probe_volume(path), name)
        img = read_volume(path)
    except FileNotFoundError as e:
        raise bad_request(f"image not found: {name!r}", 404) from e
    except VolumeTooLarge as e:
        raise bad_request(str(e), 413) from e
    except UserInputError as e:  # no readable header: empty, text, not an image
        raise bad_request(f"could not read the image: {e}", 415) from e
    except ValueError as e:  # 2D / 4D images, mixed series
        raise bad_request(f"this task needs a 3D volume: {str(e).replace(str(path), name)}") from e
    except Exception as e:  # every reader failed: not an image at all, or truncated data
        raise bad_request(
            f"could not read the image {name!r} as a medical image: the file is truncated, corrupt or not an "
            f"image ({type(e).__name__})",
            415,
        ) from e
    if min(img.shape[1:]) < 2:
        raise bad_request(f"this task needs a 3D volume; got shape {tuple(img.shape)} (a single slice)")
    return img


def load_label(path: str, shape: tuple[int, ...], limits: VolumeLimits | None = None) -> np.ndarray:
    """A label volume uploaded with the request (Slicer scribbles) as ``(X, Y, Z)`` ints matching ``shape``; the
    header is checked against ``limits`` and ``shape`` before the data is decoded."""
    from monai.transforms import LoadImage

    name = Path(path).name
    try:
        header = probe_volume(path)
        (limits or VolumeLimits()).check(header, name)
        header.check_label(name)
    except VolumeTooLarge as e:
        raise bad_request(f"the uploaded label is too large: {e}", 413) from e
    except UserInputError as e:
        raise bad_request(f"could not read the uploaded label: {e}", 415) from e
    if tuple(n for n in header.shape if n != 1) != tuple(n for n in shape if n != 1):
        raise bad_request(
            f"the uploaded label {name!r} has shape {header.shape}; the image has {tuple(shape)}"
        )
    try:
        lab = LoadImage(image_only=True)(path)
    except Exception as e:
        raise bad_request(
            f"could not read the uploaded label {name!r}: the file is truncated, corrupt or not an image "
            f"({type(e).__name__})",
            415,
        ) from e
    arr = np.asarray(lab)
    if arr.ndim == 4 and 1 in (arr.shape[0], arr.shape[-1]):
        arr = arr.squeeze(0 if arr.shape[0] == 1 else -1)
    if arr.shape != tuple(shape):
        raise bad_request(f"the uploaded label has shape {arr.shape}; the image has {tuple(shape)}")
    return np.rint(arr).astype(np.int32)
