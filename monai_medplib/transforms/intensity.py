"""Intensity transforms that turn CT / MR volumes into the 8-bit images MedPLIB was trained on.

MedPLIB's training images (SA-Med2D-20M) are 8-bit PNGs; for 3D modalities the dataset paper describes a
per-volume clip to the 0.5 / 99.5 percentiles followed by a linear rescale to 0-255 (spec 7.4, unverified
against the released code). That is the default here, applied to the whole volume *before* slicing so
every slice of a volume shares one mapping. CT window presets are an opt-in alternative.

Defined behaviour for awkward input: NaN voxels are ignored for the percentiles and come out as 0; a
constant volume (upper percentile == lower) comes out all 0; an all-NaN volume is a ValueError.
Values are rounded to the nearest integer (SA-Med2D's rounding is not documented).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, RepeatChannel, Transform
from monai.utils import TransformBackends, convert_to_tensor

__all__ = [
    "CT_WINDOWS",
    "volume_intensity",
    "window_bounds",
    "SAMed2DNormalize",
    "SAMed2DNormalized",
    "CTWindow",
    "CTWindowd",
    "Passthrough8Bit",
    "Passthrough8Bitd",
    "GreyToRGB",
    "GreyToRGBd",
    "SAMed2DNormalizeD",
    "SAMed2DNormalizeDict",
    "CTWindowD",
    "CTWindowDict",
    "Passthrough8BitD",
    "Passthrough8BitDict",
    "GreyToRGBD",
    "GreyToRGBDict",
]

# The one table of CT display windows: name -> (window width, window level) in HU (common radiology values).
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (400.0, 50.0),
    "liver": (150.0, 30.0),
    "lung": (1500.0, -600.0),
    "bone": (1800.0, 400.0),
    "brain": (80.0, 40.0),
    "mediastinum": (350.0, 50.0),
}


def window_bounds(
    preset: str | None = None, window: float | None = None, level: float | None = None
) -> tuple[float, float]:
    """(lowest, highest) HU of a named preset or an explicit window width / level."""
    if preset is not None:
        if window is not None or level is not None:
            raise ValueError("give either a CT window preset or window/level, not both")
        if preset not in CT_WINDOWS:
            raise ValueError(f"unknown CT window preset {preset!r}; known: {sorted(CT_WINDOWS)}")
        window, level = CT_WINDOWS[preset]
    if window is None or level is None:
        raise ValueError("a CT window needs a preset name or both window (width) and level")
    if window <= 0:
        raise ValueError(f"CT window width must be positive, got {window}")
    return level - window / 2.0, level + window / 2.0


def _scale_to_uint8(values: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``high > low``: MONAI ``ScaleIntensityRange(low, high, 0, 255, clip=True)``'s arithmetic, op for op and in
    float32 (so bit-identical to it), then round, NaN -> 0, cast; in place on one temporary instead of a
    MetaTensor per op (about 2x faster on a 512 x 512 x 128 CT)."""
    scaled = (values - low) / (high - low)
    scaled.mul_(255.0).add_(0.0).clamp_(0.0, 255.0).round_()
    return torch.nan_to_num_(scaled, nan=0.0).to(torch.uint8)


