"""One study per bundle prompt: the ``network_def`` loader and the runner the MONAI Bundle configs instantiate.

The bundle only picks inputs, prompts and outputs; every model, geometry and file-format step lives in the
library (:mod:`monai_medplib.pipeline`, :mod:`monai_medplib.io`). This module:

* :func:`resolve_ckpt_path`, :func:`load_pipeline` and :func:`model_dir` turn the bundle's ``ckpt_path``
  (``"demo"``, ``"release"`` or a folder) into a model directory or a loaded pipeline;
* :class:`BundlePromptRunner` validates one prompt (:func:`~monai_medplib.adapters.bundle.prompts.parse_prompt`),
  routes it to the pipeline and writes the outputs of one study into ``output_dir/<id>/``: the label as NIfTI
  (volumes) or PNG (2D images), a DICOM-SEG beside it when the input is a DICOM series folder, and
  ``<id>_answer.json`` (written last: it marks the study as done).

Cohorts of studies are :mod:`monai_medplib.adapters.bundle.cohort`; the MeCoVQA evaluator is
:mod:`monai_medplib.adapters.bundle.evaluator`.
"""

from __future__ import annotations

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
from ...io.outputs import save_png, write_json
from ...pipeline import MedPLIBPipeline
from ...pipeline.results import label_from_probs
from ...tokenization import grounding_prompt
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
            f" (run `python -m monai.bundle download_large_files --bundle_path {bundle_root}` first, "
            "or pass --ckpt_path with a local copy of Huangxs/MedPLIB-7b-2e)"
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
) -> MedPLIBPipeline:
    """The bundle's ``network_def``: a :class:`MedPLIBPipeline` with the 2D and the volume methods."""
    path = resolve_ckpt_path(ckpt_path, bundle_root)
    resolve_model_path(path)  # "demo" without the demo package fails here, with a clear message
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return MedPLIBPipeline.from_pretrained(path, device=device, dtype=dtype, template=template)


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


def study_done(output_dir: str | os.PathLike, study: str) -> bool:
    return answer_path(output_dir, study).is_file()


class BundlePromptRunner:
    """Run bundle prompts through a :class:`MedPLIBPipeline` and write each study's outputs.

    Args:
        pipeline: the loaded pipeline (the bundle's ``network_def``).
        output_dir: where ``<id>/`` folders are written.
        max_new_tokens: decoding budget per answer.
        force_seg: force ``<SEG></s>`` when grounding (models that never emit ``<SEG>``, e.g. random weights).
        fast_grounding: opt-in one-prefill grounding (checked per slice, generation where ``<SEG>`` is not the
            first token); several texts on a slice then share its prompt prefix.
        intensity: volume intensity mapping ("samed2d", "uint8", a CT window preset name).
        batch_size: slices per batch when grounding a volume.
        output_ext: label volume extension (".nii.gz" or ".nii").
        output_postfix: label file name postfix.
        overwrite: recompute studies whose answer JSON exists (default: skip them).
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
    ) -> None:
        if output_ext not in (".nii.gz", ".nii"):
            raise ValueError(f"output_ext must be '.nii.gz' or '.nii', got {output_ext!r}")
        self.pipeline = pipeline
        self.output_dir = Path(output_dir)
        self.max_new_tokens = int(max_new_tokens)
        self.force_seg = bool(force_seg)
        self.fast_grounding = bool(fast_grounding)
        self.intensity = intensity
        self.batch_size = int(batch_size)
        self.output_ext = output_ext
        self.output_postfix = output_postfix
        self.overwrite = overwrite

    def run(self, data: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Process every prompt of ``data`` (the bundle's ``dataset``); errors propagate (one study per call)."""
        return [self(d) for d in data]

    def __call__(self, input_dict: Mapping[str, Any]) -> dict[str, Any]:
        prompt = parse_prompt(input_dict)
        out_json = answer_path(self.output_dir, prompt.id)
        if not self.overwrite and out_json.is_file():
            logger.info("%s: outputs exist, skipped", prompt.id)
            return json.loads(out_json.read_text())
        start = time.perf_counter()
        result: dict[str, Any] = {
            "id": prompt.id,
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

    # -- 2D images
    def _image(self, prompt: BundlePrompt, result: dict[str, Any]) -> None:
        gen = {"max_new_tokens": self.max_new_tokens}
        if prompt.question is not None:
            if prompt.has_region:
                answer = self.pipeline.answer_region(
                    str(prompt.image),
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
                    "answer": self.pipeline.answer(str(prompt.image), prompt.question, **gen),
                }
        if prompt.texts:
            grounded = [
                self.pipeline.ground(
                    str(prompt.image),
                    grounding_prompt(t),  # "liver" -> "Please segment the liver."
                    force_seg=self.force_seg,
                    fast=self.fast_grounding,
                    **gen,
                )
                for t in prompt.texts
            ]
            label = label_from_probs(torch.stack([torch.as_tensor(g.probs) for g in grounded])).numpy()
            path = save_png(label, self.output_dir / prompt.id / f"{prompt.id}_{self.output_postfix}.png")
            result["outputs"]["label"] = str(path)
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
                progress=False,
                keep_slice_results=False,
                **gen,
            )
            files = write_label_volume(
                grounded.label,
                grounded.label_names,
                self.output_dir / prompt.id,
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
