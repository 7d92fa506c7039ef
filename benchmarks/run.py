"""Volume grounding speed and memory: ``python benchmarks/run.py`` (last line: one JSON object).

Measures, in one run, on the demo model when ``monai_medplib/demo_model`` exists, else the tiny public fixture:

1. grounding a 128-slice CT volume (LiTS case 117, axial): the pipeline (batched CLIP / SAM / LLM prefill,
   feature cache, grounding shortcut) vs the original's way (one slice at a time, full ``generate``, no cache);
   time ratio and peak RSS of each; the same for 2 and 4 texts; and the floor: the four networks every exact
   grounding runs (CLIP, LLM prefill, SAM encoder and decoder) timed alone, whose ratio to the original's way
   (``volume_speedup_bound``) is the most any exact pipeline can gain on this machine;
2. a second prompt on a cached slice vs the first prompt on it; the same on a 512 x 512 x 300 CT, where the
   volume bookkeeping of a one-slice call shows;
3. pipeline time against slice count (32, 64, 128);
4. checkpoint loading peak RSS vs the weight bytes (in a subprocess; the model used here and a synthetic
   ~0.5 GB checkpoint of the same architecture family, where allocator noise no longer hides the ratio).

Random weights never emit ``<SEG>``: on them both sides force the answer ``<SEG></s>`` (the original's way as
the fixture oracle did, with ``forced_decoder_ids``: a prefill plus one decoding step; the pipeline with its
``force_seg`` option: one prefill). The original's way computes what the release's transformers-4.31
``generate`` computes: ``lm_head`` over every prefill position (4.31 has no ``num_logits_to_keep``); the same
loop with ``lm_head`` on the last row only is timed too (``volume_speedup_vs_last_row_baseline``), so the share
of the ratio that comes from that one difference is visible. Timings are wall-clock; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch
from common import (
    DEMO,
    REPO,
    TEXT,
    TEXT2,
    TEXTS,
    TINY,
    PeakRSS,
    dice,
    lits_volume,
    network_floor,
    original_way,
    synthetic_ct,
    timed,
    zero_prompt_label,
)

from monai_medplib.checkpoint import load_medplib
from monai_medplib.pipeline import MedPLIBPipeline
from monai_medplib.user_input import RECOMMENDED_KEYFRAMES


def bench_volume(
    pipe: MedPLIBPipeline, batch_size: int, counts: list[int], baseline_slices: int, grounding: dict
) -> dict:
    model, tokenizer = pipe.model, pipe.tokenizer
    volume = lits_volume(max(counts))
    per_count: dict[str, float] = {}
    paths = {}
    peak_pipeline = 0.0
    for n in counts:
        pipe.feature_cache.clear()
        sub = lits_volume(n)
        with PeakRSS() as mem:
            seconds, result = timed(
                lambda sub=sub: pipe.ground_volume(
                    sub, TEXT, batch_size=batch_size, progress=False, **grounding
                )
            )
        per_count[str(n)] = round(seconds, 3)
        if n == max(counts):
            peak_pipeline, paths, pipeline_label = mem.increase_mb, result.paths, result.label
        print(f"pipeline {n} slices: {seconds:.2f} s  paths={result.paths}", flush=True)
    slices = list(range(baseline_slices))
    with PeakRSS() as mem:
        base_seconds, base_label = timed(
            lambda: original_way(
                model, tokenizer, volume, TEXT, slices, force_seg=grounding.get("force_seg", False)
            )
        )
    base_full = base_seconds * max(counts) / baseline_slices
    last_row_seconds, _ = timed(
        lambda: original_way(
            model,
            tokenizer,
            volume,
            TEXT,
            slices,
            all_logits=False,
            force_seg=grounding.get("force_seg", False),
        )
    )
    last_row_full = last_row_seconds * max(counts) / baseline_slices
    agree = float(
        (base_label[..., :baseline_slices] == pipeline_label.as_tensor()[..., :baseline_slices])
        .float()
        .mean()
    )
    print(
        f"original way {baseline_slices} slices: {base_seconds:.2f} s (-> {base_full:.2f} s for {max(counts)}); "
        f"with last-row lm_head: {last_row_seconds:.2f} s"
    )
    floor = network_floor(model, tokenizer, volume, TEXT, slices)
    floor_ms = sum(floor.values())
    original_ms = 1000 * base_seconds / baseline_slices
    print(
        "networks per slice (ms): "
        + ", ".join(f"{k} {v:.1f}" for k, v in floor.items())
        + f"; sum {floor_ms:.1f} of the original's {original_ms:.1f}"
    )
    # several texts: the pipeline encodes each slice once, the original's way once per text
    multi_text = {}
    for n in (2, 4):
        pipe.feature_cache.clear()
        seconds, _ = timed(
            lambda n=n: pipe.ground_volume(
                volume, TEXTS[:n], batch_size=batch_size, progress=False, **grounding
            )
        )
        multi_text[f"{n}_text_speedup"] = round(n * base_full / seconds, 2)
    return {
        "volume_seconds_pipeline": per_count[str(max(counts))],
        "volume_seconds_original": round(base_full, 3),
        "original_slices_timed": baseline_slices,
        "volume_speedup": round(base_full / per_count[str(max(counts))], 2),
        "volume_seconds_original_last_row": round(last_row_full, 3),
        "volume_speedup_vs_last_row_baseline": round(last_row_full / per_count[str(max(counts))], 2),
        **multi_text,
        "network_ms_per_slice": {k: round(v, 1) for k, v in floor.items()},
        "volume_speedup_bound": round(original_ms / floor_ms, 2),
        "seconds_per_count": per_count,
        "linearity_128_over_32": round(per_count[str(max(counts))] / per_count[str(min(counts))], 2),
        "peak_rss_increase_mb_pipeline": round(peak_pipeline, 1),
        "peak_rss_increase_mb_original": round(mem.increase_mb, 1),
        "labels_agree_with_original": round(agree, 6),
        "paths": paths,
    }


def bench_keyframes(pipe: MedPLIBPipeline, grounding: dict, num_slices: int = 128) -> dict:
    """Keyframe grounding (issue 18) at the recommended k on the LiTS CT, axial: speed and Dice vs exact grounding
    in one run, and the control (a zero prompt embedding on every slice: no LLM) vs exact, which says how much
    of the agreement the text prompt explains (see benchmarks/keyframes.py for the full table)."""
    from keyframes import speed

    volume = lits_volume(num_slices)
    labels: dict = {}
    row = speed(pipe, volume, "liver", RECOMMENDED_KEYFRAMES, labels, **grounding)
    control = zero_prompt_label(pipe, volume, "axial")
    return {
        "keyframe_k": RECOMMENDED_KEYFRAMES,
        "keyframe_speedup": row["speedup"],
        "keyframe_llm_passes": row["llm_passes"],
        "keyframe_dice_vs_exact": row["dice_vs_exact"],
        "zero_prompt_dice_vs_exact": round(dice(labels["exact"], control), 4),
    }


def bench_cache(pipe: MedPLIBPipeline, grounding: dict, repeats: int = 5) -> dict:
    """First prompt on a slice (encoders and the image-prefix prefill run) vs a second prompt on it (cached).

    The cache is emptied before every first prompt; the volume's 8-bit normalisation is memoised for both.
    """
    volume = lits_volume(128)
    pipe.ground_volume(volume, TEXT, slices=[0], **grounding)  # normalise the volume once (memoised)
    first, second = [], []
    for k in range(repeats):
        index = 40 + 10 * k
        pipe.feature_cache.clear()
        first.append(
            timed(lambda index=index: pipe.ground_volume(volume, TEXT, slices=[index], **grounding))[0]
        )
        second.append(
            timed(lambda index=index: pipe.ground_volume(volume, TEXT2, slices=[index], **grounding))[0]
        )
    pipe.feature_cache.clear()
    point = [(60, 60, 100)]
    region_first = timed(
        lambda: pipe.answer_volume_region(volume, "What is it?", points=point, max_new_tokens=4)
    )[0]
    region_second = timed(
        lambda: pipe.answer_volume_region(volume, "Is it normal?", points=point, max_new_tokens=4)
    )[0]
    return {
        "cache_first_s": round(statistics.median(first), 4),
        "cache_second_s": round(statistics.median(second), 4),
        "cache_speedup": round(statistics.median(first) / statistics.median(second), 2),
        "region_vqa_first_s": round(region_first, 4),
        "region_vqa_second_s": round(region_second, 4),
        "region_vqa_cache_speedup": round(region_first / region_second, 2),
    }


def bench_large_volume_prompt(pipe: MedPLIBPipeline, grounding: dict, repeats: int = 3) -> dict:
    """Interactive prompts on one slice of a clinical-size 512 x 512 x 300 CT: what a click in Slicer costs once
    the volume is normalised (first prompt on a slice vs a second one on it)."""
    volume = synthetic_ct(300)
    normalise_s = timed(lambda: pipe.ground_volume(volume, TEXT, slices=[0], **grounding))[0]
    first, second = [], []
    for k in range(repeats):
        index = 100 + 50 * k
        first.append(timed(lambda i=index: pipe.ground_volume(volume, TEXT, slices=[i], **grounding))[0])
        second.append(timed(lambda i=index: pipe.ground_volume(volume, TEXT2, slices=[i], **grounding))[0])
    return {
        "large_volume_first_call_s": round(normalise_s, 3),
        "large_volume_first_prompt_s": round(statistics.median(first), 4),
        "large_volume_second_prompt_s": round(statistics.median(second), 4),
    }


LOAD_CHILD = r"""
import json, sys, torch
from monai_medplib.checkpoint import load_medplib, weight_files
import safetensors, sentencepiece  # imported before the baseline so only the load itself is counted
def status_bytes(field):
    # VmHWM is this process's own high-water mark. getrusage's ru_maxrss is not: Linux carries it over exec
    # from the parent that spawned the child, so a benchmark process holding a model inflated it.
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
path = sys.argv[1]
weights = sum(f.stat().st_size for f in weight_files(path))
before = status_bytes("VmRSS")
model, config, tok = load_medplib(path)
peak = status_bytes("VmHWM")
params = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"weight_bytes": weights, "param_bytes": params, "rss_before": before, "peak_rss": peak,
                  "ratio": (peak - before) / weights}))
