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
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from monai.data import MetaTensor  # noqa: E402

from monai_medplib.checkpoint import load_medplib  # noqa: E402
from monai_medplib.data.lits import load_lits_case  # noqa: E402
from monai_medplib.inference import MedPLIBPipeline  # noqa: E402
from monai_medplib.processing import binarize, clip_pixels, postprocess_mask_logits, sam_pixels  # noqa: E402
from monai_medplib.tokenization import build_prompt  # noqa: E402
from monai_medplib.transforms.slicing import slice_geometry, volume_affine_ras  # noqa: E402
from monai_medplib.volume import prepare_volume  # noqa: E402

DEMO = REPO / "monai_medplib" / "demo_model"
TINY = Path("/work/shared/fixtures/upstream_tiny_public/model")
TEXT = "Please segment the liver."
TEXT2 = "Please segment the tumour in the liver."
TEXTS = [TEXT, TEXT2, "Please segment the liver tumour.", "Can you segment the liver in this image?"]

BenchPipeline = MedPLIBPipeline  # gpu_7b.py imports it under this name


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
def original_way(
    model,
    tokenizer,
    volume: MetaTensor,
    text: str,
    slices: list[int],
    all_logits: bool = True,
    force_seg: bool = True,
    max_new_tokens: int = 1024,
) -> torch.Tensor:
    """Release ``evaluate`` per slice: preprocess the slice as an RGB image, CLIP (batch 1), greedy generation with
    a KV cache until EOS (``all_logits``: ``lm_head`` over every prefill row, as transformers 4.31 does; with
    ``force_seg`` the answer is forced to ``<SEG></s>``: prefill + one step), the release [SEG] rule, SAM encoder
    (batch 1), decoder, post-processing; nothing cached, one text at a time."""
    vol, eight_bit = prepare_volume(volume)
    geometry = slice_geometry(volume_affine_ras(vol), vol.shape[1:], "axial")
    label = torch.zeros((1, *geometry.spatial_shape), dtype=torch.uint8)
    ids = tokenizer.encode_prompt(build_prompt(text, "vicuna_v1"))
    seg_id, eos_id = tokenizer.seg_id, tokenizer.eos_id
    for index in slices:
        grey = geometry.take(eight_bit, index)[0].numpy()
        rgb = np.repeat(grey[:, :, None], 3, axis=2)  # the release reads every image as 3-channel RGB
        clip = model.clip_features(clip_pixels(rgb)[None].to(model.device, model.dtype))
        embeds, mask = model.build_inputs_embeds([ids], clip)
        out = model.llm_forward(embeds, mask, use_cache=True, last_logits_only=not all_logits)
        states, new_ids = [out.hidden_states[0]], []
        for step in range(max_new_tokens):
            token = (seg_id, eos_id)[step] if force_seg else int(out.logits[0, -1].argmax())
            new_ids.append(token)
            if token == eos_id or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            fed = model.model.embed_tokens(torch.tensor([[token]], device=model.device))
            out = model.llm_forward(fed, mask, past_key_values=out.past_key_values, use_cache=True)
            states.append(out.hidden_states[0])
        if seg_id not in new_ids:
            continue  # no <SEG>, no mask (the release still runs the SAM encoder; skipping it favours this side)
        j = (
            len(new_ids) - 2 if new_ids.count(seg_id) == 1 else new_ids.index(seg_id)
        )  # release evaluate() rule
        seg_hidden = torch.cat(states)[embeds.shape[1] - 1 + j][None]  # the state that predicted token j
        pixels, resize = sam_pixels(rgb)
        image_embedding = model.model.visual_model.encode_image(pixels[None].to(model.device, model.dtype))
        low_res, _ = model.model.visual_model.decode(
            image_embedding, text_embeds=model.seg_embeddings(seg_hidden)
        )
        logits = postprocess_mask_logits(low_res.float(), resize, grey.shape)
        geometry.put(label, binarize(logits)[0].to(torch.uint8).cpu(), index)
    return label


def network_floor(model, tokenizer, volume: MetaTensor, text: str, slices: list[int]) -> dict[str, float]:
    """Milliseconds per slice of the four networks any exact grounding of a slice runs, at batch 1: CLIP, the
    LLM prefill (``lm_head`` on the last row only), the SAM encoder and the SAM decoder. Preprocessing,
    decoding steps, caches and overheads are left out, so no exact pipeline can be faster than their sum."""
    vol, eight_bit = prepare_volume(volume)
    geometry = slice_geometry(volume_affine_ras(vol), vol.shape[1:], "axial")
    ids = tokenizer.encode_prompt(build_prompt(text, "vicuna_v1"))
    totals = dict.fromkeys(("clip", "prefill", "sam_encoder", "sam_decoder"), 0.0)
    for index in slices:
        rgb = np.repeat(geometry.take(eight_bit, index)[0].numpy()[:, :, None], 3, axis=2)
        clip_in = clip_pixels(rgb)[None].to(model.device, model.dtype)
        sam_in = sam_pixels(rgb)[0][None].to(model.device, model.dtype)
        marks = [time.perf_counter()]
        clip = model.clip_features(clip_in)
        marks.append(time.perf_counter())
        embeds, mask = model.build_inputs_embeds([ids], clip)
        hidden = model.llm_forward(embeds, mask, last_logits_only=True).hidden_states[:, -1]
        marks.append(time.perf_counter())
        image_embedding = model.model.visual_model.encode_image(sam_in)
        marks.append(time.perf_counter())
        model.model.visual_model.decode(image_embedding, text_embeds=model.seg_embeddings(hidden))
        marks.append(time.perf_counter())
        for name, start, end in zip(totals, marks, marks[1:]):
            totals[name] += end - start
    return {name: 1000 * seconds / len(slices) for name, seconds in totals.items()}


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


def bench_volume(
    pipe: BenchPipeline, batch_size: int, counts: list[int], baseline_slices: int, grounding: dict
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


def bench_cache(pipe: BenchPipeline, grounding: dict, repeats: int = 5) -> dict:
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


def bench_large_volume_prompt(pipe: BenchPipeline, grounding: dict, repeats: int = 3) -> dict:
    """Interactive prompts on one slice of a clinical-size 512 x 512 x 300 CT: what a click in Slicer costs once
    the volume is normalised (first prompt on a slice vs a second one on it)."""
    from gpu_7b import synthetic_ct

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
    pipe = BenchPipeline(model, tokenizer)
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
