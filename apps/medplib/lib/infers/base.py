"""Shared request handling for the MedPLIB infer tasks: image loading, result writing, result JSON."""

from __future__ import annotations

import logging
import tempfile
import time
from abc import abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.transform.writer import write_itk

from ..engine import MedPLIBEngine
from ..prompts import bad_request

logger = logging.getLogger(__name__)

# single-file formats only: a result is sent back as one file (.mhd would leave its voxels in a .zraw beside it)
RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha")


class MedPLIBInferTask(InferTask):
    """Base of the MedPLIB tasks: turns a MONAI Label request into an engine call and writes the result.

    Subclasses implement :meth:`run` and return ``(label (X, Y, Z) uint8 or None, result JSON)``. The label is
    written in the request image's voxel grid and affine (into the request's ``result_dir``, which the server
    removes after replying), so clients overlay it without resampling. A task that only answers (VQA) returns
    None: no file is written.

    Args:
        engine: the shared :class:`MedPLIBEngine`.
        type: MONAI Label infer type (what the stock clients dispatch on).
        labels: label names (index order) shown in ``/info``.
        dimension: 2 for slice tasks (clients send the current slice), 3 for volume tasks.
        description: one line shown in the clients.
        config: editable options (free-text fields in Slicer / OHIF), merged into every request.
    """

    def __init__(
        self,
        engine: MedPLIBEngine,
        type: str,
        labels: Any,
        dimension: int,
        description: str,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            type=type, labels=labels, dimension=dimension, description=description, config=config
        )
        self.engine = engine

    def is_valid(self) -> bool:
        return True

    def info(self) -> dict[str, Any]:
        return {**super().info(), "medplib": self.engine.describe()}

    @abstractmethod
    def run(self, request: dict[str, Any], volume: Any) -> tuple[np.ndarray | None, dict[str, Any]]:
        """Do the task on a loaded ``(1, X, Y, Z)`` volume."""

    def __call__(self, request: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        start = time.perf_counter()
        image = request.get("image")
        if not isinstance(image, str):
            raise bad_request("this task needs an image id, a session or an uploaded volume")
        result_extension(request)  # a bad option is refused before any work, also by tasks without a label
        volume = self.engine.volume(image)
        loaded = time.perf_counter()
        label, result = self.run(request, volume)
        inferred = time.perf_counter()
        path = None if label is None else self.write_label(label, volume, request)
        done = time.perf_counter()
        result["latencies"] = {
            "pre": round(loaded - start, 3),
            "infer": round(inferred - loaded, 3),
            "write": round(done - inferred, 3),
            "total": round(done - start, 3),
        }
        result.setdefault("medplib", {}).update(self.engine.describe())
        return path, result

    @staticmethod
    def write_label(label: np.ndarray, volume: Any, request: dict[str, Any]) -> str:
        """Write ``label`` (X, Y, Z) with the image's affine, as ``result_extension`` (default .nii.gz)."""
        shape = tuple(volume.shape[1:])
        if label.shape != shape:
            raise RuntimeError(f"result label has shape {label.shape}, the image {shape}")
        ext = result_extension(request)
        dtype = np.uint16 if label.max(initial=0) > 255 else np.uint8
        compress = str(request.get("result_compress", "true")).lower() not in ("false", "0")
        affine = volume.meta.get("original_affine", volume.affine)
        folder = request.get("result_dir") or tempfile.gettempdir()  # the server always gives one
        handle = tempfile.NamedTemporaryFile(prefix="result_", suffix=ext, dir=folder, delete=False)
        handle.close()
        path = str(Path(handle.name))
        write_itk(
            label.astype(dtype),
            path,
            affine=np.asarray(affine, dtype=np.float64),
            dtype=None,
            compress=compress,
        )
        return path


def result_extension(request: dict[str, Any]) -> str:
    """The requested label file type (``result_extension``, default ``.nii.gz``); 400 for another."""
    ext = str(request.get("result_extension") or ".nii.gz")
    if ext not in RESULT_EXTENSIONS:
        raise bad_request(f"'result_extension' {ext!r} is not one of {list(RESULT_EXTENSIONS)}")
    return ext
