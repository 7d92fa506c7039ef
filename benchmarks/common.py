"""What the benchmark scripts share: the texts, where the models are, memory and time probes, the volumes, the
original's way of grounding, the network floor and the random full-size release model.

No benchmark script imports another one; each imports this module (``python benchmarks/<script>.py`` puts
``benchmarks/`` on ``sys.path``). The tiny public fixture (whose tokenizer the full-size runs use) is found in the
repository's ``tests/fixtures``; ``MEDPLIB_FIXTURES`` names another folder holding ``upstream_tiny_public``.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from torch import nn

from monai_medplib.checkpoint import build_empty_model
from monai_medplib.config import MedPLIBConfig
from monai_medplib.data.lits import load_lits_case
from monai_medplib.modeling.moe import TopOneGate
from monai_medplib.pipeline.volume import prepare_volume
from monai_medplib.processing import binarize, clip_pixels, postprocess_mask_logits, sam_pixels
from monai_medplib.tokenization import build_prompt
from monai_medplib.transforms.slicing import slice_geometry, volume_affine_ras

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "monai_medplib" / "demo_model"
FIXTURES = Path(os.environ.get("MEDPLIB_FIXTURES", REPO / "tests" / "fixtures"))
TINY = FIXTURES / "upstream_tiny_public" / "model"
TEXT = "Please segment the liver."
TEXT2 = "Please segment the tumour in the liver."
TEXTS = [TEXT, TEXT2, "Please segment the liver tumour.", "Can you segment the liver in this image?"]


# ------------------------------------------------------------------------------------------ memory and time
def rss_bytes() -> int:
    """Resident set size of this process."""
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


def timed(fn, repeats: int = 1) -> tuple[float, object]:
    """Median wall-clock seconds of ``repeats`` calls of ``fn``, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def cuda_timed(fn) -> tuple[float, object]:
    """Seconds ``fn`` takes on the GPU (synchronised before and after), and its result."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, result


# ------------------------------------------------------------------------------------------ volumes
def lits_volume(num_slices: int) -> MetaTensor:
    """The first ``num_slices`` axial slices of LiTS case 117 (the ``liver-ct-segmentation-package`` CT)."""
    case = load_lits_case()
    image = torch.from_numpy(case.image[:, :, :num_slices].copy())[None]
    return MetaTensor(image, affine=torch.as_tensor(case.affine))


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


# ------------------------------------------------------------------------------------------ models
def build_random_release_model(
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    share_llm_layers: bool = False,
    config: MedPLIBConfig | None = None,
) -> nn.Module:
    """The release architecture (or ``config``) with random weights created tensor by tensor on ``device`` (never
    on the CPU unless it is the device).

    ``device="meta"`` allocates nothing. MoE routers stay fp32 (as DeepSpeed keeps them); norm weights are ones,
    biases zeros. ``share_llm_layers``: LLM decoder layers 1-31 reuse layer 0's parameter tensors (each keeps
    its own module, index and KV-cache slot): the same computation with 1/32 of the LLM weights in memory.
    """
    model = build_empty_model(config or MedPLIBConfig.release_7b_2e())
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


# ------------------------------------------------------------------------------------------ keyframes
def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean arrays (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def zero_prompt_label(pipe, volume: MetaTensor, axis: str) -> np.ndarray:
    """The control of keyframe grounding: every slice decoded by SAM with a zero prompt embedding (no LLM at
    all), thresholded as the release does; bool ``(X, Y, Z)``."""
    vol, eight_bit = prepare_volume(volume)
    geometry = slice_geometry(volume_affine_ras(vol), vol.shape[1:], axis)
    label = torch.zeros((1, *geometry.spatial_shape), dtype=torch.uint8)
    width = pipe.model.config.out_dim
    for index in range(geometry.num_slices):
        grey = np.ascontiguousarray(geometry.take(eight_bit, index)[0].numpy())
        feats = pipe.encode_images([grey], with_clip=False)
        low_res, _ = pipe.decode_text_prompts(feats, torch.zeros(1, width))
        logits = pipe.postprocess_batch(low_res, feats)[0]
        geometry.put(label, binarize(logits)[None].to(torch.uint8).cpu(), index)
    return label[0].numpy() > 0


def per_slice_dice(a: np.ndarray, b: np.ndarray, slice_dim: int) -> list[float]:
    """Dice of each slice along ``slice_dim`` where either mask has a voxel."""
    out = []
    for index in range(a.shape[slice_dim]):
        sa, sb = np.take(a, index, slice_dim), np.take(b, index, slice_dim)
        if sa.any() or sb.any():
            out.append(dice(sa, sb))
    return out


def keyframe_row(exact: np.ndarray, other: np.ndarray, reference: np.ndarray, slice_dim: int) -> dict:
    """How a keyframe (or control) label compares with the exact one and with the reference label."""
    slices = per_slice_dice(exact, other, slice_dim)
    empty_exact = ~exact.any(axis=tuple(d for d in range(3) if d != slice_dim))
    false_positive = int(np.take(other, np.flatnonzero(empty_exact), slice_dim).sum())
    return {
        "dice_vs_exact": round(dice(exact, other), 4),
        "dice_vs_reference": round(dice(other, reference), 4),
        "slice_dice_min": round(min(slices), 4) if slices else 1.0,
        "slice_dice_p5": round(float(np.percentile(slices, 5)), 4) if slices else 1.0,
        "fp_voxels_where_exact_empty": false_positive,
    }
