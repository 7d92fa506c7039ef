"""Fast-path helpers: grey preprocessing parity, seg_states batching, the GPU benchmark's meta construction."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from monai_medplib.checkpoint import load_medplib
from monai_medplib.fast_grounding import PathCounts, grey_pixels, seg_states
from monai_medplib.feature_cache import FeatureCache
from monai_medplib.processing import clip_pixels, sam_pixels
from monai_medplib.tokenization import build_prompt

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("shape", [(97, 131), (128, 128), (300, 420), (512, 77)])
def test_grey_pixels_bit_identical_to_processing(shape):
    rng = np.random.default_rng(sum(shape))
    greys = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(2)]
    clip, sam, resize = grey_pixels(greys)
    for n, grey in enumerate(greys):
        rgb = np.repeat(grey[:, :, None], 3, axis=2)
        expected_sam, expected_resize = sam_pixels(rgb)
        assert torch.equal(clip[n], clip_pixels(rgb))
        assert torch.equal(sam[n], expected_sam) and resize == expected_resize


def test_grey_pixels_rejects_mixed_sizes():
    with pytest.raises(ValueError, match="same-size"):
        grey_pixels([np.zeros((4, 4), np.uint8), np.zeros((4, 5), np.uint8)])


def test_seg_states_batch_of_different_lengths_equals_one_at_a_time(public_fixture):
    model, _, tok = load_medplib(public_fixture / "model")
    questions = ["Segment the liver.", "Please segment the left kidney in this abdominal CT scan, thank you."]
    ids = [tok.encode_prompt(build_prompt(q)) for q in questions]
    assert len(ids[0]) != len(ids[1])
    feats = torch.randn(2, 576, model.config.mm_hidden_size, generator=torch.Generator().manual_seed(0))
    counts = PathCounts()
    batched = seg_states(model, tok, ids, feats, force_seg=True, counts=counts)
    for b in range(2):
        alone = seg_states(model, tok, [ids[b]], feats[b : b + 1], force_seg=True)[0]
        torch.testing.assert_close(batched[b].hidden, alone.hidden, atol=1e-4, rtol=0)
        assert batched[b].answer == alone.answer == "<SEG>"
    assert counts.forced == 2 and counts.generate == 0
    # continuing from per-image prefix states (right-padded suffixes) gives the same states
    cache = FeatureCache(10**8)
    for _ in range(2):  # computed, then reused
        reused = seg_states(
            model, tok, ids, feats, force_seg=True, counts=counts, image_keys=["a", "b"], cache=cache
        )
        for b in range(2):
            torch.testing.assert_close(reused[b].hidden, batched[b].hidden, atol=1e-4, rtol=0)
    assert counts.prefix_computed == 2 and counts.prefix_cached == 2
    with pytest.raises(ValueError, match="2 prompts but 1"):
        seg_states(model, tok, ids, feats[:1])


def test_gpu_benchmark_builds_release_architecture_on_meta():
    spec = importlib.util.spec_from_file_location("gpu_7b", REPO / "benchmarks" / "gpu_7b.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.build_random_release_model("meta")
    params = list(model.parameters())
    assert all(p.device.type == "meta" for p in params)
    assert abs(sum(p.numel() for p in params) - 11.69e9) < 0.01e9  # spec 2.9
    routers = [p for n, p in model.named_parameters() if n.endswith("gate.wg.weight")]
    assert len(routers) == 32 and all(p.dtype == torch.float32 for p in routers)
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.lm_head.weight.shape == (32267, 4096)
