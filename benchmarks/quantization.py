"""int8 / int4 weight-only quantisation of the full-size ``MedPLIB-7b-2e`` on a CPU: weight bytes, the streaming
loader's peak memory, LLM speed, and the smallest GPU each mode needs (``python benchmarks/quantization.py``,
7 GB RAM; ``--quick`` for a smoke run). On 2 busy cores the bytes take ~7 minutes, the loader ~5, the speed ~1 hour
at 32 layers (``--speed-layers 8``: a quarter; the ratios are per layer) and the fidelity ~3 minutes per mode at
``--every 16`` with ``--threads 1`` (``--fidelity-models`` / ``--fidelity-modes`` / ``--wordings`` choose less).

1. **Bytes**: the release architecture at full size with random bf16 weights, its 32 LLM layers sharing one set
   of tensors (see ``release_cpu.py``), quantised with :func:`~monai_medplib.modeling.quantization.quantize_model`
   (a shared weight once). Bytes are counted per module, as if every layer had its own weights, so they are the
   full model's; the LLM part (embeddings, 32 layers, norm, lm_head) is what quantisation changes.
2. **Loader**: a synthetic bf16 safetensors checkpoint of the release architecture with ``--disk-layers``
   full-size LLM layers (CLIP, SAM-Med2D, embeddings and lm_head at full size), loaded by ``load_medplib`` in a
   fresh process per mode: peak and final RSS above the level before loading, against the bytes loaded.
3. **Speed** (the LLM; CLIP and SAM-Med2D are not quantised and run as before): one prefill of a grounding prompt
   (the tiny fixture's tokenizer, ``<image>`` = 576 rows), the interactive second prompt (a question's ~20 tokens
   on the cached prompt prefix: memory-bound) and one decoding step, per mode in one process with interleaved
   repeats (median), as ratios to float32. ``int8+kernel`` is int8 with the opt-in decode kernel.
4. **GPU**: the smallest GPU each mode needs, from the measured bytes (CLIP / SAM in bf16 on a GPU) plus the KV
   cache of one prompt and a fixed allowance for the CUDA context and activations.
5. **Fidelity** against float32 (the figures the int8 test gates; int4 and a bf16 model for comparison): the demo
   model on every ``--every``-th held-out slice, the tiny public fixture with ``<SEG>`` forced.

Nothing here is asserted; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch
from common import TEXT, TINY, build_random_release_model, rss_bytes, timed
from transformers.cache_utils import DynamicCache

from monai_medplib.checkpoint import load_medplib, save_medplib
from monai_medplib.config import MedPLIBConfig
from monai_medplib.modeling import placement
from monai_medplib.modeling import quantization as quant
from monai_medplib.pipeline.features import image_cache_bytes, image_prefix_length
from monai_medplib.pipeline.runner import CACHED_IMAGES
from monai_medplib.tokenization import MedPLIBTokenizer, build_prompt

MODES = ("fp32", "bf16", "int8", "int4")
GPU_SIZES_GB = (8, 10, 12, 16, 20, 24, 32, 40, 48, 80)
GPU_ALLOWANCE_GB = 2.0  # CUDA context (~0.5 GB), prefill activations of CLIP / SAM / LLM, allocator slack


def gb(n: float) -> float:
    return round(n / 1e9, 2)


# ---------------------------------------------------------------------------------------------- 1. bytes
def part_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of the LLM and of the rest, every module's parameters counted (shared layers as separate)."""
    out = {"llm": 0, "rest": 0}
    for key, param in model.named_parameters(remove_duplicate=False):
        part = "llm" if placement.is_llm_unit(placement.unit_of_key(key)) else "rest"
        out[part] += quant.tensor_bytes(param)
    return out


def measure_bytes() -> dict[str, dict[str, int]]:
    results = {}
    for mode in ("bf16", "int8", "int4"):
        model = build_random_release_model("cpu", torch.bfloat16, share_llm_layers=True)
        if mode != "bf16":
            summary = quant.quantize_model(model, mode)
            print(f"  {summary.describe()} (distinct weights)", flush=True)
        results[mode] = part_bytes(model)
        if mode == "bf16":  # the same weights in float32: twice the bytes of all but the fp32 routers
            fp32 = {"llm": 0, "rest": 0}
            for key, param in model.named_parameters(remove_duplicate=False):
                part = "llm" if placement.is_llm_unit(placement.unit_of_key(key)) else "rest"
                fp32[part] += param.numel() * 4
            results["fp32"] = fp32
        print(f"  {mode}: LLM {gb(results[mode]['llm'])} GB, rest {gb(results[mode]['rest'])} GB", flush=True)
        del model
    return {m: results[m] for m in MODES}


