"""The DICOM-SEG that MONAI Label writes for this app (a DICOMweb datastore's final label, ``output=dicom_seg``):
this package's writer (:func:`monai_medplib.io.dicom_seg.write_dicom_seg`) in place of MONAI Label's converter.

MONAI Label's pydicom-seg path gave every SEG a new FrameOfReferenceUID, re-encoded the copied patient and study
text as Latin-1 ("山田" became "??"), and added a template's clinical-trial and reader attributes. The SEG written
here keeps the series' frame of reference and text, names and codes each segment, and is the same object the
``medplib ground-volume`` command writes.
"""

from __future__ import annotations

import contextvars
import importlib
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ...user_input import UserInputError
from .label_info import check_label_info

# Where the converter writes while a label is being saved (a folder removed when the save ends, sent or not);
# unset: a new file in the system temp folder that the caller moves or removes.
SEG_FOLDER: contextvars.ContextVar[Path | None] = contextvars.ContextVar("medplib_seg_folder", default=None)


def label_values(label: Any) -> list[int]:
    """The label values present (not 0), ascending."""
    return [int(v) for v in np.unique(np.asarray(label)) if v != 0]


def described_segments(values: list[int], label_info: Any) -> dict[int, dict[str, Any]]:
    """``{label value: label_info entry}`` from a client's ``label_info``: entries matched on ``id`` when every
    entry has one, else the i-th entry describes the i-th value present (MONAI Label's pairing); a value no entry
    describes gets ``{}``.

    Raises:
        UserInputError: ``label_info`` that cannot describe segments (:func:`.label_info.check_label_info`).
    """
    entries = check_label_info(label_info) or []
    if entries and all("id" in e for e in entries):
        by_id = {int(e["id"]): e for e in entries}
        return {v: by_id.get(v, {}) for v in values}
    return {v: entries[n] if n < len(entries) else {} for n, v in enumerate(values)}


def nifti_to_dicom_seg(series_dir: str, label: str, label_info: Any, file_ext: str = "*", **_: Any) -> str:
    """MONAI Label's converter's signature: the label file ``label`` (on the series' voxel grid) as a DICOM-SEG
    of the series in ``series_dir``; returns the new file (mode 0600) for the caller to send and remove.

    Raises:
        UserInputError: a label with nothing labelled (a SEG holds at least one segmented frame), or
            ``label_info`` that cannot name the segments.
    """
    from ...io.dicom_seg import write_dicom_seg
    from ...io.readers import load_volume

    volume = load_volume(label)
    values = label_values(volume)
    if not values:
        raise UserInputError("the label is empty (nothing was segmented): there is no DICOM-SEG to write")
    described = described_segments(values, label_info)
    names = {v: str(e.get("name") or f"label {v}") for v, e in described.items()}
    colours = {v: [int(c) for c in e["color"]] for v, e in described.items() if e.get("color")}
    handle, out = tempfile.mkstemp(suffix=".dcm", prefix="medplib-seg-", dir=SEG_FOLDER.get())
    os.close(handle)
    try:
        write_dicom_seg(volume, series_dir, out, names, colours=colours)
        os.chmod(out, 0o600)  # patient data in a shared temp folder: for the server's user only
    except BaseException:
        os.unlink(out)
        raise
    return out


def label_info_from_result(info: dict[str, Any]) -> list[dict[str, Any]] | None:
    """DICOM-SEG segment descriptions from an infer result's ``label_names`` ({name: value})."""
    names = (info.get("params") or {}).get("label_names") if isinstance(info, dict) else None
    if not isinstance(names, dict) or not names:
        return None
    model = f"MedPLIB {info.get('model', '')}".strip()
    return [
        {"name": str(name), "id": int(value), "description": str(name), "model_name": model}
        for name, value in sorted(names.items(), key=lambda item: item[1])
    ]


def use_medplib_dicom_seg() -> None:
    """Rebind the converter in the MONAI Label modules that call it, and let ``save_label`` on a DICOMweb
    datastore name the segments from the result's ``label_names``."""
    for module_name in ("monailabel.datastore.dicom", "monailabel.endpoints.infer"):
        module = importlib.import_module(module_name)
        module.nifti_to_dicom_seg = nifti_to_dicom_seg
    from monailabel.datastore.dicom import DICOMWebDatastore

    if getattr(DICOMWebDatastore.save_label, "_medplib", False):
        return
    stock_save_label = DICOMWebDatastore.save_label

    def save_label(self, image_id, label_filename, label_tag, label_info, label_id=""):
        if isinstance(label_info, dict) and not label_info.get("label_info"):
            derived = label_info_from_result(label_info)
            if derived:
                label_info = {**label_info, "label_info": derived}
        return stock_save_label(self, image_id, label_filename, label_tag, label_info, label_id)

    save_label._medplib = True
    DICOMWebDatastore.save_label = save_label
