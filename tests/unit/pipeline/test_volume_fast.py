"""Fast-path helpers: grey preprocessing parity, seg_states batching, the release-size benchmark models and
cache sizing on the meta device."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from monai_medplib.checkpoint import load_medplib
from monai_medplib.pipeline import MedPLIBPipeline
from monai_medplib.pipeline.features import ImageFeatures, image_prefix_length
from monai_medplib.pipeline.grounding import seg_states
from monai_medplib.pipeline.options import GroundingOptions
from monai_medplib.pipeline.results import PathCounts
from monai_medplib.pipeline.runner import CACHED_IMAGES
from monai_medplib.processing import (
    clip_pixels,
    clip_pixels_batch,
    load_pixels,
    sam_pixels,
    sam_pixels_batch,
)
from monai_medplib.tokenization import MedPLIBTokenizer
from tests.support.paths import REPO

FORCED = GroundingOptions(force_seg=True)


@pytest.mark.parametrize("shape", [(97, 131), (128, 128), (300, 420), (512, 77)])
def test_grey_batch_preprocessing_bit_identical_to_rgb(shape):
    """Grey images go through one PIL band and per-level tables; the result must equal the RGB copy's, which
    tests/unit/test_processing.py checks against the release tensors."""
    rng = np.random.default_rng(sum(shape))
    greys = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(2)]
    colour = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    clip = clip_pixels_batch([*greys, colour])
    sam, resizes = sam_pixels_batch([*greys, colour])
    for n, image in enumerate([*greys, colour]):
        rgb = image if image.ndim == 3 else np.repeat(image[:, :, None], 3, axis=2)
        expected_sam, expected_resize = sam_pixels(rgb)
        assert torch.equal(clip[n], clip_pixels(rgb))
        assert torch.equal(sam[n], expected_sam) and resizes[n] == expected_resize
    # a grey image stored as RGB is recognised as grey (same pixels, same cache key)
    rgb = np.repeat(greys[0][:, :, None], 3, axis=2)
    assert np.array_equal(load_pixels(rgb), greys[0]) and load_pixels(colour).shape == (*shape, 3)


def test_seg_states_batch_of_different_lengths_equals_one_at_a_time(public_fixture):
    model, _, tok = load_medplib(public_fixture / "model")
    pipe = MedPLIBPipeline(model, tok)
    questions = ["Segment the liver.", "Please segment the left kidney in this abdominal CT scan, thank you."]
    ids = [pipe.prompt_ids(q) for q in questions]
    assert len(ids[0]) != len(ids[1])
    clip = torch.randn(2, 576, model.config.mm_hidden_size, generator=torch.Generator().manual_seed(0))
    feats = [ImageFeatures(clip[b], (8, 8), (256, 256)) for b in range(2)]  # no key: no prefix reuse
    counts = PathCounts()
    batched = seg_states(pipe, feats, ids, FORCED, counts=counts)
    for b in range(2):
        alone = seg_states(pipe, feats[b : b + 1], [ids[b]], FORCED)[0]
        torch.testing.assert_close(batched[b].hidden, alone.hidden, atol=1e-4, rtol=0)
        assert batched[b].new_ids == alone.new_ids == [tok.seg_id, tok.eos_id]
    assert counts.forced == 2 and counts.generate == 0 and counts.prefix_computed == 0
    # continuing from per-image prefix states (right-padded suffixes) gives the same states
    keyed = [ImageFeatures(clip[b], (8, 8), (256, 256), key=f"image-{b}") for b in range(2)]
    for _ in range(2):  # computed, then reused
        reused = seg_states(pipe, keyed, ids, FORCED, counts=counts)
        for b in range(2):
            torch.testing.assert_close(reused[b].hidden, batched[b].hidden, atol=1e-4, rtol=0)
    assert counts.prefix_computed == 2 and counts.prefix_cached == 2
    # one call, nothing cached: image 0 asked twice, image 1 once with the longer prompt (left-padded whole
    # prefill of the first prompts; image 0's second question continues from the prefix just taken from it)
    pipe.feature_cache.clear()
    mixed = seg_states(pipe, [keyed[0], keyed[0], keyed[1]], [ids[0], ids[1], ids[1]], FORCED)
    expected = [batched[0].hidden, seg_states(pipe, feats[:1], [ids[1]], FORCED)[0].hidden]
    for got, want in zip([s.hidden for s in mixed], [expected[0], expected[1], batched[1].hidden]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert len(pipe.feature_cache) == 2  # the two prefix states
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        seg_states(pipe, feats, ids[:1])


def test_gpu_benchmark_builds_release_architecture_on_meta():
    spec = importlib.util.spec_from_file_location("bench_common", REPO / "benchmarks" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.build_random_release_model("meta")
    params = list(model.parameters())
    assert all(p.device.type == "meta" for p in params)
    assert abs(sum(p.numel() for p in params) - 11.69e9) < 0.01e9  # spec 2.9
    routers = [p for n, p in model.named_parameters() if n.endswith("gate.wg.weight")]
    assert len(routers) == 32 and all(p.dtype == torch.float32 for p in routers)
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.lm_head.weight.shape == (32267, 4096)
    # release_cpu.py: the 32 LLM layers share layer 0's tensors, every layer still has its own module
    shared = module.build_random_release_model("meta", share_llm_layers=True)
    computed = sum(p.numel() for _, p in shared.named_parameters(remove_duplicate=False))
    stored = sum(p.numel() for p in shared.parameters())
    assert computed == sum(p.numel() for p in params) and stored < computed / 9
    layers = shared.model.layers
    assert layers[31].self_attn.q_proj.weight is layers[0].self_attn.q_proj.weight
    assert layers[31].self_attn.layer_idx == 31 and layers[31] is not layers[0]


def test_default_cache_holds_the_release_models_prompt_prefix(public_fixture):
    # release size on the meta device: the prompt-prefix K/V of one image is ~0.65 GB in fp32, beyond the old
    # fixed 512 MiB, so a second question would have re-run the 600-row prefill of the 7B model
    spec = importlib.util.spec_from_file_location("bench_common", REPO / "benchmarks" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tokenizer = MedPLIBTokenizer.from_pretrained(public_fixture / "model")
    for dtype, bytes_per_value in ((torch.float32, 4), (torch.bfloat16, 2)):
        model = module.build_random_release_model("meta", dtype=dtype)
        pipe = MedPLIBPipeline(model, tokenizer)
        rows = image_prefix_length(pipe.prompt_ids("?")) - 1 + 576
        per_image = bytes_per_value * (576 * 1024 + 256 * 16 * 16 + 2 * 32 * rows * 4096)
        assert pipe.feature_cache.max_bytes == CACHED_IMAGES * per_image
        assert dtype != torch.float32 or per_image > 512 * 2**20
    assert MedPLIBPipeline(model, tokenizer, cache_bytes=0).feature_cache.max_bytes == 0