# ---------------------------------------------------------------------------------------------- 2. loader
def write_checkpoint(folder: Path, layers: int) -> None:
    config = release_config(layers)
    model = build_random_release_model("cpu", torch.bfloat16, config=config)
    save_medplib(model, config, None, folder, max_shard_size="2GB")


def load_child(mode: str, folder: str) -> None:
    """One load in this (fresh) process; prints JSON."""
    torch.set_grad_enabled(False)
    quantization = mode if mode in quant.QUANTIZATION_MODES else None
    if quantization:
        quant.load_torchao()  # imported before the baseline: the import is not the loader's memory
    # the high-water mark starts at the parent's RSS (fork keeps it): reset it to the current RSS
    Path("/proc/self/clear_refs").write_text("5")
    base = rss_bytes()
    seconds, (model, _, _) = timed(
        lambda: load_medplib(
            folder,
            dtype="float32" if mode == "fp32" else "bfloat16",
            quantization=quantization,
            load_tokenizer=False,
        )
    )
    status = Path("/proc/self/status").read_text()
    peak = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024
    weights = part_bytes(model)
    print(
        json.dumps(
            {
                "mode": mode,
                "seconds": round(seconds, 1),
                "weights": weights,
                "peak_increase": peak - base,
                "final_increase": rss_bytes() - base,
            }
        )
    )


def measure_loader(layers: int) -> dict[str, dict]:
    results = {}
    with tempfile.TemporaryDirectory(prefix="medplib-quant-") as tmp:
        write_checkpoint(Path(tmp), layers)
        size = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
        print(f"  synthetic checkpoint: {layers} full-size layers, {gb(size)} GB bf16 on disk", flush=True)
        for mode in MODES:
            run = subprocess.run(
                [sys.executable, __file__, "--load-child", mode, tmp],
                capture_output=True,
                text=True,
                check=True,
            )
            row = json.loads(run.stdout.strip().splitlines()[-1])
            total = sum(row["weights"].values())
            row["peak_over_weights"] = round(row["peak_increase"] / total, 3)
            row["final_over_weights"] = round(row["final_increase"] / total, 3)
            results[mode] = row
            print(
                f"  load {mode}: weights {gb(total)} GB (LLM {gb(row['weights']['llm'])}), peak RSS +"
                f"{gb(row['peak_increase'])} GB = {row['peak_over_weights']}x, after +{gb(row['final_increase'])} "
                f"GB, {row['seconds']} s",
                flush=True,
            )
    return results


# ---------------------------------------------------------------------------------------------- 3. speed
def release_config(layers: int | None = None) -> MedPLIBConfig:
    """The release configuration, with only ``layers`` LLM layers (all MoE, as released) when given."""
    config = MedPLIBConfig.release_7b_2e()
    if layers is None:
        return config
    return dataclasses.replace(config, num_hidden_layers=layers, moe_layers_idx=list(range(layers)))


def llm_only(mode: str, layers: int | None = None) -> torch.nn.Module:
    """The full-size model of ``mode`` with shared LLM layers and its vision side dropped (to the meta device);
    ``layers``: that many LLM layers instead of 32 (``--quick``)."""
    dtype = torch.float32 if mode == "fp32" else torch.bfloat16
    model = build_random_release_model("cpu", dtype, share_llm_layers=True, config=release_config(layers))
    for name in ("vision_tower", "mm_projector", "region_fea_adapter", "text_hidden_fcs", "visual_model"):
        getattr(model.model, name).to("meta")
    if mode in quant.QUANTIZATION_MODES:
        quant.quantize_model(model, mode)
    return model


def _cache(model, prefix) -> DynamicCache:
    cache = DynamicCache(config=model.model.config)
    for layer, (k, v) in enumerate(prefix):
        cache.update(k, v, layer)
    return cache


