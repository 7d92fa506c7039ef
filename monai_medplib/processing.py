"""Image and mask processing of the MedPLIB release: CLIP / SAM inputs, region grids, mask output.

Every step reproduces the release data path (``LazySupervisedDataset`` and the demo worker) bit for
bit where the model depends on it: PIL bilinear ResizeLongestSide, *centre* padding (not SAM's
bottom-right), the CLIP pad colour, the 24x24 top-left-pixel region grid, and the mask crop quirk
of ``postprocess_masks``. This module is the one home of the normalisation constants.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from scipy import ndimage

CLIP_SIZE = 336
SAM_SIZE = 256
CLIP_PATCH = 14
REGION_GRID_SIZE = CLIP_SIZE // CLIP_PATCH  # 24
LOW_RES_MASK_SIZE = 64
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Release: int(255 * mean) truncated -> (122, 116, 104), painted on the uint8 image before normalising.
CLIP_PAD_FILL = tuple(int(255 * m) for m in CLIP_MEAN)
SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)
MASK_THRESHOLD = 0.1  # on sigmoid probabilities (release eval and demo), not 0.5
POINT_HALF_SIZE = 20  # demo: a click becomes a 41x41 px square

ImageLike = str | Path | Image.Image | np.ndarray | torch.Tensor


# ---------------------------------------------------------------------------------- loading
def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's values as a numpy array on the CPU; bfloat16 (which numpy lacks) as float32, exactly."""
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


def load_rgb(image: ImageLike) -> np.ndarray:
    """Return an 8-bit RGB array ``[H, W, 3]``.

    Accepts a file path (read with PIL; grayscale is expanded to three identical channels, an alpha channel is
    dropped and an EXIF orientation is applied, as ``cv2.imread`` does; 16-bit files are scaled by 1/256), a PIL image,
    or an array / tensor ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)``. uint8 is taken as is; float or
    bool data whose values all lie in [0, 1] is scaled by 255, other float data is clipped to 0..255;
    both are then rounded. Other integer types must already lie in 0..255 (window CT / MR first).
    """
    if isinstance(image, str | Path):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        with Image.open(path) as pil:
            # cv2.imread (the release's reader) turns a photo by its EXIF orientation, as viewers show it
            return _pil_to_rgb(ImageOps.exif_transpose(pil))
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, torch.Tensor):
        image = as_numpy(image)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    raise TypeError(f"unsupported image type {type(image).__name__}: give a path, PIL image or numpy array")


