"""Single DICOM files: how many frames they hold, and a single-frame one as the 8-bit image the model sees.

One home for the rule the CLI's 2D commands and the bundle share: a DICOM file with one frame is a 2D image (an
X-ray, an ultrasound frame, one CT slice sent alone), with several frames a volume.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..user_input import UserInputError, first_line

__all__ = ["dicom_frame_count", "read_dicom_image"]


def dicom_frame_count(path: str | Path) -> int:
    """Number of image frames in the DICOM file ``path`` (the header only is read).

    Raises:
        UserInputError: not a readable DICOM file, or one without an image.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError) as err:
        raise UserInputError(f"{path}: not a readable DICOM file ({first_line(err)})") from None
    if "Rows" not in ds:
        raise UserInputError(f"{path}: a DICOM file without an image (no Rows / Columns)")
    return int(getattr(ds, "NumberOfFrames", 1) or 1)


def read_dicom_image(path: str | Path) -> np.ndarray:
    """A single-frame DICOM image as uint8: modality LUT (HU for CT), MONOCHROME1 inverted, then the SA-Med2D
    percentile mapping over its own pixels (``(H, W)``); a colour (RGB) image as its display values
    (``(H, W, 3)``).

    Raises:
        UserInputError: the pixel data cannot be decoded or is not one 2D image.
    """
    import pydicom
    import torch
    from pydicom.pixels import apply_modality_lut

    from ..transforms.intensity import SAMed2DNormalize

    try:
        ds = pydicom.dcmread(path)
        pixels = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)
    except Exception as err:  # pydicom raises many kinds for damaged or undecodable pixel data
        raise UserInputError(f"{path}: cannot decode the DICOM pixel data ({first_line(err)})") from None
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    if pixels.ndim != 2:
        raise UserInputError(f"{path}: DICOM pixel data of shape {pixels.shape} is not one 2D image")
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        pixels = pixels.max() - pixels  # MONOCHROME1 shows low values bright
    return SAMed2DNormalize()(torch.from_numpy(pixels)).numpy().astype(np.uint8)