def measure_speed(repeats: int, layers: int | None = None) -> dict[str, dict[str, float]]:
    tokenizer = MedPLIBTokenizer.from_pretrained(TINY)
    ids = tokenizer.encode_prompt(build_prompt(TEXT, "vicuna_v1"))
    prompt_rows = len(ids) - 1 + 576
    question_rows = len(ids) - (ids.index(-200) + 2)
    generator = torch.Generator().manual_seed(0)
    hidden = 4096
    x_prompt = torch.randn(1, prompt_rows, hidden, generator=generator) * 0.02
    x_question = torch.randn(1, question_rows, hidden, generator=generator) * 0.02
    x_step = torch.randn(1, 1, hidden, generator=generator) * 0.02
    modes = ("fp32", "bf16", "int8", "int8+kernel", "int4")
    models = {}
    for mode in MODES:
        models[mode] = llm_only(mode, layers)
        print(f"  built {mode}", flush=True)

    def model_for(mode: str) -> torch.nn.Module:
        model = models[mode.split("+")[0]]
        if mode.startswith("int8"):  # the same int8 weights, with and without the opt-in decode kernel
            quant.use_int8_decode_kernel(model, enabled=mode == "int8+kernel")
        return model

    times: dict[str, dict[str, list[float]]] = {m: {"prefill": [], "second": [], "step": []} for m in modes}
    prefixes = {}
    for r in range(repeats):
        for mode in MODES:  # the kernel only takes inputs of <= 32 rows: int8+kernel prefills as int8
            model = model_for(mode)
            call = functools.partial(
                model.llm_forward, x_prompt.to(model.dtype), use_cache=True, last_logits_only=True
            )
            seconds, out = timed(call)
            times[mode]["prefill"].append(seconds)
            prefixes[mode] = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
            print(f"  repeat {r}: {mode} prefill {prompt_rows} rows {seconds:.1f} s", flush=True)
    times["int8+kernel"]["prefill"] = times["int8"]["prefill"]
    prefixes["int8+kernel"] = prefixes["int8"]
    for r in range(repeats * 3):
        for mode in modes:
            model = model_for(mode)
            for kind, x in (("second", x_question), ("step", x_step)):
                mask = torch.ones(1, prompt_rows + x.shape[1], dtype=torch.long)
                call = functools.partial(
                    model.llm_forward,
                    x.to(model.dtype),
                    mask,
                    past_key_values=_cache(model, prefixes[mode]),
                    use_cache=True,
                    last_logits_only=True,
                )
                seconds, _ = timed(call)
                times[mode][kind].append(seconds)
        print(
            f"  repeat {r}: second prompt / step "
            + ", ".join(f"{m} {times[m]['second'][-1]:.2f}/{times[m]['step'][-1]:.2f} s" for m in modes),
            flush=True,
        )
    medians = {m: {k: float(torch.tensor(v).median()) for k, v in t.items()} for m, t in times.items()}
    return {
        "llm_layers": layers or release_config().num_hidden_layers,
        "rows": {"prefill": prompt_rows, "second": question_rows, "step": 1},
        "seconds": {m: {k: round(v, 3) for k, v in d.items()} for m, d in medians.items()},
        "vs_fp32": {
            m: {k: round(v / medians["fp32"][k], 3) for k, v in d.items()} for m, d in medians.items()
        },
    }