"""


def load_rss(path: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", LOAD_CHILD, str(path)], capture_output=True, text=True, check=True, cwd=REPO
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def synthetic_checkpoint(out_dir: Path, tokenizer_dir: Path) -> Path:
    """A random ~0.5 GB checkpoint (tiny vocabulary, wider / deeper LLM) written with ``save_medplib``."""
    from monai_medplib.checkpoint import save_medplib
    from monai_medplib.config import MedPLIBConfig
    from monai_medplib.modeling.medplib import MedPLIBForCausalLM

    config = MedPLIBConfig.tiny()
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 1024, 2816, 8
    config.num_attention_heads = config.num_key_value_heads = 8
    config.moe_layers_idx = list(range(config.num_hidden_layers))
    model = MedPLIBForCausalLM(config)
    save_medplib(model, config, tokenizer_dir, out_dir)
    del model
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="model directory (default: demo model, else tiny fixture)"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--baseline-slices", type=int, default=128, help="slices the original's way is timed on"
    )
    parser.add_argument("--quick", action="store_true", help="counts 8/16/32, baseline on 8 slices")
    parser.add_argument(
        "--force-seg",
        choices=("auto", "yes", "no"),
        default="auto",
        help="force <SEG></s> on both sides (auto: only for the random-weight tiny model; the demo model emits "
        "<SEG> itself, so there the original generates and the pipeline takes its checked shortcut)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for both sides (1: immune to a busy shared machine)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = Path(args.model) if args.model else (DEMO if (DEMO / "config.json").is_file() else TINY)
    torch.set_grad_enabled(False)
    load_seconds, (model, _, tokenizer) = timed(lambda: load_medplib(path))
    pipe = MedPLIBPipeline(model, tokenizer)
    force = args.force_seg == "yes" or (args.force_seg == "auto" and path != DEMO)
    grounding = {"force_seg": True} if force else {"fast": True, "max_new_tokens": 1024}
    counts = [8, 16, 32] if args.quick else [32, 64, 128]
    baseline = min(args.baseline_slices, 8 if args.quick else args.baseline_slices)
    results = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpu, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": str(path),
        "model_is_demo": path == DEMO,
        "force_seg": force,
        "pipeline_grounding": grounding,
        "dtype": str(model.dtype),
        "batch_size": args.batch_size,
        "load_seconds": round(load_seconds, 2),
    }
    results.update(bench_volume(pipe, args.batch_size, counts, baseline, grounding))
    results.update(bench_cache(pipe, grounding))
    results.update(bench_large_volume_prompt(pipe, grounding))
    results.update(bench_keyframes(pipe, grounding, 32 if args.quick else 128))
    load_model = load_rss(path)
    with tempfile.TemporaryDirectory(prefix="medplib_bench_") as tmp:
        synthetic = synthetic_checkpoint(Path(tmp) / "synthetic", TINY)
        load_big = load_rss(synthetic)
    results.update(
        {
            "load_rss_ratio": round(load_big["ratio"], 3),
            "load_weight_mb": round(load_big["weight_bytes"] / 2**20, 1),
            "load_rss_ratio_model": round(load_model["ratio"], 3),
            "load_weight_mb_model": round(load_model["weight_bytes"] / 2**20, 1),
        }
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
