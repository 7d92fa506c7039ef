"""Volume grounding speed and memory: ``python benchmarks/run.py`` (last line: one JSON object).

Measures, in one run, on the demo model when ``monai_medplib/demo_model`` exists, else the tiny public fixture:

1. grounding a 128-slice CT volume (LiTS case 117, axial): the pipeline (batched CLIP / SAM / LLM prefill,
   feature cache, grounding shortcut) vs the original's way (one slice at a time, full ``generate``, no cache);
   time ratio and peak RSS of each;
2. a second prompt on a cached slice vs the first prompt on it;
3. pipeline time against slice count (32, 64, 128);
4. checkpoint loading peak RSS vs the weight bytes (in a subprocess; the model used here and a synthetic
   ~0.5 GB checkpoint of the same architecture family, where allocator noise no longer hides the ratio).

Random weights never emit ``<SEG>``: on them both sides force the answer ``<SEG></s>`` (the original's way as
the fixture oracle did, with ``forced_decoder_ids``: a prefill plus one decoding step; the pipeline with its
``force_seg`` option: one prefill). Timings are wall-clock medians; nothing here is asserted.
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
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from monai.data import MetaTensor  # noqa: E402

from monai_medplib.checkpoint import load_medplib  # noqa: E402
from monai_medplib.data.lits import load_lits_case  # noqa: E402
from monai_medplib.feature_cache import FeatureCache  # noqa: E402
from monai_medplib.processing import binarize, clip_pixels, postprocess_mask_logits, sam_pixels  # noqa: E402
from monai_medplib.tokenization import build_prompt  # noqa: E402
from monai_medplib.transforms.slicing import slice_geometry, volume_affine_ras  # noqa: E402
from monai_medplib.volume import VolumeMixin, prepare_volume  # noqa: E402

DEMO = REPO / "monai_medplib" / "demo_model"
TINY = Path("/work/shared/fixtures/upstream_tiny_public/model")
TEXT = "Please segment the liver."
TEXT2 = "Please segment the tumour in the liver."


class BenchPipeline(VolumeMixin):
    """The volume methods on a bare model + tokenizer (what ``MedPLIBPipeline`` provides)."""

    def __init__(self, model, tokenizer, template: str = "vicuna_v1") -> None:
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.feature_cache = FeatureCache()


# ------------------------------------------------------------------------------------------ memory
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident set size above the level at entry, sampled every 2 ms by a thread."""

    def __enter__(self) -> PeakRSS:
        self.start = rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def increase_mb(self) -> float:
        return (self.peak - self.start) / 2**20


# ------------------------------------------------------------------------------------------ the original's way
@torch.no_grad()
def original_way(model, tokenizer, volume: MetaTensor, text: str, slices: list[int]) -> torch.Tensor:
    """Release ``evaluate`` per slice: preprocess, CLIP (batch 1), forced ``<SEG></s>`` generation (prefill + one
    KV-cache step), SAM encoder (batch 1), decoder, post-processing; nothing cached, one text at a time."""
    vol, eight_bit = prepare_volume(volume)
    geometry = slice_geometry(volume_affine_ras(vol), vol.shape[1:], "axial")
    label = torch.zeros((1, *geometry.spatial_shape), dtype=torch.uint8)
    ids = tokenizer.encode_prompt(build_prompt(text, "vicuna_v1"))
    seg = torch.tensor([[tokenizer.seg_id]], device=model.device)
    for index in slices:
        grey = geometry.take(eight_bit, index)[0].numpy()
        rgb = np.repeat(grey[:, :, None], 3, axis=2)
        clip = model.clip_features(clip_pixels(rgb)[None].to(model.device, model.dtype))
        embeds, mask = model.build_inputs_embeds([ids], clip)
        out = model.llm_forward(embeds, mask, use_cache=True, last_logits_only=True)
        seg_hidden = out.hidden_states[:, -1]
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
        model.llm_forward(  # the forced EOS step the release generate() still runs
            model.model.embed_tokens(seg), mask, past_key_values=out.past_key_values, use_cache=True
        )
        pixels, resize = sam_pixels(rgb)
        image_embedding = model.model.visual_model.encode_image(pixels[None].to(model.device, model.dtype))
        low_res, _ = model.model.visual_model.decode(
            image_embedding, text_embeds=model.seg_embeddings(seg_hidden)
        )
        logits = postprocess_mask_logits(low_res.float(), resize, grey.shape)
        geometry.put(label, binarize(logits)[0].to(torch.uint8).cpu(), index)
    return label


