"""Client-side helpers for the MONAI Label app tests: the 3D Slicer client, OHIF-shaped requests, test volumes."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import requests

SLICER_CLIENT_REL = Path("monailabel/plugins/slicer/MONAILabel/MONAILabelLib/client.py")


def slicer_client_path() -> Path:
    """``MONAILabelLib/client.py`` as installed by the monailabel wheel (data files under ``sys.prefix``)."""
    import monailabel

    candidates = [
        Path(sys.prefix) / SLICER_CLIENT_REL,
        Path(monailabel.__file__).parents[1] / SLICER_CLIENT_REL,
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"3D Slicer's MONAILabelLib/client.py not found in {[str(c) for c in candidates]}"
    )


def load_slicer_client_module() -> Any:
    """Import the Slicer module's client by file path (it is not an importable package)."""
    spec = importlib.util.spec_from_file_location("slicer_monailabel_client", slicer_client_path())
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def slicer_infer(client: Any, model: str, image_id: str, params: dict, label_in: str | None = None):
    """What ``MONAILabelLogic.infer`` in the Slicer module does: force .nrrd / uint8 and call the client."""
    params = dict(params)
    params["result_extension"] = ".nrrd"
    params["result_dtype"] = "uint8"
    return client.infer(model, image_id, params, label_in=label_in)


def slicer_config_params(info: dict, model: str) -> dict:
    """Slicer's ``getParamsFromConfig("infer", model)``: the /info config, first element of any list."""
    config = info["models"][model].get("config", {})
    return {k: v[0] if isinstance(v, list) else v for k, v in config.items()}


def ohif_infer(
    url: str, model: str, series_uid: str, params: dict, timeout: float = 120
) -> requests.Response:
    """A request shaped like the OHIF v3 plugin's ``MonaiLabelClient.infer``: output=image + form params."""
    body = dict(params)
    body.update(
        result_extension=".nrrd", result_dtype="uint8", result_compress=False, restore_label_idx=False
    )
    return requests.post(
        f"{url}/infer/{model}",
        params={"image": series_uid, "output": "image"},
        files={"params": (None, json.dumps(body))},
        timeout=timeout,
    )


@dataclass(frozen=True)
class SlabVolume:
    """A volume written for the server tests: its (i, j, k) array, voxel -> RAS affine and true liver."""

    image: np.ndarray
    affine: np.ndarray
    liver: np.ndarray  # bool (i, j, k): LiTS liver + tumour


def write_lits_slab(path: Path, first: int = 58, count: int = 12, flip_i: bool = True) -> SlabVolume:
    """``count`` axial slices of the real LiTS CT from ``first`` on, as a NIfTI the demo model can ground.

    With ``flip_i`` the array is stored mirrored along i and the affine mirrors back (another voxel order
    for the same anatomy): results must come back in this file's own voxel grid, liver on the liver.
    """
    import nibabel as nib

    from monai_medplib.data.lits import load_lits_case

    case = load_lits_case()
    image = case.image[:, :, first : first + count]
    liver = case.label[:, :, first : first + count] >= 1
    affine = case.affine.copy()
    affine[:3, 3] = (case.affine @ [0, 0, first, 1])[:3]
    if flip_i:
        image, liver = image[::-1], liver[::-1]
        affine[:3, 3] = (affine @ [image.shape[0] - 1, 0, 0, 1])[:3]
        affine[:3, 0] *= -1
    image, liver = np.ascontiguousarray(image), np.ascontiguousarray(liver)
    nib.save(nib.Nifti1Image(image, affine), str(path))
    return SlabVolume(image, affine, liver)


def dice(pred: np.ndarray, true: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    total = int(pred.sum()) + int(true.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & true).sum()) / total


def read_result(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A result label as an (i, j, k) array and its voxel -> RAS affine (read with SimpleITK, independently)."""
    import SimpleITK as sitk

    img = sitk.ReadImage(path)
    arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)  # (k, j, i) -> (i, j, k)
    direction = np.array(img.GetDirection()).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    return arr, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS
