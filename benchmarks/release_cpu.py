"""The full-size ``MedPLIB-7b-2e`` architecture on a CPU: one slice the original's way vs the pipeline, the
networks alone (the floor, see ``run.py``), and a second prompt on the cached slice
(``python benchmarks/release_cpu.py``, about 5 minutes on 2 cores).

The demo model's proportions are not the release's: its LLM is 2 x 128 wide, so its ~680-row prefill is cheap
next to the full-size SAM decoder, and a cached second prompt cannot be much faster than the first. This script
measures the real proportions with random weights in fp32 at full width **and full depth**: CLIP ViT-L/336 (24
layers), the SAM-Med2D ViT-B encoder (12 layers) and decoder, and LLaMA-7B with 2-expert top-1 MoE in all 32
layers. The 32 LLM layers share one set of parameter tensors (each layer keeps its own module, index and KV
cache slot), so the weights take 4.5 GB instead of 47 GB; every layer still runs its full matrix products on
1.35 GB of weights, far beyond any cache, so the sharing saves memory, not time.

Random weights never emit ``<SEG>``, so both sides force ``<SEG></s>`` (see ``benchmarks/run.py``); the
original's way computes ``lm_head`` over every prefill row, as transformers 4.31 does. Prompts use the tiny
public fixture's tokenizer (its ids are valid in the 32k release vocabulary). Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from datetime import datetime, timezone

import torch
from common import (
    TEXT,
    TEXT2,
    TINY,
    PeakRSS,
    build_random_release_model,
    lits_volume,
    network_floor,
    original_way,
    timed,
)

from monai_medplib.pipeline import MedPLIBPipeline
from monai_medplib.tokenization import MedPLIBTokenizer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    with PeakRSS() as build_mem:
        build_s, model = timed(
            lambda: build_random_release_model("cpu", torch.float32, share_llm_layers=True)
        )
    pipe = MedPLIBPipeline(model, MedPLIBTokenizer.from_pretrained(TINY))
    volume = lits_volume(128)
    unique = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    results = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpu, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "architecture": "MedPLIB-7b-2e (LLaMA-7B 32 x 2-expert top-1 MoE, CLIP ViT-L/336, SAM-Med2D ViT-B), fp32",
        "params_computed": sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False)),
        "weights_gb_resident": round(sum(unique.values()) / 1e9, 2),
        "build_seconds": round(build_s, 1),
        "build_rss_increase_mb": round(build_mem.increase_mb, 1),
    }
    print(json.dumps(results), flush=True)
    pipe.ground_volume(volume, TEXT, slices=[0], force_seg=True)  # memoises the volume normalisation
    with PeakRSS() as mem:
        first_s, _ = timed(lambda: pipe.ground_volume(volume, TEXT, slices=[60], force_seg=True))
        print(f"pipeline, first prompt on slice 60: {first_s:.1f} s", flush=True)
        second_s, _ = timed(lambda: pipe.ground_volume(volume, TEXT2, slices=[60], force_seg=True))
        print(f"pipeline, second prompt on slice 60 (cached): {second_s:.2f} s", flush=True)
    original_s, _ = timed(lambda: original_way(model, pipe.tokenizer, volume, TEXT, [70]))
    print(f"original's way, slice 70: {original_s:.1f} s", flush=True)
    pipe.feature_cache.clear()
    pipeline_s, _ = timed(lambda: pipe.ground_volume(volume, TEXT, slices=[70], force_seg=True))
    print(f"pipeline, slice 70: {pipeline_s:.1f} s", flush=True)
    floor = network_floor(model, pipe.tokenizer, volume, TEXT, [80])
    print("networks, slice 80 (ms): " + ", ".join(f"{k} {v:.0f}" for k, v in floor.items()), flush=True)
    results.update(
        {
            "network_ms_per_slice": {k: round(v) for k, v in floor.items()},
            "volume_speedup_bound": round(original_s / (sum(floor.values()) / 1000), 3),
            "first_prompt_s": round(first_s, 2),
            "second_prompt_cached_s": round(second_s, 3),
            "cache_speedup": round(first_s / second_s, 1),
            "ms_per_slice_original": round(1000 * original_s),
            "ms_per_slice_pipeline": round(1000 * pipeline_s),
            "volume_speedup": round(original_s / pipeline_s, 3),
            "peak_rss_increase_mb_prompts": round(mem.increase_mb, 1),
        }
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