# ------------------------------------------------------------------------------------------ measurements
def timed(fn, repeats: int = 1) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def lits_volume(num_slices: int) -> MetaTensor:
    case = load_lits_case()
    image = torch.from_numpy(case.image[:, :, :num_slices].copy())[None]
    return MetaTensor(image, affine=torch.as_tensor(case.affine))


def bench_volume(pipe: BenchPipeline, batch_size: int, counts: list[int], baseline_slices: int) -> dict:
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
                    sub, TEXT, batch_size=batch_size, force_seg=True, progress=False
                )
            )
        per_count[str(n)] = round(seconds, 3)
        if n == max(counts):
            peak_pipeline, paths, pipeline_label = mem.increase_mb, result.paths, result.label
        print(f"pipeline {n} slices: {seconds:.2f} s  paths={result.paths}", flush=True)
    slices = list(range(baseline_slices))
    with PeakRSS() as mem:
        base_seconds, base_label = timed(lambda: original_way(model, tokenizer, volume, TEXT, slices))
    base_full = base_seconds * max(counts) / baseline_slices
    agree = float(
        (base_label[..., :baseline_slices] == pipeline_label.as_tensor()[..., :baseline_slices])
        .float()
        .mean()
    )
    print(
        f"original way {baseline_slices} slices: {base_seconds:.2f} s (-> {base_full:.2f} s for {max(counts)})"
    )
    # two texts: the pipeline encodes each slice once, the original's way once per text
    pipe.feature_cache.clear()
    two_seconds, _ = timed(
        lambda: pipe.ground_volume(
            volume, [TEXT, TEXT2], batch_size=batch_size, force_seg=True, progress=False
        )
    )
    return {
        "volume_seconds_pipeline": per_count[str(max(counts))],
        "volume_seconds_original": round(base_full, 3),
        "original_slices_timed": baseline_slices,
        "volume_speedup": round(base_full / per_count[str(max(counts))], 2),
        "two_text_speedup": round(2 * base_full / two_seconds, 2),
        "seconds_per_count": per_count,
        "linearity_128_over_32": round(per_count[str(max(counts))] / per_count[str(min(counts))], 2),
        "peak_rss_increase_mb_pipeline": round(peak_pipeline, 1),
        "peak_rss_increase_mb_original": round(mem.increase_mb, 1),
        "labels_agree_with_original": round(agree, 6),
        "paths": paths,
    }


def bench_cache(pipe: BenchPipeline, repeats: int = 5) -> dict:
    """First prompt on a slice (encoders and the image-prefix prefill run) vs a second prompt on it (cached).

    The cache is emptied before every first prompt; the volume's 8-bit normalisation is memoised for both.
    """
    volume = lits_volume(128)
    pipe.ground_volume(volume, TEXT, slices=[0], force_seg=True)  # normalise the volume once (memoised)
    first, second = [], []
    for k in range(repeats):
        index = 40 + 10 * k
        pipe.feature_cache.clear()
        first.append(
            timed(lambda index=index: pipe.ground_volume(volume, TEXT, slices=[index], force_seg=True))[0]
        )
        second.append(
            timed(lambda index=index: pipe.ground_volume(volume, TEXT2, slices=[index], force_seg=True))[0]
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


LOAD_CHILD = r"""
import json, os, resource, sys, torch
from monai_medplib.checkpoint import load_medplib, weight_files
import safetensors, sentencepiece  # imported before the baseline so only the load itself is counted
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
path = sys.argv[1]
weights = sum(f.stat().st_size for f in weight_files(path))
before = rss()
model, config, tok = load_medplib(path)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
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
    pipe = BenchPipeline(model, tokenizer)
    counts = [8, 16, 32] if args.quick else [32, 64, 128]
    baseline = min(args.baseline_slices, 8 if args.quick else args.baseline_slices)
    results = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpu, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": str(path),
        "model_is_demo": path == DEMO,
        "force_seg": True,
        "dtype": str(model.dtype),
        "batch_size": args.batch_size,
        "load_seconds": round(load_seconds, 2),
    }
    results.update(bench_volume(pipe, args.batch_size, counts, baseline))
    results.update(bench_cache(pipe))
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