def _to_uint8(img: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Clip to [low, high], rescale to 0-255 (MONAI ScaleIntensityRange), round, NaN -> 0, cast to uint8."""
    values = img.as_tensor() if isinstance(img, MetaTensor) else img
    if high <= low:
        out = torch.zeros_like(values, dtype=torch.uint8)
    else:
        out = _scale_to_uint8(values.to(torch.float32), low, high)
    return _with_meta_of(img, out)


def _with_meta_of(img: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    if isinstance(img, MetaTensor):
        out = MetaTensor(out, meta=dict(img.meta))
        out.affine = img.affine
        out.applied_operations = list(img.applied_operations)
    return out


# An integer-valued volume spanning at most this many values (CT in HU, most MR) takes the exact histogram path.
_HISTOGRAM_MAX_RANGE = 1 << 16


def _lerp(a: float, b: float, t: float) -> float:
    """numpy's linear-interpolation step of ``percentile`` (``method="linear"``): float32 bounds, float64 weight,
    numpy's order of operations, so that the histogram path returns numpy's value bit for bit."""
    a32, b32, t64 = np.float32(a), np.float32(b), np.float64(t)
    diff = np.subtract(b32, a32)
    return float(np.subtract(b32, diff * (1 - t64)) if t64 >= 0.5 else np.add(a32, diff * t64))


def _integer_levels(values: torch.Tensor) -> tuple[int, torch.Tensor, np.ndarray] | None:
    """``(lowest value, value - lowest as int32, voxels per value)`` of an integer-valued float tensor, or None
    when it holds a non-integer, NaN or infinity, or spans :data:`_HISTOGRAM_MAX_RANGE` values or more."""
    lowest, highest = float(values.min()), float(values.max())
    if not (np.isfinite(lowest) and np.isfinite(highest)) or highest - lowest >= _HISTOGRAM_MAX_RANGE:
        return None
    if lowest != np.floor(lowest) or not torch.equal(values, torch.floor(values)):
        return None
    index = (values - lowest).to(torch.int32)
    return int(lowest), index, torch.bincount(index.reshape(-1)).numpy()


def _histogram_percentiles(lowest: int, counts: np.ndarray, qs: tuple[float, float]) -> tuple[float, float]:
    """``np.percentile(values, qs)`` (linear) from the exact histogram of integer values: the order statistics
    around each virtual index are read off the cumulative counts instead of partitioning the volume."""
    cumulative = np.cumsum(counts)
    n = int(cumulative[-1])

    def order_statistic(k: int) -> float:
        return float(lowest + int(np.searchsorted(cumulative, k, side="right")))

    out = []
    for q in qs:
        virtual = (n - 1) * np.true_divide(q, 100.0)
        previous = min(max(int(np.floor(virtual)), 0), n - 1)
        following = min(previous + 1, n - 1)
        gamma = float(virtual - previous) if previous < n - 1 else 0.0
        out.append(_lerp(order_statistic(previous), order_statistic(following), gamma))
    return out[0], out[1]


class SAMed2DNormalize(Transform):
    """SA-Med2D-20M normalisation: clip to per-volume percentiles (default 0.5 / 99.5), rescale to uint8 0-255.

    Args:
        lower: lower percentile (0-100).
        upper: upper percentile (0-100).
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, lower: float = 0.5, upper: float = 99.5) -> None:
        if not 0 <= lower < upper <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got {lower}, {upper}")
        self.lower, self.upper = lower, upper

    def __call__(self, img: torch.Tensor | np.ndarray) -> torch.Tensor:
        img = convert_to_tensor(img, track_meta=True, dtype=torch.float32)
        tensor = (img.as_tensor() if isinstance(img, MetaTensor) else img).detach().cpu()
        levels = _integer_levels(tensor) if tensor.numel() else None
        if levels is not None:
            # integer-valued volumes (CT in HU, most MR): exact percentiles from the histogram and the uint8 of
            # each distinct value computed once; the general path's result in a fraction of its time
            lowest, index, counts = levels
            low, high = _histogram_percentiles(lowest, counts, (self.lower, self.upper))
            if high <= low:
                return _to_uint8(img, low, high)
            grey = torch.arange(lowest, lowest + len(counts), dtype=torch.float32)
            table = _scale_to_uint8(grey, low, high).numpy()
            return _with_meta_of(img, torch.from_numpy(table[index.numpy()]))
        values = tensor.numpy()
        finite = np.isfinite(values)
        if not finite.any():
            raise ValueError(
                f"image of shape {tuple(values.shape)} is all NaN / infinite; nothing to normalise"
            )
        # percentiles of the finite voxels (an infinite one would make the range infinite and blank the image);
        # the clip then maps -inf / +inf to 0 / 255 and NaN to 0
        low, high = np.percentile(values[finite], [self.lower, self.upper])
        return _to_uint8(img, float(low), float(high))


class CTWindow(Transform):
    """CT windowing to uint8 0-255 by preset name (see :data:`CT_WINDOWS`) or explicit window / level in HU."""

    backend = [TransformBackends.TORCH]

    def __init__(
        self, preset: str | None = None, window: float | None = None, level: float | None = None
    ) -> None:
        self.low, self.high = window_bounds(preset, window, level)

    def __call__(self, img: torch.Tensor | np.ndarray) -> torch.Tensor:
        return _to_uint8(convert_to_tensor(img, track_meta=True, dtype=torch.float32), self.low, self.high)


