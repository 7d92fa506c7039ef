"""SA-Med2D normalisation of one 512 x 512 x 128 CT-like volume: the fast exact paths against the first
implementation (``np.nanpercentile`` + MONAI ``ScaleIntensityRange`` on a MetaTensor), in the same process.

Two inputs: the integer-valued volume a CT NIfTI decodes to (histogram + lookup-table path) and the same volume
plus 0.5 (not integers: the in-place float path). Each is timed ``--repeats`` times per implementation,
interleaved; reported: median seconds, the ratio first / fast, and whether the uint8 outputs are identical.

Usage: ``python benchmarks/normalise.py [--repeats 5]``; prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from common import synthetic_ct
from monai.data import MetaTensor
from monai.transforms import ScaleIntensityRange

from monai_medplib.transforms.intensity import SAMed2DNormalize

SHAPE = (512, 512, 128)


def first_implementation(volume: MetaTensor) -> torch.Tensor:
    """The normalisation as first written (the baseline)."""
    values = volume.as_tensor().numpy()
    low, high = (float(v) for v in np.nanpercentile(values, [0.5, 99.5]))
    scaled = ScaleIntensityRange(low, high, 0.0, 255.0, clip=True, dtype=torch.float32)(volume)
    return torch.nan_to_num(torch.round(scaled), nan=0.0).to(torch.uint8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    base = synthetic_ct(SHAPE[2], size=SHAPE[0])[0].numpy()
    noisy = np.round(base + np.random.default_rng(0).normal(0, 20, SHAPE)).astype(np.float32)
    inputs = {"integer": noisy, "float": noisy + np.float32(0.5)}
    result = {}
    fast = SAMed2DNormalize()
    for name, array in inputs.items():
        volume = MetaTensor(torch.from_numpy(np.ascontiguousarray(array))[None])
        times: dict[str, list[float]] = {"first": [], "fast": []}
        outputs: dict[str, torch.Tensor] = {}
        for _ in range(args.repeats):
            for label, fn in (("first", first_implementation), ("fast", fast)):
                start = time.perf_counter()
                outputs[label] = fn(volume)
                times[label].append(time.perf_counter() - start)
        identical = torch.equal(torch.as_tensor(outputs["first"]), torch.as_tensor(outputs["fast"]))
        first, quick = statistics.median(times["first"]), statistics.median(times["fast"])
        result[name] = {
            "first_s": round(first, 3),
            "fast_s": round(quick, 3),
            "speedup": round(first / quick, 2),
            "identical": identical,
        }
        print(f"{name}: first {first:.3f} s, fast {quick:.3f} s, {first / quick:.2f}x, identical {identical}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
