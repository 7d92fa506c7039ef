"""One study per bundle prompt: the ``network_def`` loader and the runner the MONAI Bundle configs instantiate.

The bundle only picks inputs, prompts and outputs; every model, geometry and file-format step lives in the
library (:mod:`monai_medplib.pipeline`, :mod:`monai_medplib.io`). This module:

* :func:`resolve_ckpt_path`, :func:`load_pipeline` and :func:`model_dir` turn the bundle's ``ckpt_path``
  (``"demo"``, ``"release"`` or a folder) into a model directory or a loaded pipeline;
* :class:`BundlePromptRunner` validates one prompt (:func:`~monai_medplib.adapters.bundle.prompts.parse_prompt`),
  routes it to the pipeline and writes the outputs of one study into ``output_dir/<id>/``: the label as NIfTI
  (volumes) or PNG (2D images: 0 / 255 for one text, like ``medplib ground``; for several texts a label map
  0..n plus one 0 / 255 mask per text), a DICOM-SEG beside it when the input is a DICOM series folder, and
  ``<id>_answer.json`` (written last). A study counts as done when its answer JSON carries the same
  :func:`resume_key` (prompt, settings, model) and every output it lists still exists.

Cohorts of studies are :mod:`monai_medplib.adapters.bundle.cohort`; the MeCoVQA evaluator is
:mod:`monai_medplib.adapters.bundle.evaluator`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...checkpoint import resolve_model_path
from ...io.atomic import check_writable_folder
from ...io.dicom_image import read_dicom_image
from ...io.outputs import save_mask_png, save_png, write_json
from ...io.readers import DICOM_SUFFIX
from ...pipeline import MedPLIBPipeline
from ...pipeline.results import label_from_probs
from ...tokenization import grounding_prompt
from ...user_input import parse_bool, parse_keyframes
from .prompts import (
    AXES,
    PROMPT_KEYS,
    BundlePrompt,
    parse_prompt,
)

__all__ = [
    "AXES",
    "PROMPT_KEYS",
    "BundlePrompt",
    "BundlePromptRunner",
    "load_pipeline",
    "model_dir",
    "require_torchrun",
    "parse_prompt",
    "resolve_ckpt_path",
    "resume_key",
    "study_done",
]

logger = logging.getLogger(__name__)

RELEASE_SUBDIR = (
    "models/MedPLIB-7b-2e"  # where download_large_files puts the release weights (large_files.yml)
)
ANSWER_SUFFIX = "_answer.json"


# ------------------------------------------------------------------------------------------ weights
def resolve_ckpt_path(ckpt_path: str | os.PathLike = "demo", bundle_root: str | os.PathLike = ".") -> str:
    """``"demo"`` stays ``"demo"`` (the shipped demo model); ``"release"`` -> ``<bundle_root>/models/MedPLIB-7b-2e``
    (filled by ``python -m monai.bundle download_large_files``); anything else is a model directory path.

    Raises:
        FileNotFoundError: the directory does not exist (the message says how to get the release weights).
    """
    text = str(ckpt_path)
    if text == "demo":
        return text
    path = Path(bundle_root) / RELEASE_SUBDIR if text == "release" else Path(text)
    if not path.is_dir():
        hint = (
            f" (fetch it first: `hf download Huangxs/MedPLIB-7b-2e --local-dir {path}`; large_files.yml says why "
            "download_large_files cannot list it), or pass --ckpt_path with a local copy of Huangxs/MedPLIB-7b-2e)"
            if text == "release"
            else ""
        )
        raise FileNotFoundError(f"ckpt_path: model directory not found: {path}{hint}")
    return str(path)


def load_pipeline(
    ckpt_path: str | os.PathLike = "demo",
    bundle_root: str | os.PathLike = ".",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    template: str = "vicuna_v1",
    clip_path: str | os.PathLike | None = None,
    sam_path: str | os.PathLike | None = None,
    quantization: str | None = None,
) -> MedPLIBPipeline:
    """The bundle's ``network_def``: a :class:`MedPLIBPipeline` with the 2D and the volume methods.

    ``clip_path`` / ``sam_path``: separate CLIP ViT-L/14-336 and SAM-Med2D weights (large_files.yml) for a checkpoint
    that lacks those keys; the release checkpoint holds them. ``quantization``: ``"int8"`` / ``"int4"`` quantises
    the LLM while loading (the ``quant`` extra), None keeps the released weights.
    """
    path = resolve_ckpt_path(ckpt_path, bundle_root)
    resolve_model_path(path)  # "demo" without the demo package fails here, with a clear message
    components = {}
    for name, value in (("clip_path", clip_path), ("sam_path", sam_path)):
        if value is not None:
            if not Path(value).exists():
                raise FileNotFoundError(f"{name}: not found: {value}")
            components[name] = value
    return MedPLIBPipeline.from_pretrained(
        path, device=device, dtype=dtype, template=template, quantization=quantization, **components
    )


def model_dir(ckpt_path: str | os.PathLike = "demo", bundle_root: str | os.PathLike = ".") -> str:
    """The model directory ``ckpt_path`` names ("demo" -> the shipped demo model's folder); training's ``init``."""
    return str(resolve_model_path(resolve_ckpt_path(ckpt_path, bundle_root)))


def require_torchrun(what: str = "this config") -> int:
    """``WORLD_SIZE`` set by ``torchrun``; raises a clear error when the multi-process overlay runs without it."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise RuntimeError(
            f"{what} runs one process per device: launch it with torchrun, e.g. "
            '`torchrun --nproc_per_node 2 -m monai.bundle run --config_file "[...]"`'
        )
    return int(os.environ["WORLD_SIZE"])