def _pil_to_rgb(pil: Image.Image) -> np.ndarray:
    if pil.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey: cv2.imread(IMREAD_COLOR) converts to 8 bit by value / 256.
        grey = np.clip(np.rint(np.asarray(pil, dtype=np.float64) / 256.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.array(pil.convert("RGB"), dtype=np.uint8)


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    array = _array_to_uint8(array)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    return array


def _array_to_uint8(array: np.ndarray) -> np.ndarray:
    """uint8 ``(H, W)`` (grey) or ``(H, W, 3)`` of an array, with the value rules of :func:`load_rgb`."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise ValueError(
            f"image array must be (H, W) or (H, W, 3) (channels last), got shape {tuple(array.shape)}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image array is empty: shape {tuple(array.shape)}")
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype == np.bool_:
        array = array.astype(np.float64)
    if np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float64)
        if not np.isfinite(array).all():
            raise ValueError("image array contains NaN or infinite values")
        if array.min() >= 0.0 and array.max() <= 1.0:
            array = array * 255.0
        return np.clip(np.rint(array), 0, 255).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"{array.dtype} image has values {low}..{high}; map it to 0..255 first "
                "(e.g. a CT window from monai_medplib.transforms.intensity)"
            )
        return array.astype(np.uint8)
    raise TypeError(f"unsupported image dtype {array.dtype}")


def load_pixels(image: ImageLike) -> np.ndarray:
    """Like :func:`load_rgb`, but a grey image stays uint8 ``(H, W)``: 2D input, and RGB whose three channels
    are equal (a grey PNG, a slice saved as RGB). Both encoders see exactly what they see for its RGB copy
    (:func:`clip_pixels` / :func:`sam_pixels` are bit-identical on the two), prepared three times faster, and the
    two forms get one content key in a feature cache."""
    if isinstance(image, torch.Tensor):
        image = as_numpy(image)
    if isinstance(image, np.ndarray):
        array = _array_to_uint8(image)
    else:
        array = load_rgb(image)
    if array.ndim == 3 and _channels_equal(array):
        return np.ascontiguousarray(array[..., 0])
    return array


def _channels_equal(rgb: np.ndarray) -> bool:
    return bool(np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]))


# ---------------------------------------------------------------------------------- geometry
def preprocess_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """Target ``(h, w)`` of ResizeLongestSide: ``int(x * s + 0.5)`` with ``s = long_side / max(h, w)``."""
    scale = long_side * 1.0 / max(height, width)
    new_h, new_w = int(height * scale + 0.5), int(width * scale + 0.5)
    if min(new_h, new_w) < 1:  # the release's resize fails here too, with a message about neither side
        raise ValueError(
            f"an image of {height} x {width} pixels is too elongated: resized to {long_side} pixels on its long "
            f"side, its short side would be 0; crop it closer to square"
        )
    return new_h, new_w


def resize_longest_side(array: np.ndarray, long_side: int) -> np.ndarray:
    """Resize a uint8 ``[H, W]`` or ``[H, W, 3]`` array with PIL bilinear (antialiased) like the release."""
    new_h, new_w = preprocess_shape(array.shape[0], array.shape[1], long_side)
    resized = Image.fromarray(array).resize((new_w, new_h), Image.BILINEAR)
    return np.asarray(resized)


def centre_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """``(top, left)`` of an ``height x width`` image centre-padded to ``size`` (release
    ``pad_tensor_channelwise``: the odd pixel goes to the bottom / right)."""
    return (size - height) // 2, (size - width) // 2


def centre_pad(chw: torch.Tensor, size: int, fill: Sequence[float]) -> torch.Tensor:
    """Pad ``[C, h, w]`` to ``[C, size, size]`` with a per-channel fill, content centred."""
    channels, height, width = chw.shape
    top, left = centre_offsets(height, width, size)
    out = torch.empty((channels, size, size), dtype=chw.dtype)
    for c in range(channels):
        out[c] = fill[c]
    out[:, top : top + height, left : left + width] = chw
    return out


# ---------------------------------------------------------------------------------- images
def clip_pixels(rgb: np.ndarray) -> torch.Tensor:
    """CLIP input ``float32 [3, 336, 336]`` (release ``image_aspect_ratio='pad'`` path).

    ResizeLongestSide(336), centre pad with (122, 116, 104) on uint8, then the CLIPImageProcessor
    arithmetic: ``float32(x * (1/255))`` followed by ``(x - mean) / std`` in float32. A grey ``(H, W)``
    image gives what its RGB copy gives (see :func:`clip_pixels_batch`).
    """
    return clip_pixels_batch([rgb])[0]


def sam_pixels(rgb: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
    """SAM input ``float32 [3, 256, 256]`` and the resized ``(h, w)`` needed by post-processing.

    ResizeLongestSide(256), normalise with the SAM mean / std (0..255 scale), *then* centre pad
    with 0 (release order: the padding is the mean colour).
    """
    pixels, resizes = sam_pixels_batch([rgb])
    return pixels[0], resizes[0]


@functools.cache
def _normalisation_tables() -> tuple[np.ndarray, np.ndarray]:
    """``(clip [3, 256], sam [3, 256])``: per channel the normalised float32 value of every uint8 level.

    Computed with the release arithmetic itself (CLIP: ``float32(x * (1/255))`` then ``(x - mean) / std`` in
    float32; SAM: ``(float32(x) - mean) / std``), so a lookup is bit-identical to computing it per pixel.
    """
    levels = np.arange(256, dtype=np.uint8)
    scaled = (levels * (1 / 255)).astype(np.float32)
    clip_mean = np.asarray(CLIP_MEAN, dtype=np.float32)[:, None]
    clip_std = np.asarray(CLIP_STD, dtype=np.float32)[:, None]
    clip = (scaled[None] - clip_mean) / clip_std
    as_float = torch.from_numpy(levels).float()[None]
    sam_mean = torch.tensor(SAM_MEAN, dtype=torch.float32)[:, None]
    sam_std = torch.tensor(SAM_STD, dtype=torch.float32)[:, None]
    sam = ((as_float - sam_mean) / sam_std).numpy()
    return clip.astype(np.float32), sam


def _resized_batches(images: Sequence[np.ndarray], long_side: int) -> list[tuple[list[int], np.ndarray]]:
    """ResizeLongestSide of every image, grouped by (shape, grey or RGB): ``[(indices, uint8 [n, h, w(, 3)])]``.

    PIL resamples every band of an RGB image with the same fixed-point arithmetic as a one-band image, so a grey
    image is resized once instead of three times and expanded to three channels by the lookup afterwards.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(image.shape, []).append(i)
    return [
        (idx, np.stack([resize_longest_side(images[i], long_side) for i in idx])) for idx in groups.values()
    ]


def _lookup(table: np.ndarray, small: np.ndarray) -> np.ndarray:
    """uint8 ``[n, h, w]`` (grey) or ``[n, h, w, 3]`` -> float32 ``[n, 3, h, w]`` through per-channel tables."""
    if small.ndim == 3:
        return np.stack([table[c][small] for c in range(3)], axis=1)
    return np.stack([table[c][small[..., c]] for c in range(3)], axis=1)


def clip_pixels_batch(images: Sequence[np.ndarray]) -> torch.Tensor:
    """:func:`clip_pixels` of several uint8-convertible ``(H, W)`` / ``(H, W, 3)`` images: ``[B, 3, 336, 336]``.

    Same-size images are resized back to back and normalised together through a per-level table.
    """
    arrays = [_array_to_uint8(np.asarray(image)) for image in images]
    clip_table, _ = _normalisation_tables()
    fill = clip_table[np.arange(3), np.asarray(CLIP_PAD_FILL)]
    out = np.empty((len(arrays), 3, CLIP_SIZE, CLIP_SIZE), dtype=np.float32)
    out[:] = fill[None, :, None, None]  # the release pads the uint8 image with CLIP_PAD_FILL, then normalises
    for indices, small in _resized_batches(arrays, CLIP_SIZE):
        height, width = small.shape[1:3]
        top, left = centre_offsets(height, width, CLIP_SIZE)
        out[indices, :, top : top + height, left : left + width] = _lookup(clip_table, small)
    return torch.from_numpy(out)


def sam_pixels_batch(images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """:func:`sam_pixels` of several images: ``([B, 3, 256, 256], resized (h, w) per image)``."""
    arrays = [_array_to_uint8(np.asarray(image)) for image in images]
    _, sam_table = _normalisation_tables()
    out = np.zeros((len(arrays), 3, SAM_SIZE, SAM_SIZE), dtype=np.float32)  # normalised, then padded with 0
    resizes: list[tuple[int, int]] = [(0, 0)] * len(arrays)
    for indices, small in _resized_batches(arrays, SAM_SIZE):
        height, width = small.shape[1:3]
        top, left = centre_offsets(height, width, SAM_SIZE)
        out[indices, :, top : top + height, left : left + width] = _lookup(sam_table, small)
        for i in indices:
            resizes[i] = (int(height), int(width))
    return torch.from_numpy(out), resizes


# ---------------------------------------------------------------------------------- regions
def _binary_mask(mask: np.ndarray | torch.Tensor, name: str = "region mask") -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = as_numpy(mask)
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{name} must be a 2D (H, W) array, got shape {tuple(mask.shape)}")
    return (mask > 0).astype(np.uint8)


def region_grid(mask_hw: np.ndarray | torch.Tensor, keep_largest_component: bool = False) -> torch.Tensor:
    """24x24 uint8 region grid of a binary mask at original image resolution (non-zero = region).

    ResizeLongestSide(336) with PIL bilinear (a 0/1 image stays 0/1), centre pad with 0, then
    ``cv2.resize(1/14, INTER_NEAREST)`` == the top-left pixel of every CLIP patch, ``[0::14, 0::14]``.

    ``keep_largest_component=True`` follows the release *dataset* path (training and official
    evaluation) instead of the demo worker: only the largest 8-connected component of the grid is
    kept. Release quirk: that path then runs a random-walk ``generate_sub_connected_component``
    whose area ratio is drawn from ``U(0.2, max_area)``, but ``max_area`` is shadowed by the
    component's area in cells (>= 10), so the target area almost always exceeds the component and
    the walk (an 8-neighbour flood fill) covers all of it; components under 10 cells are returned
    untouched. Keeping the whole component is therefore the deterministic equivalent.
    """
    binary = _binary_mask(mask_hw)
    if not binary.any():
        raise ValueError("region mask is empty: it has no non-zero pixel")
    resized = torch.from_numpy(resize_longest_side(binary, CLIP_SIZE).copy())[None]
    padded = centre_pad(resized, CLIP_SIZE, (0,))[0]
    grid = padded[::CLIP_PATCH, ::CLIP_PATCH].contiguous()
    if not grid.any():
        height, width = binary.shape[:2]
        step = CLIP_PATCH * max(height, width) / CLIP_SIZE
        side = 2 * POINT_HALF_SIZE + 1
        raise ValueError(
            f"region vanished in the 24x24 grid: on this {height}x{width} image the model reads one pixel every "
            f"{step:.0f} pixels and the region covers none of them; mark a larger region"
            + (
                f" (a point becomes a {side}x{side} pixel square, as in the release demo: on an image this size "
                "give a box or a mask instead)"
                if step > side
                else ""
            )
        )
    if keep_largest_component:
        grid = largest_component(grid)
    return grid.to(torch.uint8)


def largest_component(grid: torch.Tensor) -> torch.Tensor:
    """Keep the largest 8-connected component (ties: the first in raster order, like cv2)."""
    labels, count = ndimage.label(grid.numpy() > 0, structure=np.ones((3, 3), dtype=int))
    if count <= 1:
        return grid
    sizes = np.bincount(labels.ravel())[1:]
    keep = int(np.argmax(sizes)) + 1
    return torch.from_numpy((labels == keep).astype(np.uint8))


def _check_shape(shape: Sequence[int]) -> tuple[int, int]:
    if len(shape) < 2 or shape[0] <= 0 or shape[1] <= 0:
        raise ValueError(f"image shape must start with positive (H, W), got {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def point_region_mask(shape: Sequence[int], points: Sequence[Sequence[float]]) -> np.ndarray:
    """Demo point prompt: a 41x41 square (+-20 px) around the median clicked pixel, clipped to the image.

    Args:
        shape: image shape, ``(H, W, ...)``.
        points: one or more ``(x, y)`` pixel coordinates (x = column, y = row).
    """
    height, width = _check_shape(shape)
    coords = np.asarray(points, dtype=np.float64) if len(points) else np.zeros((0, 2))
    if coords.ndim != 2 or coords.shape[1] != 2:  # a box (x0, y0, x1, y1) passed as one point, (x, y, z), ...
        raise ValueError(f"points must be (x, y) pairs, got {np.asarray(points).tolist()}")
    if coords.shape[0] == 0:
        raise ValueError("point prompt needs at least one (x, y) point")
    for x, y in coords:
        if not (0 <= x < width and 0 <= y < height):
            raise ValueError(f"point (x={x:g}, y={y:g}) is outside the {height}x{width} image")
    cols = np.floor(coords[:, 0]).astype(np.int64)
    rows = np.floor(coords[:, 1]).astype(np.int64)
    # torch.median semantics (the demo): the lower of the two middle values for an even count.
    row = int(np.sort(rows)[(len(rows) - 1) // 2])
    col = int(np.sort(cols)[(len(cols) - 1) // 2])
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[
        max(0, row - POINT_HALF_SIZE) : min(height, row + POINT_HALF_SIZE + 1),
        max(0, col - POINT_HALF_SIZE) : min(width, col + POINT_HALF_SIZE + 1),
    ] = 1
    return mask


def box_region_mask(shape: Sequence[int], box: Sequence[float]) -> np.ndarray:
    """Box prompt ``(x0, y0, x1, y1)`` in pixels -> filled rectangle, corners inclusive.

    (The release demo indexes the rectangle as ``[x0:x1+1, y0:y1+1]``, i.e. transposed; that bug
    never reached training, so the box is drawn where the user put it.)
    """
    height, width = _check_shape(shape)
    if len(box) != 4 or not all(np.isfinite(float(v)) for v in box):
        raise ValueError(f"box must be four finite numbers (x0, y0, x1, y1), got {tuple(box)}")
    x0, y0, x1, y1 = (int(np.floor(v)) for v in box)
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    if x0 < 0 or y0 < 0 or x1 >= width or y1 >= height:
        raise ValueError(f"box {tuple(box)} is outside the {height}x{width} image")
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[y0 : y1 + 1, x0 : x1 + 1] = 1
    return mask


# ---------------------------------------------------------------------------------- masks out
def postprocess_mask_logits(
    low_res: torch.Tensor, resize: Sequence[int], original_size: Sequence[int]
) -> torch.Tensor:
    """Low-res SAM logits ``[B, 1, 64, 64]`` -> logits ``[B, 1, H, W]`` at the original image size.

    Release quirk (``MedPLIBForCausalLM.postprocess_masks``, trained with it, so kept): the padding
    is computed as ``64 - resize`` although ``resize`` is at 256 scale, and the crop
    ``[top : top + h, left : left + w]`` uses Python slice semantics (a negative start counts from
    the end, a start below -64 clamps to 0, the stop clamps to 64). Square images keep the whole map;
    non-square ones keep a band that is then stretched by bilinear interpolation (align_corners=False).
    """
    if low_res.dim() == 3:
        low_res = low_res.unsqueeze(0)
    if low_res.dim() != 4:
        raise ValueError(f"low-res masks must be [B, 1, h, w], got shape {tuple(low_res.shape)}")
    new_h, new_w = (int(v) for v in resize)
    map_h, map_w = low_res.shape[-2:]
    top = (map_h - new_h) // 2
    left = (map_w - new_w) // 2
    rows = slice(*slice(top, top + new_h).indices(map_h)[:2])
    cols = slice(*slice(left, left + new_w).indices(map_w)[:2])
    cropped = low_res[:, :, rows, cols]
    out_size = (int(original_size[0]), int(original_size[1]))
    return F.interpolate(cropped, out_size, mode="bilinear", align_corners=False)


def binarize(logits: torch.Tensor, threshold: float = MASK_THRESHOLD) -> torch.Tensor:
    """Boolean mask ``sigmoid(logits) > threshold`` (release threshold 0.1)."""
    return torch.sigmoid(logits) > threshold


# -- region prompts of the 2D API: a mask, clicked points or a box -> one binary mask at image resolution
MaskLike = str | Path | Image.Image | np.ndarray | torch.Tensor


def mask_pixels(pil: Image.Image) -> np.ndarray:
    """A mask image's pixels as the release reads them (``cv2.imread``, colour): an alpha band is dropped (an
    opaque RGBA mask is not all region) and a palette image gives its colours, not its palette indices."""
    if pil.mode in ("RGBA", "P", "PA", "RGBa", "CMYK"):
        pil = pil.convert("RGB")
    elif pil.mode in ("LA", "La"):
        pil = pil.convert("L")
    return np.asarray(pil)


def load_region_mask(mask: MaskLike) -> np.ndarray:
    """A region mask as uint8 0/1 ``[H, W]``: any non-zero pixel (in any colour channel; an alpha channel, the 4th of
    4 or the 2nd of 2, is not read) belongs to the region. A file is turned as its EXIF orientation says."""
    if isinstance(mask, str | Path):
        path = Path(mask)
        if not path.is_file():
            raise FileNotFoundError(f"region mask file not found: {path}")
        with Image.open(path) as pil:
            mask = mask_pixels(ImageOps.exif_transpose(pil))
    elif isinstance(mask, Image.Image):
        mask = mask_pixels(mask)
    elif isinstance(mask, torch.Tensor):
        mask = as_numpy(mask)
    if not isinstance(mask, np.ndarray):
        raise TypeError(
            f"unsupported region mask type {type(mask).__name__}: give a path, PIL image or array"
        )
    if mask.ndim == 3 and mask.shape[0] == 1 and mask.shape[2] > 4:  # MONAI's channel-first (1, H, W)
        mask = mask[0]
    if mask.ndim == 3:  # colour PNG: release reads it with cv2 and keeps every non-zero pixel
        if mask.shape[2] in (2, 4):  # grey / colour + alpha
            mask = mask[:, :, :-1]
        mask = mask.any(axis=2)
    if mask.ndim != 2:
        raise ValueError(f"region mask must be (H, W), got shape {tuple(mask.shape)}")
    return (mask != 0).astype(np.uint8)


def region_mask_from_prompt(
    image_size: Sequence[int],
    mask: MaskLike | None = None,
    points: Sequence[Sequence[float]] | None = None,
    box: Sequence[float] | None = None,
) -> np.ndarray:
    """Exactly one of ``mask``, ``points`` ((x, y) pixels) or ``box`` ((x0, y0, x1, y1)) -> uint8 ``[H, W]``.

    Raises:
        ValueError: none or several prompts, a mask of another size than the image, an empty region, or
            points / a box outside the image.
    """
    given = [name for name, value in (("mask", mask), ("points", points), ("box", box)) if value is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one region prompt (mask=, points= or box=), got {given or 'none'}")
    height, width = int(image_size[0]), int(image_size[1])
    if mask is not None:
        region = load_region_mask(mask)
        if region.shape != (height, width):
            raise ValueError(
                f"region mask has shape {region.shape} but the image is {height}x{width}; "
                "draw the region at the image's resolution"
            )
    elif points is not None:
        region = point_region_mask((height, width), points)
    else:
        region = box_region_mask((height, width), box)
    if not region.any():
        raise ValueError("region is empty: the mask has no non-zero pixel")
    return region
