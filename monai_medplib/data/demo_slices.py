"""The demo volumes cut into 8-bit slices on all three planes, with their per-volume held-out split.

Two real volumes (see :mod:`.lits` and :mod:`.mni`):

* ``ct``: LiTS case 117 (label 0 background, 1 liver, 2 tumour): targets liver (labels 1-2) and tumour (2);
* ``mr``: the MNI ICBM152 2009a T1 (label 0 background, 1 grey matter, 2 white matter): targets grey matter,
  white matter and brain (= grey or white matter).

Each volume is normalised the SA-Med2D way (:class:`~monai_medplib.transforms.intensity.SAMed2DNormalize`) and
cut with :class:`~monai_medplib.transforms.slicing.ExtractSlices` along the axial, coronal and sagittal planes.

Held-out split (:func:`slab_split`, per volume and plane): the contiguous central block of
``round(test_fraction * n)`` slices is the test set, ``gap`` slices on either side are used nowhere, the rest is
training. Train and test come from the same volume: this measures generalisation to unseen slabs of the same
body, not to new patients.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from .demo_prompts import PLANES, TARGETS

__all__ = [
    "DemoSlice",
    "DemoVolume",
    "SlabSplit",
    "ct_volume_from_planes",
    "demo_volumes",
    "lits_volume",
    "mni_volume",
    "iter_slices",
    "slab_split",
]

DEFAULT_TEST_FRACTION = 0.2
DEFAULT_GAP = 3


@dataclass(frozen=True)
class SlabSplit:
    """Slice indices of one plane: ``test`` (held-out block), ``gap`` (unused) and ``train``."""

    train: tuple[int, ...]
    gap: tuple[int, ...]
    test: tuple[int, ...]

    def which(self, index: int) -> str | None:
        """ "train", "test" or None (a gap slice)."""
        return "test" if index in self.test else "train" if index in self.train else None


def slab_split(
    num_slices: int, test_fraction: float = DEFAULT_TEST_FRACTION, gap: int = DEFAULT_GAP
) -> SlabSplit:
    """Central held-out block of ``round(test_fraction * num_slices)`` slices with ``gap`` unused on each side."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    size = max(1, round(test_fraction * num_slices))
    start = (num_slices - size) // 2
    test = range(start, start + size)
    gap_ids = [*range(max(0, start - gap), start), *range(start + size, min(num_slices, start + size + gap))]
    train = [i for i in range(num_slices) if i not in test and i not in gap_ids]
    return SlabSplit(tuple(train), tuple(gap_ids), tuple(test))


