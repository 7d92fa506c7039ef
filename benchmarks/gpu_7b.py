"""Full-size ``MedPLIB-7b-2e`` architecture with random bf16 weights on a GPU: volume grounding speed and memory.

``python benchmarks/gpu_7b.py`` (CUDA needed; ~24 GB of GPU memory for the weights) measures:

* ms per slice, the original's way (batch 1, forced ``<SEG></s>``: prefill + one decode step, no cache);
* ms per slice of the pipeline at batch 1 and batched (``--batch-size``), on a synthetic 300-slice CT;
* one interactive prompt: a second text on a slice whose features are cached;
* peak GPU memory (``torch.cuda.max_memory_allocated``).

Random weights never emit ``<SEG>``: both sides force it (see ``benchmarks/run.py``); the model builder,
the original's way and the synthetic CT are in ``benchmarks/common.py``. The prompts use the tiny
public fixture's tokenizer (its ids are valid in the 32k release vocabulary; prompts come out somewhat longer
than with the LLaMA tokenizer). ``python benchmarks/gpu_7b.py --meta`` only builds the model on the meta device
and prints its size (what the CPU tests check).
"""

from __future__ import annotations

import argparse
import json
import statistics
from datetime import datetime, timezone

import torch
from common import TEXT, TEXT2, TINY, build_random_release_model, cuda_timed, original_way, synthetic_ct

from monai_medplib.pipeline import MedPLIBPipeline
from monai_medplib.tokenization import MedPLIBTokenizer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--baseline-slices", type=int, default=16)
    parser.add_argument(
        "--meta", action="store_true", help="build on the meta device and print the size only"
    )
    args = parser.parse_args()
    if args.meta:
        model = build_random_release_model("meta")
        params = sum(p.numel() for p in model.parameters())
        print(
            json.dumps(
                {
                    "params": params,
                    "bf16_gb": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9, 2),
                }
            )
        )
        return
    if not torch.cuda.is_available():
        raise SystemExit("gpu_7b.py needs a CUDA device (use --meta on a CPU machine)")
    torch.set_grad_enabled(False)
    seconds, model = cuda_timed(lambda: build_random_release_model("cuda"))
    pipe = MedPLIBPipeline(model, MedPLIBTokenizer.from_pretrained(TINY))
    volume = synthetic_ct(args.slices)
    weights_gb = torch.cuda.memory_allocated() / 2**30
    results = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(seconds, 1),
        "weights_gib": round(weights_gb, 2),
        "force_seg": True,
    }
    pipe.ground_volume(volume, TEXT, slices=[0, 1], force_seg=True, batch_size=2)  # warm-up (kernels, memo)
    base_s, _ = cuda_timed(
        lambda: original_way(model, pipe.tokenizer, volume, TEXT, list(range(args.baseline_slices)))
    )
    results["ms_per_slice_original"] = round(1000 * base_s / args.baseline_slices, 1)
    for batch in (1, args.batch_size):
        pipe.feature_cache.clear()
        torch.cuda.reset_peak_memory_stats()
        n = args.baseline_slices if batch == 1 else args.slices
        s, _ = cuda_timed(
            lambda batch=batch, n=n: pipe.ground_volume(
                volume, TEXT, slices=list(range(n)), force_seg=True, batch_size=batch, progress=False
            )
        )
        results[f"ms_per_slice_batch{batch}"] = round(1000 * s / n, 1)
        results[f"peak_gpu_gib_batch{batch}"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    results[f"volume_{args.slices}_seconds"] = round(
        results[f"ms_per_slice_batch{args.batch_size}"] * args.slices / 1000, 1
    )
    first, second = [], []
    for index in (100, 150, 200):
        pipe.feature_cache.clear()
        first.append(
            cuda_timed(lambda index=index: pipe.ground_volume(volume, TEXT, slices=[index], force_seg=True))[
                0
            ]
        )
        second.append(
            cuda_timed(lambda index=index: pipe.ground_volume(volume, TEXT2, slices=[index], force_seg=True))[
                0
            ]
        )
    results["interactive_first_ms"] = round(1000 * statistics.median(first), 1)
    results["interactive_cached_ms"] = round(1000 * statistics.median(second), 1)
    results["volume_speedup"] = round(
        results["ms_per_slice_original"] / results[f"ms_per_slice_batch{args.batch_size}"], 2
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
