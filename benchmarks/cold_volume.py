"""The two CPU steps a cold server request waits on, for one 512 x 512 x 128 CT-like volume: reading the NIfTI
and the SA-Med2D normalisation, each against its first implementation in the same process.

1. **Read** (``read``): ``load_volume`` (one bounded ISA-L inflate, slab-wise C-order float32 copy) against stock
   MONAI ``LoadImage(NibabelReader(), dtype=float32)`` on the same int16 ``.nii.gz``.
2. **Normalise**: the fast exact paths against ``np.nanpercentile`` + MONAI ``ScaleIntensityRange`` on a
   MetaTensor, for the integer-valued volume a CT NIfTI decodes to (histogram + lookup-table path, ``integer``) and
   the same volume plus 0.5 (not integers: the in-place float path, ``float``).

Each is timed ``--repeats`` times per implementation, interleaved; reported: median seconds, the ratio first /
fast, and whether the outputs are identical.

Usage: ``python benchmarks/cold_volume.py [--repeats 5]``; prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from common import synthetic_ct
from monai.data import MetaTensor, NibabelReader
from monai.transforms import LoadImage, ScaleIntensityRange

from monai_medplib.io import load_volume
from monai_medplib.transforms.intensity import SAMed2DNormalize

SHAPE = (512, 512, 128)


def first_implementation(volume: MetaTensor) -> torch.Tensor:
    """The normalisation as first written (the baseline)."""
    values = volume.as_tensor().numpy()
    low, high = (float(v) for v in np.nanpercentile(values, [0.5, 99.5]))
    scaled = ScaleIntensityRange(low, high, 0.0, 255.0, clip=True, dtype=torch.float32)(volume)
    return torch.nan_to_num(torch.round(scaled), nan=0.0).to(torch.uint8)


def first_read(path: str) -> torch.Tensor:
    """The NIfTI read as first written (the baseline): stock MONAI."""
    return LoadImage(reader=NibabelReader(), image_only=True, ensure_channel_first=True, dtype=np.float32)(
        path
    )


def compare(name: str, first, fast, arg, repeats: int) -> dict:
    """Median seconds of ``first(arg)`` and ``fast(arg)`` over interleaved ``repeats``, and whether they agree."""
    times: dict[str, list[float]] = {"first": [], "fast": []}
    outputs: dict[str, torch.Tensor] = {}
    for _ in range(repeats):
        for label, fn in (("first", first), ("fast", fast)):
            start = time.perf_counter()
            outputs[label] = fn(arg)
            times[label].append(time.perf_counter() - start)
    identical = torch.equal(torch.as_tensor(outputs["first"]), torch.as_tensor(outputs["fast"]))
    slow, quick = statistics.median(times["first"]), statistics.median(times["fast"])
    print(f"{name}: first {slow:.3f} s, fast {quick:.3f} s, {slow / quick:.2f}x, identical {identical}")
    return {
        "first_s": round(slow, 3),
        "fast_s": round(quick, 3),
        "speedup": round(slow / quick, 2),
        "identical": identical,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    base = synthetic_ct(SHAPE[2], size=SHAPE[0])[0].numpy()
    noisy = np.round(base + np.random.default_rng(0).normal(0, 20, SHAPE)).astype(np.float32)
    inputs = {"integer": noisy, "float": noisy + np.float32(0.5)}
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "ct.nii.gz")
        nib.save(nib.Nifti1Image(noisy.astype(np.int16), np.diag([0.8, 0.8, 1.5, 1.0])), path)
        result["read"] = compare("read", first_read, load_volume, path, args.repeats)
    fast = SAMed2DNormalize()
    for name, array in inputs.items():
        volume = MetaTensor(torch.from_numpy(np.ascontiguousarray(array))[None])
        result[name] = compare(name, first_implementation, fast, volume, args.repeats)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