# ---------------------------------------------------------------------------------------------- 5. fidelity
def measure_fidelity(
    every: int,
    wordings: int | None = None,
    modes: tuple[str, ...] = ("int8", "int4", "bf16"),
    models: tuple[str, ...] = ("demo", "tiny"),
) -> dict[str, dict]:
    """``modes`` (int8 / int4, and a plain bf16 model for scale) against float32: the demo model on every
    ``every``-th held-out slice (the first ``wordings`` held-out wordings of each question; default all), the tiny
    fixture (``<SEG>`` forced); ``models``: which of the two."""
    from monai_medplib.evaluation.acceptance import held_out_slices
    from monai_medplib.evaluation.fidelity import compare_pipelines, demo_requests, fixture_requests
    from monai_medplib.pipeline import MedPLIBPipeline

    cases = {
        "demo": ("demo", lambda: demo_requests(held_out_slices(every), wordings), False),
        "tiny": (TINY, lambda: fixture_requests(TINY.parent), True),
    }
    out: dict[str, dict] = {}
    for name in models:
        path, make_requests, force_seg = cases[name]
        requests = make_requests()
        reference = MedPLIBPipeline.from_pretrained(path, device="cpu")
        for mode in modes:
            kwargs = {"dtype": "bfloat16"} if mode == "bf16" else {"quantization": mode}
            candidate = MedPLIBPipeline.from_pretrained(path, device="cpu", **kwargs)
            figures = compare_pipelines(reference, candidate, requests, force_seg=force_seg)
            figures.pop("answer_differences")
            if candidate.model.quantization is not None:
                figures["weights"] = candidate.model.quantization.describe()
            out[f"{name} {mode}"] = figures
            print(f"  {name} {mode}: {figures}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------- 4. GPU
def gpu_table(sizes: dict[str, dict[str, int]]) -> dict[str, dict]:
    """Smallest GPU per mode: weights (CLIP / SAM-Med2D in bf16; int4 in the CUDA tile-packed format, whose
    padding of in_features to 1024 the CPU bytes lack) + the KV cache of one grounding prompt + the allowance;
    ``with_cache``: also the pipeline's default feature cache (4 images' features and prompt-prefix states)."""
    config = MedPLIBConfig.release_7b_2e()
    ids = MedPLIBTokenizer.from_pretrained(TINY).encode_prompt(build_prompt(TEXT, "vicuna_v1"))
    rows = len(ids) - 1 + config.num_image_tokens
    kv = 2 * config.num_hidden_layers * rows * config.num_key_value_heads * config.head_dim * 2  # bf16
    cache = CACHED_IMAGES * image_cache_bytes(config, torch.bfloat16, image_prefix_length(ids))
    shapes = {k: tuple(v.shape) for k, v in build_random_release_model("meta").state_dict().items()}
    cuda_extra = sum(
        quant.planned_bytes(s, "int4", "cuda") - quant.planned_bytes(s, "int4", "cpu")
        for k, s in shapes.items()
        if quant.is_quantized_key(k) and quant.mode_for_key(k, "int4") == "int4"
    )
    table = {}
    for mode in ("bf16", "int8", "int4"):
        weights = sizes[mode]["llm"] + sizes["bf16"]["rest"] + (cuda_extra if mode == "int4" else 0)
        need = weights + kv + GPU_ALLOWANCE_GB * 1e9
        table[mode] = {
            "weights_gb": gb(weights),
            "kv_cache_gb": gb(kv),
            "needed_gb": gb(need),
            "smallest_gpu_gb": _smallest(need),
            "with_cache_gb": gb(need + cache),
            "smallest_gpu_with_cache_gb": _smallest(need + cache),
        }
    return table


def _smallest(needed: float) -> int | None:
    # a "16 GB" card holds ~95 % of that for tensors
    return next((s for s in GPU_SIZES_GB if s * 2**30 * 0.95 >= needed), None)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument(
        "--disk-layers", type=int, default=2, help="full-size LLM layers of the synthetic checkpoint"
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="prefill repeats (the short calls get 3x as many)"
    )
    parser.add_argument("--skip", nargs="*", default=(), choices=("bytes", "loader", "speed", "fidelity"))
    parser.add_argument(
        "--every", type=int, default=16, help="fidelity: every n-th held-out slice of the demo"
    )
    parser.add_argument(
        "--speed-layers",
        type=int,
        default=None,
        help="speed: this many full-size LLM layers instead of 32 (the ratios are per layer; default 32)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 disk layer, 1 repeat, a 2-layer LLM for speed, one wording per held-out question",
    )
    parser.add_argument(
        "--wordings", type=int, default=None, help="fidelity: the first n held-out wordings (default all)"
    )
    parser.add_argument(
        "--fidelity-modes", nargs="+", default=("int8", "int4", "bf16"), choices=("int8", "int4", "bf16")
    )
    parser.add_argument("--fidelity-models", nargs="+", default=("demo", "tiny"), choices=("demo", "tiny"))
    parser.add_argument("--load-child", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    speed_layers = args.speed_layers
    if args.quick:
        args.disk_layers, args.repeats, args.every, args.wordings, speed_layers = 1, 1, 64, 1, 2
    if args.load_child:
        load_child(*args.load_child)
        return
    torch.set_grad_enabled(False)
    results = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpu, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
    }
    if "bytes" not in args.skip:
        print("1. weight bytes, full-size 7b-2e", flush=True)
        sizes = measure_bytes()
        results["bytes"] = sizes
        results["llm_vs_bf16"] = {m: round(sizes[m]["llm"] / sizes["bf16"]["llm"], 3) for m in MODES}
        whole = {m: sum(sizes[m].values()) for m in MODES}
        results["model_vs_bf16"] = {m: round(whole[m] / whole["bf16"], 3) for m in MODES}
        results["gpu"] = gpu_table(sizes)
        print(f"  LLM vs bf16: {results['llm_vs_bf16']}", flush=True)
        print(f"  whole model vs bf16: {results['model_vs_bf16']}", flush=True)
        print(f"  GPU: {results['gpu']}", flush=True)
    if "loader" not in args.skip:
        print("2. streaming loader", flush=True)
        results["loader"] = measure_loader(args.disk_layers)
    if "speed" not in args.skip:
        print("3. LLM speed", flush=True)
        results["speed"] = measure_speed(args.repeats, speed_layers)
        print(f"  vs fp32: {results['speed']['vs_fp32']}", flush=True)
    if "fidelity" not in args.skip:
        print("5. fidelity against float32", flush=True)
        results["fidelity"] = measure_fidelity(
            args.every, args.wordings, tuple(args.fidelity_modes), tuple(args.fidelity_models)
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
