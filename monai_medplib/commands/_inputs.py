"""What the 2D commands (``ask``, ``ground``, ``slice``) read: an image file, or one slice of a volume.

Inputs are told apart by what they are, not only by name: a folder is a DICOM series; ``.nii`` / ``.nii.gz`` /
``.nrrd`` / ``.mha`` / ``.mhd`` files are volumes; a DICOM file (by suffix or by its preamble) is a volume when it
holds several frames and a 2D image otherwise; anything else is a 2D picture read with PIL. A volume slice is
normalised the model's way, through the pipeline's volume path (SA-Med2D percentiles over the whole volume, then
the display-oriented plane); a single-frame DICOM image gets the same percentile mapping over its own pixels.

Every failure to read is a :class:`~monai_medplib.user_input.UserInputError` naming the file and what is wrong with
it, so the CLI shows one line and exits 2. The checks that need no library (the path exists, ``--slice`` is given
only for volumes) run before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..user_input import UserInputError, first_line
from ._common import require_path


@dataclass
class ModelImage:
    """An 8-bit image as the model gets it, and where it came from.

    Attributes:
        pixels: uint8 ``(H, W)`` (grey: volume slices, DICOM images) or ``(H, W, 3)`` (pictures).
        source: ``{"file": ..., "kind": "image" | "dicom image" | "volume"}``, plus ``axis``, ``slice`` and
            ``slices`` (the plane's slice count) for a volume slice.
        volume: the volume a slice was cut from (a ``(1, X, Y, Z)`` MetaTensor), else None.
    """

    pixels: Any = field(repr=False)
    source: dict[str, Any]
    volume: Any = field(default=None, repr=False)

    @property
    def rgb(self) -> Any:
        """``(H, W, 3)`` uint8 (grey repeated over three channels)."""
        import numpy as np

        return self.pixels if self.pixels.ndim == 3 else np.repeat(self.pixels[..., None], 3, axis=-1)

    @property
    def stem(self) -> str:
        """A file-name stem for outputs: the input's name, plus the plane and slice for volume slices."""
        from ..io.readers import file_stem

        name = file_stem(self.source["file"])
        if self.source["kind"] == "volume":
            return f"{name}_{self.source['axis']}{self.source['slice']}"
        return name


def input_kind(path: str | Path) -> str:
    """``"volume"``, ``"dicom"`` (a DICOM file: a volume or a 2D image, decided by its frames) or ``"image"``.

    Raises:
        UserInputError: the path does not exist.
    """
    path = require_path(path)
    if path.is_dir():
        return "volume"
    from ..io.readers import (  # after the existence check: a wrong path fails fast
        DICOM_SUFFIX,
        VOLUME_SUFFIXES,
    )

    name = path.name.lower()
    if name.endswith(tuple(s for s in VOLUME_SUFFIXES if s != DICOM_SUFFIX)):
        return "volume"
    if name.endswith(DICOM_SUFFIX) or _has_dicom_preamble(path):
        return "dicom"
    return "image"


def _has_dicom_preamble(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:] == b"DICM"


def check_input(path: str | Path, slice_index: int | None = None, axis: str | None = None) -> str:
    """The cheap checks (no library import): the file exists, and ``--slice`` / ``--axis`` are not given for a
    2D picture. Returns :func:`input_kind`."""
    kind = input_kind(path)
    if kind == "image" and (slice_index is not None or axis is not None):
        raise UserInputError(f"{path}: a 2D image has no slices; --slice / --axis apply to volumes")
    if slice_index is not None and slice_index < 0:
        raise UserInputError(f"--slice must be >= 0, got {slice_index}")
    return kind


def read_model_image(path: str | Path, slice_index: int | None = None, axis: str | None = None) -> ModelImage:
    """The image at ``path`` as the model sees it; for a volume the ``axis`` plane's slice ``slice_index``
    (default: axial, the middle slice).

    Raises:
        UserInputError: the file is missing, unreadable (empty, truncated, text, an unknown format), too large, or
            the slice is outside the volume.
    """
    path = Path(path)
    kind = check_input(path, slice_index, axis)
    if kind == "dicom":
        from ..io.dicom_image import dicom_frame_count, read_dicom_image

        frames = dicom_frame_count(path)
        if frames == 1:
            if slice_index is not None or axis is not None:
                raise UserInputError(
                    f"{path}: a single-frame DICOM image has no slices; drop --slice / --axis"
                )
            return ModelImage(read_dicom_image(path), {"file": str(path), "kind": "dicom image"})
        kind = "volume"
    if kind == "volume":
        return volume_slice(read_volume(path), path, axis or "axial", slice_index)
    return ModelImage(read_picture(path), {"file": str(path), "kind": "image"})


def read_picture(path: str | Path, as_rgb: bool = True) -> Any:
    """A PNG / JPEG / ... file as uint8 ``(H, W, 3)`` (:func:`monai_medplib.processing.load_rgb`'s rules), or with
    ``as_rgb=False`` its pixel values as stored (region masks); PIL's own decompression-bomb limit is the size
    limit."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    from ..processing import load_rgb, mask_pixels

    path = Path(path)
    try:
        with Image.open(path) as pil:
            width, height = pil.size
            if width * height > Image.MAX_IMAGE_PIXELS:
                raise UserInputError(
                    f"{path}: {width}x{height} pixels is too large (at most {Image.MAX_IMAGE_PIXELS:,} pixels)"
                )
            pil.load()
            pil = ImageOps.exif_transpose(pil)  # as viewers show it, and as load_rgb reads a path
            return load_rgb(pil) if as_rgb else mask_pixels(pil)
    except UnidentifiedImageError:
        raise UserInputError(
            f"{path}: not an image file PIL can read (PNG, JPEG, BMP, TIFF) nor a volume "
            "(NIfTI, NRRD, DICOM); is it empty, text or damaged?"
        ) from None
    except Image.DecompressionBombError as err:
        raise UserInputError(f"{path}: too large to decode ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:
        if isinstance(err, UserInputError):
            raise
        raise UserInputError(f"{path}: cannot decode the image ({first_line(err)})") from None


def read_volume(path: str | Path) -> Any:
    """A NIfTI / NRRD / DICOM volume through :func:`monai_medplib.io.load_volume`, with its read errors named."""
    from ..io import load_volume
    from ..io.readers import NIFTI_SUFFIXES

    path = Path(path)
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        _check_nifti_header(path)
    _quiet_itk()
    try:
        return load_volume(path)
    except (FileNotFoundError, NotADirectoryError) as err:
        raise UserInputError(f"{path}: {first_line(err)}") from None
    except ValueError as err:  # load_volume's own messages name the file already (2D, 4D, mixed series)
        if str(path) in str(err):
            raise UserInputError(first_line(err)) from None
        raise UserInputError(f"{path}: cannot be read as a volume ({first_line(err)})") from None
    except (EOFError, OSError, RuntimeError) as err:
        # EOFError / zlib errors: a truncated .gz; MONAI's RuntimeError: no reader accepts the file (empty, text).
        reason = first_line(err)
        if "cannot find a suitable reader" in reason:
            reason = "no reader accepts it (empty, text, or not a NIfTI / NRRD / DICOM file)"
        raise UserInputError(f"{path}: cannot be read as a volume: {reason}") from None
    except Exception as err:  # nibabel / ITK raise their own types for damaged headers
        if type(err).__name__ in ("ImageFileError", "HeaderDataError", "error"):
            raise UserInputError(f"{path}: cannot be read as a volume: {first_line(err)}") from None
        raise


def _quiet_itk() -> None:
    """ITK prints its warnings (a series' "Non uniform sampling") straight to stderr, before and around the command's
    own one-line report; the geometry they describe is checked by the reader (io/readers.py), so a command turns
    them off for its process."""
    import itk

    itk.ProcessObject.SetGlobalWarningDisplay(False)


def _check_nifti_header(path: Path) -> None:
    """A NIfTI file whose header nibabel cannot read is refused here: MONAI's loader would otherwise fall back to
    its other readers, one of which returns a zero-filled volume for a file cut short inside its header."""
    import nibabel as nib

    try:
        nib.load(str(path))
    except Exception as err:  # nibabel's ImageFileError, gzip's BadGzipFile, EOFError ...
        reason = first_line(err).replace(f"{path}", path.name)
        raise UserInputError(f"{path}: cannot be read as a volume: {reason}") from None


def volume_slice(
    volume: Any, path: str | Path, axis: str = "axial", index: int | None = None, option: str = "--slice"
) -> ModelImage:
    """Slice ``index`` (default: the middle one) of the ``axis`` plane of ``volume``, normalised as the pipeline's
    volume calls normalise it (:func:`monai_medplib.pipeline.volume.prepare_volume`); an index outside the plane is
    an error naming ``option``, the command's name for it."""
    import numpy as np

    from ..pipeline.volume import prepare_volume
    from ..transforms.slicing import slice_geometry, volume_affine_ras

    vol, eight_bit = prepare_volume(volume)
    geometry = slice_geometry(volume_affine_ras(vol), vol.shape[1:], axis)
    if index is None:
        index = geometry.num_slices // 2
    elif not 0 <= index < geometry.num_slices:
        raise UserInputError(
            f"{option} {index} is outside {path}: its {axis} plane has slices 0-{geometry.num_slices - 1}"
        )
    grey = np.ascontiguousarray(geometry.take(eight_bit, index)[0].numpy())
    source = {
        "file": str(path),
        "kind": "volume",
        "axis": axis,
        "slice": index,
        "slices": geometry.num_slices,
    }
    return ModelImage(grey, source, volume=vol)
