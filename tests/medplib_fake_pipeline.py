"""A stand-in for ``MedPLIBPipeline`` with the app's volume-level interface, for server infrastructure tests.

It does no modelling: grounding thresholds the volume, answers echo the question, refinement paints
disks around clicks. Its value is that its outputs are predictable, so tests can check geometry, label
values, JSON plumbing and error handling; ``MEDPLIB_FAKE_DELAY`` (seconds) makes every call slow, to
show that a long inference does not block other requests.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np


def _delay() -> None:
    time.sleep(float(os.environ.get("MEDPLIB_FAKE_DELAY", "0")))


@dataclass
class FakeVolumeGrounding:
    label: np.ndarray
    label_names: dict
    answers: dict
    slice_results: dict = field(default_factory=dict)


@dataclass
class FakeRegionAnswer:
    answer: str
    region: np.ndarray


class FakeMedPLIBPipeline:
    """Predictable outputs: text i (0-based) grounds voxels above the (50 + 10 i)th percentile."""

    def __init__(self, path: str, device: str, dtype: object) -> None:
        self.path, self.device, self.dtype = path, device, dtype

    @classmethod
    def from_pretrained(cls, path: str = "demo", device: str | None = None, dtype: object = None):
        if path != "demo" and not os.path.isdir(path):
            raise FileNotFoundError(path)
        return cls(path, device or "cpu", dtype)

    def ground_volume(self, volume, texts, axis="axial", slices=None):
        _delay()
        arr = np.asarray(volume)[0]
        label = np.zeros(arr.shape, dtype=np.uint8)
        chosen = range(arr.shape[2]) if slices is None else slices
        answers, priors = {}, {}
        for i, text in enumerate(texts):
            threshold = np.percentile(arr, 50 + 10 * i)
            for k in chosen:
                mask = arr[:, :, k] > threshold
                label[:, :, k][mask & (label[:, :, k] == 0)] = i + 1
                priors[(text, k)] = mask
            answers[text] = f"Sure, it is [SEG] ({text})."
        return FakeVolumeGrounding(label, {t: i + 1 for i, t in enumerate(texts)}, answers, priors)

    def answer_volume(self, volume, question, index, axis="axial"):
        _delay()
        return f"fake answer on {axis} slice {index}: {question}"

    def answer_volume_region(self, volume, question, points=None, roi=None, scribble=None, axis="axial"):
        _delay()
        region = np.zeros(np.asarray(volume).shape[1:], dtype=bool)
        if scribble is not None:
            region |= np.asarray(scribble, dtype=bool)
        if roi is not None:
            region[roi[0] : roi[1] + 1, roi[2] : roi[3] + 1, roi[4] : roi[5] + 1] = True
        for i, j, k in points or []:
            region[i, j, k] = True
        return FakeRegionAnswer(f"fake region answer ({int(region.sum())} voxels): {question}", region)

    def refine_volume(self, volume, index, points, labels, prior=None, axis="axial"):
        _delay()
        shape = np.asarray(volume).shape[1:]
        out = np.zeros(shape, dtype=bool)
        if prior is not None:
            out[:, :, index] = np.asarray(prior, dtype=bool)
        ii, jj = np.mgrid[: shape[0], : shape[1]]
        for (i, j, k), positive in zip(points, labels):
            disk = (ii - i) ** 2 + (jj - j) ** 2 <= 9
            out[:, :, k] = out[:, :, k] | disk if positive else out[:, :, k] & ~disk
        return out
