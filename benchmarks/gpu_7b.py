"""Full-size ``MedPLIB-7b-2e`` architecture with random bf16 weights on a GPU: volume grounding speed and memory.

``python benchmarks/gpu_7b.py`` (CUDA needed; ~24 GB of GPU memory for the weights) measures:

* ms per slice, the original's way (batch 1, forced ``<SEG></s>``: prefill + one decode step, no cache);
* ms per slice of the pipeline at batch 1 and batched (``--batch-size``), on a synthetic 300-slice CT;
* one interactive prompt: a second text on a slice whose features are cached;
* peak GPU memory (``torch.cuda.max_memory_allocated``).

Random weights never emit ``<SEG>``: both sides force it (see ``benchmarks/run.py``). The prompts use the tiny
public fixture's tokenizer (its ids are valid in the 32k release vocabulary; prompts come out somewhat longer
than with the LLaMA tokenizer). ``python benchmarks/gpu_7b.py --meta`` only builds the model on the meta device
and prints its size (what the CPU tests check).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from monai_medplib.checkpoint import build_empty_model  # noqa: E402
from monai_medplib.config import MedPLIBConfig  # noqa: E402
from monai_medplib.modeling.moe import TopOneGate  # noqa: E402

TINY = Path("/work/shared/fixtures/upstream_tiny_public/model")
TEXT, TEXT2 = "Please segment the liver.", "Please segment the tumour in the liver."


def build_random_release_model(
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    share_llm_layers: bool = False,
) -> nn.Module:
    """The release architecture with random weights created tensor by tensor on ``device`` (never on the CPU
    unless it is the device).

    ``device="meta"`` allocates nothing. MoE routers stay fp32 (as DeepSpeed keeps them); norm weights are ones,
    biases zeros. ``share_llm_layers``: LLM decoder layers 1-31 reuse layer 0's parameter tensors (each keeps
    its own module, index and KV-cache slot): the same computation with 1/32 of the LLM weights in memory.
    """
    model = build_empty_model(MedPLIBConfig.release_7b_2e())
    generator = None if str(device) == "meta" else torch.Generator(device=device).manual_seed(seed)
    routers = {id(gate.wg) for gate in model.modules() if isinstance(gate, TopOneGate)}
    layers = model.model.layers
    aliases = layers[1:] if share_llm_layers else []
    aliased = {id(m) for layer in aliases for m in layer.modules()}
    for module in model.modules():
        if id(module) in aliased:
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            wanted = torch.float32 if id(module) in routers else dtype
            data = torch.empty(param.shape, dtype=wanted, device=device)
            if generator is not None:
                if name == "bias":
                    data.zero_()
                elif "norm" in type(module).__name__.lower():
                    data.fill_(1.0)
                else:
                    data.normal_(0.0, 0.02, generator=generator)
            module._parameters[name] = nn.Parameter(data, requires_grad=False)
    for layer in aliases:
        for source, target in zip(layers[0].modules(), layer.modules(), strict=True):
            for name in list(target._parameters):
                target._parameters[name] = source._parameters[name]
    if str(device) != "meta":
        model.to(device)  # the buffers (RoPE, CLIP positions, SAM statistics)
    return model.eval()


def synthetic_ct(num_slices: int, size: int = 512):
    """A CT-like (1, size, size, num_slices) volume in HU: a body ellipse with organs, RAS 0.8 x 0.8 x 1.5 mm."""
    from monai.data import MetaTensor

    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    body = ((x / 0.8) ** 2 + (y / 0.6) ** 2 < 1).float() * 1040 - 1000
    organ = ((x + 0.3) ** 2 + (y + 0.1) ** 2 < 0.08).float() * 60
    plane = body + organ
    z = torch.linspace(0.8, 1.2, num_slices)
    volume = plane[:, :, None] * z[None, None, :]
    affine = torch.diag(torch.tensor([0.8, 0.8, 1.5, 1.0], dtype=torch.float64))
    return MetaTensor(volume[None].float(), affine=affine)


def _cuda_time(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, result


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
    from run import BenchPipeline, original_way

    from monai_medplib.tokenization import MedPLIBTokenizer

    torch.set_grad_enabled(False)
    seconds, model = _cuda_time(lambda: build_random_release_model("cuda"))
    pipe = BenchPipeline(model, MedPLIBTokenizer.from_pretrained(TINY))
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
    base_s, _ = _cuda_time(
        lambda: original_way(model, pipe.tokenizer, volume, TEXT, list(range(args.baseline_slices)))
    )
    results["ms_per_slice_original"] = round(1000 * base_s / args.baseline_slices, 1)
    for batch in (1, args.batch_size):
        pipe.feature_cache.clear()
        torch.cuda.reset_peak_memory_stats()
        n = args.baseline_slices if batch == 1 else args.slices
        s, _ = _cuda_time(
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
            _cuda_time(lambda index=index: pipe.ground_volume(volume, TEXT, slices=[index], force_seg=True))[
                0
            ]
        )
        second.append(
            _cuda_time(lambda index=index: pipe.ground_volume(volume, TEXT2, slices=[index], force_seg=True))[
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