# ------------------------------------------------------------------------------------------ one study
def answer_path(output_dir: str | os.PathLike, study: str) -> Path:
    """``output_dir/<study>/<study>_answer.json``: written last, so its presence means the study is done."""
    return Path(output_dir) / study / f"{study}{ANSWER_SUFFIX}"


def files_stat(path: Path, suffixes: tuple[str, ...] = ()) -> list:
    """Size and modification time of a file, or of every file of a folder (a DICOM series rewritten in place
    leaves the folder's own entry as it was); with ``suffixes``, only files ending so (a model's weights)."""
    if not path.is_dir():
        stat = path.stat()
        return [stat.st_size, stat.st_mtime_ns]
    stats = []
    for f in sorted(path.rglob("*")):
        if (not suffixes or f.name.endswith(suffixes)) and f.is_file():
            stat = f.stat()  # once per file: a series holds hundreds, and every study's key reads them
            stats.append([str(f.relative_to(path)), stat.st_size, stat.st_mtime_ns])
    return stats


def resume_key(prompt: BundlePrompt, settings: Mapping[str, Any]) -> str:
    """A digest of everything that decides a study's outputs: the prompt as parsed, the input's size and
    modification time, the runner's settings and the model; a finished study is reused only when its answer JSON
    carries the same key."""
    described = {
        "prompt": {k: str(v) if isinstance(v, Path) else v for k, v in vars(prompt).items()},
        "image_stat": files_stat(prompt.image),
        "region_mask_stat": None if prompt.region_mask is None else files_stat(prompt.region_mask),
        **settings,
    }
    text = json.dumps(described, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def study_done(output_dir: str | os.PathLike, study: str, key: str | None = None) -> bool:
    """``<study>_answer.json`` exists, carries ``key`` (when given) and every output it lists still exists."""
    path = answer_path(output_dir, study)
    if not path.is_file():
        return False
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return False  # an unreadable answer (a run killed mid-write by an older version): redo the study
    if key is not None and saved.get("resume_key") != key:
        return False
    outputs = saved.get("outputs", {})
    files = [v for v in outputs.values() if isinstance(v, str)]
    files += [v for group in outputs.values() if isinstance(group, dict) for v in group.values()]
    return all(Path(f).exists() for f in files)


class BundlePromptRunner:
    """Run bundle prompts through a :class:`MedPLIBPipeline` and write each study's outputs.

    Args:
        pipeline: the loaded pipeline (the bundle's ``network_def``).
        output_dir: where ``<id>/`` folders are written.
        max_new_tokens: decoding budget per answer.
        force_seg: force ``<SEG></s>`` when grounding (models that never emit ``<SEG>``, e.g. random weights).
        fast_grounding: opt-in one-prefill grounding (checked per slice, generation where ``<SEG>`` is not the
            first token); several texts on a slice then share its prompt prefix.
        keyframes: opt-in keyframe grounding of volumes: the LLM on every k-th slice (plus the slices the
            adaptive check adds), the others decoded with their neighbouring keys' prompt; None = exact.
        intensity: volume intensity mapping ("samed2d", "uint8", a CT window preset name).
        batch_size: slices per batch when grounding a volume.
        output_ext: label volume extension (".nii.gz" or ".nii").
        output_postfix: label file name postfix.
        overwrite: recompute every study; False reuses a finished study with the same prompt, settings and model
            (see :func:`study_done`).
        model: the folder ``network_def`` loaded (the bundle's resolved ``ckpt_path``): it and the size and time of
            its weight and config files are part of the resume key.
        components: the separate weights ``network_def`` loaded (``{"clip_path": ..., "sam_path": ...}``, None
            for one not given): their paths, sizes and times are part of the resume key too.
    """

    def __init__(
        self,
        pipeline: MedPLIBPipeline,
        output_dir: str | os.PathLike,
        max_new_tokens: int = 64,
        force_seg: bool = False,
        intensity: str = "samed2d",
        batch_size: int = 8,
        output_ext: str = ".nii.gz",
        output_postfix: str = "seg",
        overwrite: bool = True,
        fast_grounding: bool = False,
        model: str | os.PathLike | None = None,
        keyframes: int | str | None = None,
        components: Mapping[str, str | os.PathLike | None] | None = None,
    ) -> None:
        if output_ext not in (".nii.gz", ".nii"):
            raise ValueError(f"output_ext must be '.nii.gz' or '.nii', got {output_ext!r}")
        try:  # before any study runs: a cohort must not compute every study and then fail to write them
            check_writable_folder(output_dir)
        except OSError as err:
            raise ValueError(f"output_dir {output_dir}: cannot write there ({err.strerror or err})") from None
        self.pipeline = pipeline
        self.output_dir = Path(output_dir)
        self.max_new_tokens = int(max_new_tokens)
        # bundle overrides arrive as text too (--force_seg false): bool("false") would be True
        self.force_seg = parse_bool(force_seg, "force_seg")
        self.fast_grounding = parse_bool(fast_grounding, "fast_grounding")
        self.keyframes = parse_keyframes(keyframes, "keyframes")
        self.intensity = intensity
        self.batch_size = int(batch_size)
        self.output_ext = output_ext
        self.output_postfix = output_postfix
        self.overwrite = parse_bool(overwrite, "overwrite")
        self.model = None if model is None else str(model)
        self._model_files: list | None = None
        self.components = {k: str(v) for k, v in (components or {}).items() if v is not None}
        self._component_files: dict[str, list] | None = None

    def settings(self) -> dict[str, Any]:
        """The settings that change a study's outputs (batching does not: batched calls equal single ones)."""
        quantization = getattr(getattr(self.pipeline, "model", None), "quantization", None)
        placement = getattr(self.pipeline, "placement", None)
        return {
            "model": self.model,
            "model_files": self.model_files(),
            "components": self.components,
            "component_files": self.component_files(),
            "quantization": None if quantization is None else quantization.mode,
            # the LLM's and the image encoders' dtypes (they differ under quantisation) and the prompt template
            "dtype": str(getattr(self.pipeline, "dtype", None)),
            "vision_dtype": str(placement("vision")[1]) if placement is not None else None,
            "template": getattr(self.pipeline, "template", None),
            "max_new_tokens": self.max_new_tokens,
            "force_seg": self.force_seg,
            "fast_grounding": self.fast_grounding,
            "keyframes": self.keyframes,
            "intensity": self.intensity,
            "output_ext": self.output_ext,
            "output_postfix": self.output_postfix,
        }

    def model_files(self) -> list | None:
        """Size and time of the model's weight and config files (a retrain into the same folder is another
        model), read once per run."""
        if self._model_files is None and self.model is not None:
            try:
                folder = resolve_model_path(self.model)
            except (OSError, ValueError):
                return None
            self._model_files = files_stat(Path(folder), (".safetensors", ".bin", ".json", ".model"))
        return self._model_files

    def component_files(self) -> dict[str, list]:
        """Size and time of the separate CLIP / SAM-Med2D weights (replaced in place, they make another model),
        read once per run."""
        if self._component_files is None:
            self._component_files = {
                k: files_stat(Path(v)) for k, v in self.components.items() if Path(v).exists()
            }
        return self._component_files

    def is_done(self, input_dict: Mapping[str, Any]) -> bool:
        """The study's outputs exist for this very prompt, settings and model (False if the prompt is invalid)."""
        try:
            prompt = parse_prompt(input_dict)
        except (ValueError, TypeError, OSError):
            return False  # running it reports the problem
        return study_done(self.output_dir, prompt.id, resume_key(prompt, self.settings()))

    def _study_dir(self, prompt: BundlePrompt) -> Path:
        folder = self.output_dir / prompt.id
        if folder.resolve().parent != self.output_dir.resolve():
            raise ValueError(
                f"input_dict['id']: {prompt.id!r} would write outside output_dir {self.output_dir}"
            )
        return folder

    def run(self, data: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Process every prompt of ``data`` (the bundle's ``dataset``); errors propagate (one study per call)."""
        return [self(d) for d in data]

    def __call__(self, input_dict: Mapping[str, Any]) -> dict[str, Any]:
        prompt = parse_prompt(input_dict)
        self._study_dir(prompt)
        out_json = answer_path(self.output_dir, prompt.id)
        key = resume_key(prompt, self.settings())
        if not self.overwrite and study_done(self.output_dir, prompt.id, key):
            logger.info("%s: outputs exist for this prompt and settings, skipped", prompt.id)
            return json.loads(out_json.read_text())
        self._clear_previous(prompt)
        start = time.perf_counter()
        result: dict[str, Any] = {
            "id": prompt.id,
            "resume_key": key,
            "image": str(prompt.image),
            "kind": "volume" if prompt.is_volume else "image",
            "outputs": {},
        }
        if prompt.is_volume:
            result["axis"] = prompt.axis
            self._volume(prompt, result)
        else:
            self._image(prompt, result)
        result["seconds"] = round(time.perf_counter() - start, 3)
        result["outputs"]["answer"] = str(out_json)
        write_json(out_json, result)
        logger.info("%s: done in %.1f s -> %s", prompt.id, result["seconds"], out_json.parent)
        return result

    def _clear_previous(self, prompt: BundlePrompt) -> None:
        """Remove an earlier run's outputs of this study before it is run again: the answer first (a run killed
        now leaves a study that is not done, not an old answer beside new labels), then every ``<id>_*`` file (a
        DICOM-SEG or per-text mask the new run does not write would otherwise stay, contradicting its answer)."""
        folder = self._study_dir(prompt)
        answer_path(self.output_dir, prompt.id).unlink(missing_ok=True)
        if folder.is_dir():
            for old in folder.glob(f"{glob.escape(prompt.id)}_*"):
                if old.is_file():
                    old.unlink()

    # -- 2D images
    def _image(self, prompt: BundlePrompt, result: dict[str, Any]) -> None:
        gen = {"max_new_tokens": self.max_new_tokens}
        # a single-frame DICOM file is decoded as the CLI decodes it (modality LUT, SA-Med2D percentiles); pictures
        # go to the pipeline by path
        image = (
            read_dicom_image(prompt.image)
            if prompt.image.name.lower().endswith(DICOM_SUFFIX)
            else str(prompt.image)
        )
        if prompt.question is not None:
            if prompt.has_region:
                answer = self.pipeline.answer_region(
                    image,
                    prompt.question,
                    mask=None if prompt.region_mask is None else str(prompt.region_mask),
                    points=None if prompt.points is None else [list(p) for p in prompt.points],
                    box=None if prompt.box is None else list(prompt.box),
                    **gen,
                )
                result["region_vqa"] = {
                    "question": prompt.question,
                    "answer": answer,
                    "ignored_points": prompt.ignored_points,
                }
            else:
                result["vqa"] = {
                    "question": prompt.question,
                    "answer": self.pipeline.answer(image, prompt.question, **gen),
                }
        if prompt.texts:
            grounded = [
                self.pipeline.ground(
                    image,
                    grounding_prompt(t),  # "liver" -> "Please segment the liver."
                    force_seg=self.force_seg,
                    fast=self.fast_grounding,
                    **gen,
                )
                for t in prompt.texts
            ]
            label = label_from_probs(torch.stack([torch.as_tensor(g.probs) for g in grounded])).numpy()
            stem = self._study_dir(prompt) / f"{prompt.id}_{self.output_postfix}"
            if len(prompt.texts) == 1:  # a mask, 0 / 255 as `medplib ground` writes it
                result["outputs"]["label"] = str(
                    save_mask_png(label == 1, stem.with_name(stem.name + ".png"))
                )
            else:  # a label map (value n = n-th text, as for volumes) and one 0 / 255 mask per text
                result["outputs"]["label"] = str(save_png(label, stem.with_name(stem.name + ".png")))
                result["outputs"]["masks"] = {
                    t: str(save_mask_png(label == n, stem.with_name(f"{stem.name}_{n}.png")))
                    for n, t in enumerate(prompt.texts, start=1)
                }
            result["grounding"] = {
                "label_names": {t: n + 1 for n, t in enumerate(prompt.texts)},
                "answers": {t: g.answer for t, g in zip(prompt.texts, grounded)},
                "has_seg": {t: g.has_seg for t, g in zip(prompt.texts, grounded)},
                "foreground_pixels": {t: int((label == n + 1).sum()) for n, t in enumerate(prompt.texts)},
            }

    # -- volumes
    def _volume(self, prompt: BundlePrompt, result: dict[str, Any]) -> None:
        from ...io import load_volume
        from ...io.outputs import write_label_volume

        gen = {"max_new_tokens": self.max_new_tokens, "intensity": self.intensity}
        volume = load_volume(prompt.image)  # once: the pipeline's memo reuses it for every call below
        if prompt.question is not None and prompt.has_region:
            scribble = None
            if prompt.region_mask is not None:
                scribble = load_volume(prompt.region_mask)[0] > 0
            answer = self.pipeline.answer_volume_region(
                volume,
                prompt.question,
                points=None if prompt.points is None else [list(p) for p in prompt.points],
                roi=None if prompt.box is None else list(prompt.box),
                scribble=scribble,
                axis=prompt.axis,
                index=None if prompt.slices is None else prompt.slices[0],
                **gen,
            )
            result["region_vqa"] = {
                "question": prompt.question,
                "answer": answer.answer,
                "slice_index": answer.slice_index,
                "region_voxels": int(np.count_nonzero(answer.region)),
                "ignored_points": prompt.ignored_points,
            }
        elif prompt.question is not None:
            slices = prompt.slices or (_middle_slice(volume, prompt.axis),)
            result["vqa"] = {
                "question": prompt.question,
                "answers": {
                    str(i): self.pipeline.answer_volume(volume, prompt.question, i, axis=prompt.axis, **gen)
                    for i in slices
                },
            }
        if prompt.texts:
            grounded = self.pipeline.ground_volume(
                volume,
                list(prompt.texts),
                axis=prompt.axis,
                slices=None if prompt.slices is None else list(prompt.slices),
                batch_size=self.batch_size,
                force_seg=self.force_seg,
                fast=self.fast_grounding,
                keyframes=self.keyframes,
                progress=False,
                keep_slice_results=False,
                **gen,
            )
            files = write_label_volume(
                grounded.label,
                grounded.label_names,
                self._study_dir(prompt),
                f"{prompt.id}_{self.output_postfix}",
                dicom_source=prompt.image if prompt.is_dicom_series else None,
                ext=self.output_ext,
                seg_stem=f"{prompt.id}_{self.output_postfix}",
            )
            result["outputs"]["label"] = str(files["nifti"])
            if "dicom_seg" in files:
                result["outputs"]["dicom_seg"] = str(files["dicom_seg"])
            if "dicom_seg_skipped" in files:
                result["dicom_seg_skipped"] = files["dicom_seg_skipped"]
            result["grounding"] = grounded.summary()


def _middle_slice(volume: Any, axis: str) -> int:
    """Index of the middle slice of ``volume`` along an anatomical plane."""
    from ...transforms.slicing import slice_geometry, volume_affine_ras

    return slice_geometry(volume_affine_ras(volume), volume.shape[1:], axis).num_slices // 2