@dataclass(frozen=True)
class DemoVolume:
    """One volume whose slices are cut on demand.

    Attributes:
        name: short name ("ct", "mr").
        modality: "CT" or "MR".
        case_prefix: SA-Med2D-style file-name prefix of its slices (``<modality>--<dataset>--<case>``).
        target_labels: target name -> label values that make up the target.
        region_labels: region class -> the label value whose pixels carry that class.
        image: the 8-bit volume ``[1, X, Y, Z]`` with its affine (a MetaTensor), sliced with ExtractSlice.
        label: the label volume, same geometry.
        planes: instead of ``image`` / ``label``: plane -> (images, labels) already cut (tests).
    """

    name: str
    modality: str
    case_prefix: str
    target_labels: Mapping[str, tuple[int, ...]]
    region_labels: Mapping[str, int]
    image: Any = None
    label: Any = None
    planes: Mapping[str, tuple[Sequence[np.ndarray], Sequence[np.ndarray]]] | None = None

    def plane_names(self) -> tuple[str, ...]:
        return tuple(self.planes) if self.planes is not None else PLANES

    def num_slices(self, plane: str) -> int:
        if self.planes is not None:
            return len(self.planes[plane][0])
        from ..transforms.slicing import slice_geometry

        affine = np.asarray(self.image.affine, dtype=np.float64)
        return slice_geometry(affine, self.image.shape[1:], plane).num_slices

    def take(self, plane: str, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(image uint8 [H, W], label uint8 [H, W])`` of one slice."""
        if self.planes is not None:
            images, labels = self.planes[plane]
            return np.asarray(images[index], dtype=np.uint8), np.asarray(labels[index], dtype=np.uint8)
        from ..transforms.slicing import ExtractSlice

        cut = ExtractSlice(plane, index)
        image = np.asarray(cut(self.image)[0]).astype(np.uint8)
        label = np.asarray(cut(self.label)[0]).round().astype(np.uint8)
        return image, label

    def split(
        self, plane: str, test_fraction: float = DEFAULT_TEST_FRACTION, gap: int = DEFAULT_GAP
    ) -> SlabSplit:
        """The held-out split of ``plane``."""
        return slab_split(self.num_slices(plane), test_fraction, gap)


@dataclass(frozen=True)
class DemoSlice:
    """One slice of a :class:`DemoVolume` (or a square crop of it, ``view``) and what it shows."""

    volume: DemoVolume
    plane: str
    index: int
    split: str
    image: np.ndarray
    label: np.ndarray
    view: str = ""

    @property
    def modality(self) -> str:
        return self.volume.modality

    @property
    def stem(self) -> str:
        """SA-Med2D image stem (x = sagittal, y = coronal, z = axial slices)."""
        letter = {"sagittal": "x", "coronal": "y", "axial": "z"}[self.plane]
        return f"{self.volume.case_prefix}--{letter}_{self.index:04d}" + (
            f"--{self.view}" if self.view else ""
        )

    def crop(self, top: int, left: int, size: int, view: str) -> DemoSlice:
        """The square ``size`` x ``size`` window at ``(top, left)`` as a slice of its own (training augmentation)."""
        window = (slice(top, top + size), slice(left, left + size))
        return DemoSlice(
            self.volume, self.plane, self.index, self.split, self.image[window], self.label[window], view
        )

    def target_mask(self, target: str) -> np.ndarray:
        """Boolean mask of ``target`` (all False for a target of another modality)."""
        values = self.volume.target_labels.get(target, ())
        return np.isin(self.label, values) if values else np.zeros(self.label.shape, dtype=bool)

    @cached_property
    def presence(self) -> dict[str, bool | None]:
        """Target -> True (present), False (absent) or None (a few pixels only: ambiguous, never asked)."""
        out: dict[str, bool | None] = {}
        for name, target in TARGETS.items():
            pixels = int(self.target_mask(name).sum())
            out[name] = True if pixels >= target.min_pixels else False if pixels == 0 else None
        return out

    def region_class_map(self) -> dict[str, np.ndarray]:
        """Region class -> boolean pixels of that class."""
        return {cls: self.label == value for cls, value in self.volume.region_labels.items()}


def _normalised(image: np.ndarray, label: np.ndarray, affine: np.ndarray) -> tuple[Any, Any]:
    """The SA-Med2D 8-bit volume and the label volume as MetaTensors ``[1, X, Y, Z]``."""
    from monai.data import MetaTensor

    from ..transforms.intensity import SAMed2DNormalize

    image8 = SAMed2DNormalize()(MetaTensor(image[None].astype(np.float32), affine=affine))
    return image8, MetaTensor(label[None].astype(np.float32), affine=affine)


CT_TARGET_LABELS = {"liver": (1, 2), "tumour": (2,)}
CT_REGION_LABELS = {"background": 0, "liver": 1, "tumour": 2}
MR_TARGET_LABELS = {"grey matter": (1,), "white matter": (2,), "brain": (1, 2)}
MR_REGION_LABELS = {"background": 0, "grey matter": 1, "white matter": 2}


def lits_volume() -> DemoVolume:
    """LiTS case 117 (``liver-ct-segmentation-package``) as a :class:`DemoVolume`."""
    from .lits import load_lits_case

    case = load_lits_case()
    image, label = _normalised(case.image, case.label, case.affine)
    return DemoVolume("ct", "CT", "ct_00--LiTS--case_117", CT_TARGET_LABELS, CT_REGION_LABELS, image, label)


def mni_volume() -> DemoVolume:
    """The MNI ICBM152 2009a T1 with grey / white matter (the ``nilearn`` wheel's files) as a :class:`DemoVolume`."""
    from .mni import load_mni_case

    case = load_mni_case()
    image, label = _normalised(case.image, case.label, case.affine)
    return DemoVolume(
        "mr", "MR", "mr_t1--ICBM152--mni_2009a_sym", MR_TARGET_LABELS, MR_REGION_LABELS, image, label
    )


def ct_volume_from_planes(
    planes: Iterable[tuple[str, Sequence[np.ndarray], Sequence[np.ndarray]]],
) -> DemoVolume:
    """A CT :class:`DemoVolume` (liver / tumour labels) from ``(plane, images, labels)`` triples (tests)."""
    cut = {plane: (list(images), list(labels)) for plane, images, labels in planes}
    return DemoVolume("ct", "CT", "ct_00--LiTS--case_117", CT_TARGET_LABELS, CT_REGION_LABELS, planes=cut)


def demo_volumes() -> list[DemoVolume]:
    """The CT and the MR demo volumes."""
    return [lits_volume(), mni_volume()]


def iter_slices(
    volumes: Iterable[DemoVolume],
    splits: Sequence[str] = ("train", "test"),
    test_fraction: float = DEFAULT_TEST_FRACTION,
    gap: int = DEFAULT_GAP,
    every: int = 1,
) -> Iterator[DemoSlice]:
    """Slices of ``volumes`` in the given splits (volume, plane, index order); ``every`` keeps every n-th one
    of each (volume, plane, split) run."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    for volume in volumes:
        for plane in volume.plane_names():
            split = volume.split(plane, test_fraction, gap)
            for which in splits:
                indices = {"train": split.train, "test": split.test}[which]
                for index in indices[::every]:
                    image, label = volume.take(plane, index)
                    yield DemoSlice(volume, plane, index, which, image, label)