class Passthrough8Bit(Transform):
    """Keep 8-bit images (X-ray, ultrasound, photographs, PNG slices) as they are, as uint8.

    Raises ValueError when values are not integers in 0-255, so a CT volume never slips through unscaled.
    """

    backend = [TransformBackends.TORCH]

    def __call__(self, img: torch.Tensor | np.ndarray) -> torch.Tensor:
        img = convert_to_tensor(img, track_meta=True)
        if img.dtype == torch.uint8:
            return img
        if img.dtype == torch.bool:  # a mask: 0 / 1
            return img.to(torch.uint8)
        values = img.as_tensor() if isinstance(img, MetaTensor) else img
        if values.is_floating_point() and not torch.isfinite(values).all():
            raise ValueError("8-bit passthrough got NaN / infinite values")
        if values.numel() and (
            values.min() < 0 or values.max() > 255 or not torch.equal(values, values.round())
        ):
            raise ValueError(
                f"8-bit passthrough got values in [{float(values.min())}, {float(values.max())}] that are not "
                "integers in 0-255; use SAMed2DNormalize or CTWindow for CT / MR"
            )
        out = img.to(torch.uint8)
        return out


class GreyToRGB(Transform):
    """One grey channel -> 3 identical channels (MONAI ``RepeatChannel``); 3-channel input passes unchanged."""

    backend = RepeatChannel.backend

    def __init__(self) -> None:
        self.repeat = RepeatChannel(repeats=3)

    def __call__(self, img: torch.Tensor | np.ndarray) -> torch.Tensor:
        channels = img.shape[0]
        if channels == 3:
            return convert_to_tensor(img, track_meta=True)
        if channels != 1:
            raise ValueError(f"grey -> RGB expects 1 (or 3) channels first, got shape {tuple(img.shape)}")
        return self.repeat(img)


class _PerKey(MapTransform):
    """Dictionary wrapper applying one array transform to every key."""

    def __init__(self, keys: KeysCollection, transform: Transform, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = transform

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d


class SAMed2DNormalized(_PerKey):
    """Dictionary version of :class:`SAMed2DNormalize`."""

    backend = SAMed2DNormalize.backend

    def __init__(
        self, keys: KeysCollection, lower: float = 0.5, upper: float = 99.5, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, SAMed2DNormalize(lower, upper), allow_missing_keys)


class CTWindowd(_PerKey):
    """Dictionary version of :class:`CTWindow`."""

    backend = CTWindow.backend

    def __init__(
        self,
        keys: KeysCollection,
        preset: str | None = None,
        window: float | None = None,
        level: float | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, CTWindow(preset, window, level), allow_missing_keys)


class Passthrough8Bitd(_PerKey):
    """Dictionary version of :class:`Passthrough8Bit`."""

    backend = Passthrough8Bit.backend

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, Passthrough8Bit(), allow_missing_keys)


class GreyToRGBd(_PerKey):
    """Dictionary version of :class:`GreyToRGB`."""

    backend = GreyToRGB.backend

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, GreyToRGB(), allow_missing_keys)


SAMed2DNormalizeD = SAMed2DNormalizeDict = SAMed2DNormalized
CTWindowD = CTWindowDict = CTWindowd
Passthrough8BitD = Passthrough8BitDict = Passthrough8Bitd
GreyToRGBD = GreyToRGBDict = GreyToRGBd


def volume_intensity(
    intensity: str | Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The uint8 mapping a volume of ``dtype`` gets for ``intensity``: "samed2d" (:class:`SAMed2DNormalize`; a
    uint8 volume passes through as it is, since the percentile stretch would change what the user sees),
    "uint8" / "none" (:class:`Passthrough8Bit`), a CT window preset (:class:`CTWindow`) or a callable (as is).

    The one home of the rule: the volume pipeline and the overlays that show what the model saw both use it.
    """
    if callable(intensity):
        return intensity
    if intensity == "samed2d":
        return Passthrough8Bit() if dtype == torch.uint8 else SAMed2DNormalize()
    if intensity in ("uint8", "none"):
        return Passthrough8Bit()
    if intensity in CT_WINDOWS:
        return CTWindow(intensity)
    raise ValueError(
        f"unknown intensity {intensity!r}: use 'samed2d', 'uint8', a CT window preset {sorted(CT_WINDOWS)} "
        "or a callable returning a uint8 volume"
    )
