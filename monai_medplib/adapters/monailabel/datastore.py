"""MONAI Label datastores that hold only what they should, and never half a file.

:class:`GuardedLocalDatastore` (a local studies folder) differs from MONAI Label's ``LocalDatastore`` in:

* names: image ids and label tags follow :mod:`.names`; a destination must resolve inside the folder;
* content: an image is stored only if its header is within the size limits and it decodes completely as a 3D
  volume; a label only if it matches its image's size and holds whole numbers (OHIF's raw ``.bin`` labels are
  converted with the image's geometry);
* atomic saves: a file is copied into the staging folder on the same file system, flushed, then renamed over
  the final name, so a server killed mid-save leaves the previous label intact; the datastore JSON is written
  the same way;
* listing: volume files only; dot-files, the server's state folder and files named like masks (``*_seg``,
  ``*mask*``, ``segmentation-*``, ...) are not studies (``--conf list_masks true`` lists them).

:class:`GuardedDICOMWebDatastore` checks series ids are DICOM UIDs before MONAI Label uses them in cache paths.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import requests
from filelock import FileLock
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException

from ...io.atomic import atomic_write_text
from ...io.readers import VOLUME_SUFFIXES, VolumeHeader, VolumeLimits, load_volume, probe_volume
from ...user_input import UserInputError, first_line
from . import names
from .errors import UpstreamError
from .seg_export import SEG_FOLDER
from .settings import STATE_FOLDER
from .uploads import Staging

logger = logging.getLogger(__name__)

# Single-file volumes a datastore stores (.mhd needs its .raw beside it, so it cannot be uploaded alone).
STORED_SUFFIXES = tuple(s for s in VOLUME_SUFFIXES if s != ".mhd")
BINARY_LABEL_SUFFIX = ".bin"  # OHIF's raw labelmap: one uint8 per voxel of the image, Fortran order
MASK_WORDS = frozenset(
    {"seg", "segmentation", "mask", "masks", "label", "labels", "labelmap", "gt", "groundtruth"}
)


def volume_suffix(name: str) -> str | None:
    """The stored suffix ``name`` ends with (longest first: ``.nii.gz`` before ``.nii``), or None."""
    lower = name.lower()
    for suffix in sorted(STORED_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return name[len(name) - len(suffix) :]
    return None


def looks_like_mask(name: str) -> bool:
    """True for file names that mark a segmentation rather than an image (``liver_seg.nii.gz``,
    ``segmentation-0.nii``, ``ct_mask.nrrd``, ``case1.seg.nrrd``)."""
    stem = name.lower()
    suffix = volume_suffix(stem)
    stem = stem[: len(stem) - len(suffix)] if suffix else stem
    return bool(MASK_WORDS & set(re.split(r"[^a-z0-9]+", stem)))


def _spatial(header: VolumeHeader) -> tuple[int, ...]:
    shape = list(header.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape.pop()
    return tuple(shape)


def _size(shape: tuple[int, ...]) -> str:
    return " x ".join(str(n) for n in shape)


def _decode(path: Path, name: str, what: str) -> Any:
    """The volume at ``path`` read completely; a user error naming ``name`` if it does not decode."""
    try:
        return load_volume(path)
    except (UserInputError, ValueError) as err:
        raise UserInputError(f"{what} {name!r}: {str(err).replace(str(path), name)}") from err
    except Exception as err:  # truncated data, broken compression: every reader fails in its own way
        raise UserInputError(
            f"{what} {name!r} cannot be decoded: the file is truncated or corrupt ({type(err).__name__})"
        ) from err


def check_image_file(path: Path, name: str, limits: VolumeLimits) -> VolumeHeader:
    """Check an uploaded image: known suffix, header within ``limits``, decodes completely as a 3D volume.

    Raises:
        UserInputError: naming ``name`` (the client's file name) and the problem.
    """
    if volume_suffix(name) is None:
        raise UserInputError(f"{name!r} is not a volume file; the server stores {', '.join(STORED_SUFFIXES)}")
    header = probe_volume(path)
    limits.check(header, name)
    if not np.isfinite(np.asarray(_decode(path, name, "image"))).any():
        raise UserInputError(f"image {name!r} has no finite voxel (all NaN / infinite once read as float32)")
    return header


def check_label_file(path: Path, name: str, image: VolumeHeader, limits: VolumeLimits) -> int:
    """Check an uploaded label against its image: same size, whole non-negative values, decodes completely.
    Returns how many voxels it labels.

    Raises:
        UserInputError: naming ``name`` and the problem.
    """
    if volume_suffix(name) is None:
        raise UserInputError(
            f"label {name!r} is not a volume file; the server stores {', '.join(STORED_SUFFIXES)}"
        )
    header = probe_volume(path)
    limits.check(header, name)
    header.check_label(name)
    if _spatial(header) != _spatial(image):
        raise UserInputError(
            f"label {name!r} has size {_size(_spatial(header))}; its image has {_size(_spatial(image))}"
        )
    values = np.asarray(_decode(path, name, "label"))
    if values.size and (values.min() < 0 or not np.array_equal(values, np.rint(values))):
        raise UserInputError(
            f"label {name!r} holds values that are not whole numbers >= 0 (a label holds 0, 1, 2, ...)"
        )
    return int(np.count_nonzero(values))


def binary_label_to_nifti(
    image_path: str | Path, upload: Path, work: Path, limits: VolumeLimits | None = None
) -> Path:
    """An OHIF ``.bin`` label (one uint8 per voxel, Fortran order) as a NIfTI on the image's grid, in ``work``.

    The image's header is checked against ``limits`` and the byte count against its voxel count before the image is
    decoded: a request's upload must not make the server decode a volume it would refuse.

    Raises:
        UserInputError: the byte count does not match the image's voxel count.
        VolumeTooLarge: the image is over ``limits``.
    """
    import nibabel as nib

    header = probe_volume(image_path)
    (limits or VolumeLimits()).check(header, Path(image_path).name)
    spatial = _spatial(header)
    expected = int(np.prod(spatial))
    if upload.stat().st_size != expected:
        raise UserInputError(
            f"label {upload.name!r} has {upload.stat().st_size:,} bytes; a raw label of its image "
            f"({_size(spatial)}) has {expected:,} (one byte per voxel)"
        )
    image = load_volume(image_path)
    shape = tuple(int(n) for n in image.shape[1:])
    values = np.fromfile(upload, dtype=np.uint8).reshape(shape, order="F")
    affine = np.asarray(image.meta.get("original_affine", image.affine), dtype=np.float64)
    # a folder of its own: the image may sit in ``work`` under the label's name (infer uploads x.nii.gz + x.bin)
    out = (
        Path(tempfile.mkdtemp(prefix="bin-label-", dir=work))
        / f"{upload.name[: -len(BINARY_LABEL_SUFFIX)]}.nii.gz"
    )
    nib.save(nib.Nifti1Image(values, affine), str(out))
    return out


class GuardedLocalDatastore(LocalDatastore):
    """A local studies folder for a server next to patient data (see the module docstring).

    Args:
        datastore_path: the studies folder.
        limits: size limits for stored images and labels.
        list_masks: list files named like masks as studies too.
        auto_reload: watch the folder for changes (MONAI Label's setting).
        read_only: do not reconcile the datastore JSON with the folder at start-up.
    """

    def __init__(
        self,
        datastore_path: str,
        limits: VolumeLimits | None = None,
        list_masks: bool = False,
        auto_reload: bool = False,
        read_only: bool = False,
    ) -> None:
        # set before the base class lists the folder (it calls the overrides below)
        self._limits = limits or VolumeLimits()
        self._list_masks = list_masks
        self._staging = Staging(Path(datastore_path) / STATE_FOLDER / "staging")
        super().__init__(
            datastore_path,
            extensions=[f"*{s}" for s in STORED_SUFFIXES],
            auto_reload=auto_reload,
            read_only=read_only,
        )

    @property
    def staging(self) -> Staging:
        return self._staging

    # -- listing ---------------------------------------------------------------------------------
    def _list_files(self, path: str, patterns: Any) -> dict[str, str]:
        listed = super()._list_files(path, patterns)
        images = os.path.realpath(path) == os.path.realpath(self._datastore.image_path())
        return {
            k: v
            for k, v in listed.items()
            if not k.startswith(".")
            and os.path.isfile(os.path.join(path, v))
            and not (images and not self._list_masks and looks_like_mask(k))
        }

    def _remove_non_existing(self) -> int:
        removed = super()._remove_non_existing()
        if self._list_masks:
            return removed
        masks = [i for i, obj in self._datastore.objects.items() if looks_like_mask(i + obj.image.ext)]
        for image_id in masks:  # listed by an earlier start that did not skip them
            del self._datastore.objects[image_id]
        return removed + len(masks)

    def _update_datastore_file(self, lock: bool = True) -> None:
        def write() -> None:
            self._ignore_event_config = True
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            atomic_write_text(self._datastore_config_path, text)
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()

    # -- writes ----------------------------------------------------------------------------------
    def _place(self, source: str | Path, dest: Path, root: str) -> None:
        """Copy ``source`` to ``dest`` atomically (staged on the same file system, flushed, renamed)."""
        names.inside(dest, root)
        with self._staging.folder() as folder:
            staged = folder / dest.name
            with open(source, "rb") as src, open(staged, "wb") as out:
                shutil.copyfileobj(src, out, 1024**2)
                out.flush()
                os.fsync(out.fileno())
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, dest)

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        """Store an image under ``image_id`` (default: its file name without the suffix), checked first."""
        upload = Path(image_filename)
        suffix = volume_suffix(upload.name)
        if suffix is None:
            raise UserInputError(
                f"{upload.name!r} is not a volume file; the server stores {', '.join(STORED_SUFFIXES)}"
            )
        image_id = names.image_id(image_id or upload.name[: -len(suffix)])
        if not self._list_masks and looks_like_mask(image_id + suffix):
            # the listing hides mask-named files, so such an image (and its labels) would vanish at the next refresh
            raise UserInputError(
                f"image id {image_id!r} reads like a mask file name ({', '.join(sorted(MASK_WORDS))}); the server "
                "does not list such files as studies (conf list_masks=false): give the image another id"
            )
        header = check_image_file(upload, upload.name, self._limits)
        folder = self._datastore.image_path()
        name = self._filename(image_id, suffix)
        with FileLock(self._lock_file):
            previous = self._datastore.objects.get(image_id)
            if previous is not None:
                self._check_labels_fit(image_id, header)
            self._place(upload, Path(folder) / name, self._datastore_path)
            if previous is not None and previous.image.ext != suffix:
                Path(folder, self._filename(image_id, previous.image.ext)).unlink(missing_ok=True)
            info = {**(image_info or {}), "ts": int(time.time()), "name": name}
            labels = previous.labels if previous is not None else {}
            self._datastore.objects[image_id] = ImageLabelModel(
                image=DataModel(info=info, ext=suffix), labels=labels
            )
            self._update_datastore_file(lock=False)
        return image_id

    def _check_labels_fit(self, image_id: str, header: VolumeHeader) -> None:
        """A replaced image keeps its labels: refuse a new image that its stored labels do not fit (nothing is
        dropped silently; the user deletes the labels or picks another id)."""
        misfits = []
        for tag in sorted(self._datastore.objects[image_id].labels):
            uri = self.get_label_uri(image_id, tag)
            if not uri or not os.path.exists(uri):
                continue
            size = _spatial(probe_volume(uri))
            if size != _spatial(header):
                misfits.append(f"{tag!r} ({_size(size)})")
        if misfits:
            raise UserInputError(
                f"image {image_id!r} exists with labels {', '.join(misfits)} that do not fit the new image "
                f"({_size(_spatial(header))}); delete those labels first or upload it under another id"
            )

    def image_header(self, image_id: str) -> VolumeHeader:
        """The header of a stored image (404 if the id is unknown)."""
        uri = self.get_image_uri(image_id)
        if not uri:
            raise ImageNotFoundException(f"image {image_id!r} is not in the datastore")
        return probe_volume(uri)

    def save_label(
        self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]
    ) -> str:
        """Store a label of ``image_id`` under ``label_tag``, checked against the image first."""
        obj = self._datastore.objects.get(image_id)
        if not obj:
            raise ImageNotFoundException(f"image {image_id!r} is not in the datastore")
        label_tag = names.label_tag(label_tag)
        upload = Path(label_filename)
        with self._staging.folder() as work:
            if upload.name.lower().endswith(BINARY_LABEL_SUFFIX):
                upload = binary_label_to_nifti(self.get_image_uri(image_id), upload, work, self._limits)
            suffix = volume_suffix(upload.name)
            if suffix is None:
                raise UserInputError(
                    f"label {upload.name!r} is not a volume file; the server stores {', '.join(STORED_SUFFIXES)}"
                )
            check_label_file(upload, upload.name, self.image_header(image_id), self._limits)
            folder = Path(self._datastore.label_path(label_tag))
            name = self._filename(image_id, suffix)
            with FileLock(self._lock_file):
                self._place(upload, folder / name, self._datastore_path)
                obj = self._datastore.objects.get(image_id) or obj
                previous = obj.labels.get(label_tag)
                if previous is not None and previous.ext != suffix:
                    (folder / self._filename(image_id, previous.ext)).unlink(missing_ok=True)
                info = {**(label_info or {}), "ts": int(time.time()), "name": name}
                obj.labels[label_tag] = DataModel(info=info, ext=suffix)
                self._update_datastore_file(lock=False)
        return image_id

    def remove_label(self, label_id: str, label_tag: str) -> None:
        if not self._datastore.label(label_id, label_tag):
            raise LabelNotFoundException(
                f"label of {label_id!r} with tag {label_tag!r} is not in the datastore"
            )
        super().remove_label(label_id, label_tag)

    def get_dataset_archive(self, limit_cases: int | None) -> str:
        """A zip of the labelled images in a fresh staging folder (the caller removes the folder)."""
        pairs = self.datalist()
        if not pairs:
            raise UserInputError("no image has a final label yet; the dataset archive would be empty")
        if limit_cases and 0 < limit_cases < len(pairs):
            pairs = pairs[:limit_cases]
        path = self._staging.new() / "dataset.zip"
        with zipfile.ZipFile(path, mode="x") as archive:
            for pair in pairs:
                for key, file in pair.items():
                    archive.write(file, arcname=f"{key}/{os.path.basename(file)}")
            archive.writestr("metadata.json", self._datastore.model_dump_json(exclude={"base_path"}))
        return str(path)


class GuardedDICOMWebDatastore(DICOMWebDatastore):
    """MONAI Label's DICOMweb datastore with series ids checked as DICOM UIDs before they reach a cache path.

    Made by re-classing the datastore MONAI Label builds (:func:`guard_dicomweb`), so its settings stay MONAI
    Label's; images come from the PACS, so uploads and removals are refused.
    """

    def get_image_uri(self, image_id: str) -> str:
        image_id = names.dicom_uid(image_id)
        with _conversions_removed() as made:
            uri = super().get_image_uri(image_id)
        # a first conversion answers with the temporary file (now removed); the cache holds the copy
        return LocalDatastore.get_image_uri(self, image_id) if uri in made else uri

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        names.label_tag(label_tag)
        with _conversions_removed() as made:
            uri = super().get_label_uri(names.dicom_uid(label_id, "label"), label_tag, image_id)
        return LocalDatastore.get_label_uri(self, image_id, label_tag) if uri in made else uri

    def save_label(
        self, image_id: str, label_filename: str, label_tag: str, label_info: Any, *args: Any
    ) -> str:
        names.dicom_uid(image_id)
        names.label_tag(label_tag)
        image_uri = self.get_image_uri(image_id)  # the series, fetched into MONAI Label's cache
        upload = Path(label_filename)
        # checked as on a local datastore before anything is written or sent to the PACS
        with tempfile.TemporaryDirectory(prefix="medplib-label-") as work:
            if upload.name.lower().endswith(BINARY_LABEL_SUFFIX):
                upload = binary_label_to_nifti(image_uri, upload, Path(work), VolumeLimits())
            labelled = check_label_file(upload, upload.name, probe_volume(image_uri), VolumeLimits())
            if not labelled and label_tag == DefaultLabelTag.FINAL:
                # nothing found: no segment for a DICOM-SEG; kept in the server's cache like any other tag
                logger.info(f"label of {image_id} is empty: kept in the cache, no DICOM-SEG sent to the PACS")
                return LocalDatastore.save_label(self, image_id, str(upload), label_tag, label_info)
            folder = SEG_FOLDER.set(Path(work))  # the SEG is written here and removed with it, sent or not
            try:
                return super().save_label(image_id, str(upload), label_tag, label_info, *args)
            except (
                requests.RequestException
            ) as err:  # the PACS is down or refused the STOW (not a local error)
                raise UpstreamError(
                    f"the PACS did not store the DICOM-SEG of {image_id}: {first_line(err)}"
                ) from err
            finally:
                SEG_FOLDER.reset(folder)

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        # (MONAI Label's own cache fills call LocalDatastore.add_image directly, not this)
        raise UserInputError("this server's images come from its DICOMweb PACS; upload new images there")

    def remove_image(self, image_id: str) -> None:
        raise UserInputError("this server's images come from its DICOMweb PACS; remove images there")


# NIfTI files MONAI Label's DICOMweb datastore converts a series (or SEG) into, in the system temp folder, while
# a request runs; it copies them into its cache and leaves them there: a patient's volume, readable by every user.
_CONVERSIONS: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "medplib_conversions", default=None
)


@contextlib.contextmanager
def _conversions_removed() -> Iterator[list[str]]:
    """Remove the temporary NIfTI files MONAI Label's ``dicom_to_nifti`` writes inside the block (the list it
    yields names them)."""
    made: list[str] = []
    token = _CONVERSIONS.set(made)
    try:
        yield made
    finally:
        _CONVERSIONS.reset(token)
        for path in made:
            Path(path).unlink(missing_ok=True)


def _record_conversions() -> None:
    """Rebind MONAI Label's ``dicom_to_nifti`` (once) so :func:`_conversions_removed` sees what it writes."""
    import monailabel.datastore.dicom as module

    convert = module.dicom_to_nifti
    if getattr(convert, "_medplib", False):
        return

    def dicom_to_nifti(*args: Any, **kwargs: Any) -> str:
        path = convert(*args, **kwargs)
        made = _CONVERSIONS.get()
        if made is not None and path:
            made.append(path)
        return path

    dicom_to_nifti._medplib = True
    module.dicom_to_nifti = dicom_to_nifti


def guard_dicomweb(datastore: Any) -> Any:
    """Re-class a MONAI Label ``DICOMWebDatastore`` as :class:`GuardedDICOMWebDatastore` (same state)."""
    if isinstance(datastore, DICOMWebDatastore):
        _record_conversions()
        datastore.__class__ = GuardedDICOMWebDatastore
    return datastore
