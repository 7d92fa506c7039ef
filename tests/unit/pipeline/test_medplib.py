"""MedPLIBPipeline on the upstream tiny model: answers, region answers and masks equal the original's outputs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from monai_medplib.modeling.generation import GenerationOutput
from monai_medplib.pipeline import MedPLIBPipeline
from monai_medplib.pipeline.cache import FeatureCache
from monai_medplib.pipeline.features import ImageFeatures
from monai_medplib.processing import box_region_mask, load_rgb, point_region_mask, region_grid

STEPS = 12  # the fixture's greedy length


@pytest.fixture(scope="module")
def pipe(public_fixture):
    return MedPLIBPipeline.from_pretrained(public_fixture / "model")


@pytest.fixture(scope="module")
def cases(public_fixture):
    return json.loads((public_fixture / "expected" / "expected.json").read_text())["cases"]


@pytest.fixture(scope="module")
def inputs(public_fixture):
    return public_fixture / "inputs"


def _question(public_fixture, case):
    return json.loads((public_fixture / "inputs" / "prompts.json").read_text())["cases"][case]["question"]


def test_defaults_on_cpu(pipe):
    assert pipe.device.type == "cpu" and pipe.dtype == torch.float32 and pipe.template == "vicuna_v1"


def test_answer_reproduces_release_greedy_text(pipe, cases, inputs):
    text = pipe.answer(inputs / "image.png", cases["a_vqa"]["question"], max_new_tokens=STEPS)
    assert text == cases["a_vqa"]["greedy"]["text"]


def test_answer_region_demo_and_official_eval_paths(pipe, cases, inputs, public_fixture):
    question = _question(public_fixture, "b_region_vqa")  # "<region>region_mask.png</region>" form
    mask = inputs / "region_mask.png"
    demo = pipe.answer_region(inputs / "image.png", question, mask=mask, max_new_tokens=STEPS)
    assert demo == cases["b_region_vqa"]["greedy"]["text"]
    official = pipe.answer_region(
        inputs / "image.png", question, mask=mask, max_new_tokens=STEPS, official_eval_region=True
    )
    assert official == cases["b_region_vqa"]["evalpath_greedy"]["text"]
    assert official != demo


def test_ground_with_forced_seg_reproduces_release_mask(pipe, cases, inputs, public_fixture):
    expected = load_file(str(public_fixture / "expected" / "c_grounding.safetensors"))
    result = pipe.ground(inputs / "image.png", cases["c_grounding"]["question"], force_seg=True)
    assert result.has_seg and result.answer == "<SEG>" and result.token_ids == [600, 2]
    assert result.mask.shape == (300, 420) and result.mask.dtype == bool
    logits = expected["pred_mask_logits"][0]
    assert np.abs(result.logits - logits.numpy()).max() <= 1e-3
    differ = result.mask != expected["pred_mask_binary"][0].numpy().astype(bool)
    near_threshold = np.abs(logits.numpy() - np.log(0.1 / 0.9)) <= 1e-3  # README margin rule
    assert not (differ & ~near_threshold).any()
    np.testing.assert_allclose(result.probs, 1 / (1 + np.exp(-result.logits)), atol=1e-6)
    assert result.low_res_logits.shape == (1, 64, 64) and result.iou_prediction is not None


def test_ground_without_seg_gives_empty_mask(pipe, cases, inputs):
    # the random tiny model does not emit <SEG> by itself (that is why the fixture forced it)
    result = pipe.ground(inputs / "image.png", cases["c_grounding"]["question"], max_new_tokens=STEPS)
    assert 600 not in result.token_ids and len(result.token_ids) == STEPS
    assert not result.has_seg and result.logits is None
    assert result.mask.shape == (300, 420) and not result.mask.any() and not result.probs.any()


def _fake_generation(pipe, new_ids, length=10):
    hidden = torch.randn(1, length + len(new_ids) - 1, pipe.model.config.hidden_size)
    return GenerationOutput([new_ids], hidden, length)


@pytest.mark.parametrize(
    ("new_ids", "seg_rule", "all_seg", "expected_positions"),
    [
        ([600, 2], "release", False, [9]),  # <SEG></s>: both rules pick the last prompt state
        ([5, 600, 7, 8, 2], "release", False, [12]),  # release quirk: exactly one <SEG> -> H[-2] = L-1+(n-2)
        ([5, 600, 7, 8, 2], "clean", False, [10]),  # spec 5.4 clean rule: L-1+j
        ([600, 7, 600, 2], "release", False, [9]),  # several <SEG>: the first only
        ([600, 7, 600, 2], "release", True, [9, 11]),  # opt-in: every <SEG>
        # max_new_tokens=1: the quirk's position L-1+(n-2) would be a prompt row; the state that predicted <SEG>
        ([600], "release", False, [9]),
    ],
)
def test_seg_state_selection(pipe, inputs, monkeypatch, new_ids, seg_rule, all_seg, expected_positions):
    fake = _fake_generation(pipe, new_ids)
    seen = {}
    monkeypatch.setattr(pipe, "generate", lambda *a, **k: fake)
    real_embeddings = pipe.seg_embeddings

    def record(seg_hidden):
        seen["hidden"] = seg_hidden
        return real_embeddings(seg_hidden)

    monkeypatch.setattr(pipe, "seg_embeddings", record)
    result = pipe.ground(inputs / "image_square.png", "x", seg_rule=seg_rule, all_seg=all_seg)
    assert torch.equal(seen["hidden"], fake.hidden_states[0, expected_positions])
    assert result.has_seg and len(result.all_masks) == (len(expected_positions) if all_seg else 0)


def test_bad_seg_rule(pipe, inputs):
    with pytest.raises(ValueError, match="seg_rule"):
        pipe.ground(inputs / "image.png", "x", seg_rule="first")


def test_answer_region_batch_matches_single_calls(pipe, cases, inputs, public_fixture):
    question = _question(public_fixture, "b_region_vqa")
    image, mask = inputs / "image.png", inputs / "region_mask.png"
    box = np.zeros((300, 420), np.uint8)  # the fixture image is 420 x 300
    box[40:160, 30:120] = 1
    batch = pipe.answer_region_batch(
        [image, image], [question, "What is in <region>?"], [mask, [box]], max_new_tokens=STEPS
    )
    assert batch[0] == cases["b_region_vqa"]["greedy"]["text"]
    assert batch[1] == pipe.answer_region(image, "What is in <region>?", mask=box, max_new_tokens=STEPS)
    official = pipe.answer_region_batch(
        [image], [question], ["not read"], official_eval_region=True, max_new_tokens=STEPS
    )
    assert official == [cases["b_region_vqa"]["evalpath_greedy"]["text"]]
    with pytest.raises(ValueError, match="2 images, 2 questions, 1 regions"):
        pipe.answer_region_batch([image, image], [question, question], [mask])
    # a mask per <region> place: none, or one too many, would be dropped without a word
    for masks, given in (([], 0), ([mask, box], 2)):
        with pytest.raises(
            ValueError, match=f"regions\\[0\\]: {given} mask\\(s\\) for a question with 1 <region>"
        ):
            pipe.answer_region_batch([image], ["What is in <region>?"], [masks], max_new_tokens=STEPS)
    two = "Compare <region> with <region>."
    with pytest.raises(ValueError, match="1 mask\\(s\\) for a question with 2 <region> place"):
        pipe.answer_region_batch([image], [two], [mask], max_new_tokens=STEPS)
    assert len(pipe.answer_region_batch([image], [two], [[mask, box]], max_new_tokens=STEPS)) == 1


def test_points_and_box_become_the_demo_region_masks(pipe, inputs):
    shape = (300, 420)
    points = [(200.0, 150.0), (210.0, 140.0), (190.0, 160.0)]
    by_points = pipe.region_grid(shape, points=points)
    assert torch.equal(by_points, region_grid(point_region_mask(shape, points)))
    square = np.zeros(shape, np.uint8)
    square[130:171, 180:221] = 1  # 41x41 around the median click (x=200, y=150)
    assert torch.equal(by_points, region_grid(square))
    box = (100, 50, 260, 200)
    assert torch.equal(pipe.region_grid(shape, box=box), region_grid(box_region_mask(shape, box)))
    filled = np.zeros(shape, np.uint8)
    filled[50:201, 100:261] = 1
    assert torch.equal(pipe.region_grid(shape, box=box), region_grid(filled))
    image = inputs / "image.png"
    question = "What is in <region>?"
    assert pipe.answer_region(image, question, points=points, max_new_tokens=3) == pipe.answer_region(
        image, question, mask=square, max_new_tokens=3
    )


def test_image_inputs_are_equivalent(pipe, inputs):
    rgb = load_rgb(inputs / "image.png")
    ref = pipe.encode_images([inputs / "image.png"], with_sam=False)[0]
    for image in (Image.open(inputs / "image.png"), rgb, rgb.astype(np.float32) / 255.0):
        feats = pipe.encode_images([image], with_sam=False)[0]
        assert torch.equal(feats.clip_feats, ref.clip_feats) and feats.original_size == (300, 420)
    grey = pipe.encode_images([rgb[..., 0]], with_sam=False)[0]
    assert torch.equal(
        grey.clip_feats, pipe.encode_images([np.repeat(rgb[..., :1], 3, 2)], with_sam=False)[0].clip_feats
    )


def test_left_padded_batch_matches_single_answers(pipe, cases, inputs):
    answers = pipe.answer_batch(
        [inputs / "image.png", inputs / "image_square.png"],
        [cases["a_vqa"]["question"], cases["d_vqa_square"]["question"]],
        max_new_tokens=STEPS,
    )
    assert answers == [cases["a_vqa"]["greedy"]["text"], cases["d_vqa_square"]["greedy"]["text"]]


def test_feature_cache_and_features_in_place_of_images(public_fixture, cases, inputs):
    cache = FeatureCache(10**8)
    base = MedPLIBPipeline.from_pretrained(public_fixture / "model")
    pipe = MedPLIBPipeline(base.model, base.tokenizer, feature_cache=cache)
    first = pipe.encode_images([inputs / "image.png"], with_sam=False)[0]
    assert cache.stats.misses == 1 and first.sam_embedding is None and first.resize == (183, 256)
    assert first.key and len(cache) == 1
    again = pipe.encode_images([load_rgb(inputs / "image.png")], with_sam=True)[0]  # cached CLIP, adds SAM
    assert (
        cache.stats.hits == 1
        and again.clip_feats is first.clip_feats
        and again.sam_embedding.shape == (256, 16, 16)
    )
    pipe.encode_images([inputs / "image.png"])
    assert cache.stats.hits == 2 and cache.stats.misses == 1 and len(cache) == 1  # full hit
    assert pipe.encode_images([first, inputs / "image.png"], with_sam=False)[1].sam_embedding is not None
    assert (
        pipe.answer(again, cases["a_vqa"]["question"], max_new_tokens=STEPS)
        == cases["a_vqa"]["greedy"]["text"]
    )
    with pytest.raises(ValueError, match="sam_embedding"):
        pipe.ground(first, "segment")
    moved = again.to("cpu")
    assert isinstance(moved, ImageFeatures) and moved.has_sam


def test_bad_inputs_get_clear_errors(pipe, inputs, tmp_path):
    image = inputs / "image.png"
    with pytest.raises(TypeError, match="unsupported image type"):
        pipe.answer(12345, "What?")
    with pytest.raises(FileNotFoundError, match="image file not found"):
        pipe.answer(tmp_path / "missing.png", "What?")
    with pytest.raises(ValueError, match="region is empty|region mask is empty"):
        pipe.answer_region(image, "What?", mask=np.zeros((300, 420), np.uint8))
    with pytest.raises(ValueError, match="outside"):
        pipe.answer_region(image, "What?", points=[(500, 10)])
    with pytest.raises(ValueError, match="outside"):
        pipe.answer_region(image, "What?", box=(10, 10, 430, 100))
    with pytest.raises(ValueError, match="does not match|shape"):
        pipe.answer_region(image, "What?", mask=np.ones((10, 10), np.uint8))
    with pytest.raises(ValueError, match="exactly one region prompt"):
        pipe.answer_region(image, "What?")
    with pytest.raises(ValueError, match="exactly one region prompt"):
        pipe.answer_region(image, "What?", points=[(5, 5)], box=(0, 0, 9, 9))
    # an empty request would still make the model answer something
    with pytest.raises(ValueError, match="text: empty or not text"):
        pipe.ground(image, "   ")
    with pytest.raises(ValueError, match=r"questions \[1\]: empty"):
        pipe.answer_batch([image, image], ["What?", ""])
    with pytest.raises(ValueError, match="question: empty"):
        pipe.answer_region(image, "", points=[(5, 5)])
    assert pipe.answer_batch([], []) == [] and pipe.ground_batch([], []) == []


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a MedPLIB checkpoint"):
        MedPLIBPipeline.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        MedPLIBPipeline.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown conversation template"):
        MedPLIBPipeline(None, None, template="alpaca")  # type: ignore[arg-type]


def test_demo_resolves_to_the_embedded_model_and_says_when_it_is_missing(monkeypatch, tmp_path):
    import monai_medplib.demo_model as demo
    from monai_medplib.checkpoint import resolve_model_path

    assert resolve_model_path("demo") == Path(demo.DEMO_MODEL_DIR)
    assert (Path(demo.DEMO_MODEL_DIR) / "model.safetensors").stat().st_size <= 25 * 2**20
    monkeypatch.setattr(demo, "DEMO_MODEL_DIR", tmp_path)  # an installation without the weights
    with pytest.raises(FileNotFoundError, match="demo model"):
        MedPLIBPipeline.from_pretrained("demo")


def test_ground_batch_with_left_padding_matches_single_calls(pipe, inputs):
    images = [inputs / "image.png", inputs / "image_square.png"]
    texts = ["Please segment the left kidney.", "Segment the liver and the spleen of this patient, please."]
    batch = pipe.ground_batch(images, texts, force_seg=True)
    for image, text, result in zip(images, texts, batch):
        single = pipe.ground(image, text, force_seg=True)
        assert np.abs(result.logits - single.logits).max() <= 1e-3
        assert result.mask.shape == single.mask.shape


def test_argument_mistakes_are_named_before_any_model_work(pipe, inputs):
    """One path and one question to a batch call were taken as lists of characters ("25 images but 21
    questions"); a text seed reached torch.manual_seed; a volume call without texts failed iterating None."""
    image = inputs / "image.png"
    with pytest.raises(TypeError, match="images must be a list \\(one item per sample\\), got str"):
        pipe.answer_batch(str(image), "Is the liver visible?")
    with pytest.raises(TypeError, match="questions must be a list .* got str"):
        pipe.answer_batch([image], "Is the liver visible?")
    with pytest.raises(TypeError, match="images must be a list .* got PosixPath"):
        pipe.ground_batch(image, ["liver"])
    with pytest.raises(ValueError, match="seed must be a whole number or None, got 'x'"):
        pipe.answer(image, "Is the liver visible?", seed="x")
    volume = torch.zeros(1, 8, 8, 3)
    with pytest.raises(ValueError, match="text must be a non-empty string or a list of them, got None"):
        pipe.ground_volume(volume, None)
    assert len(pipe.answer_batch((image, image), ("What is this?", "Is it CT?"), max_new_tokens=2)) == 2


def test_a_prompt_longer_than_the_trained_context_is_warned_about(pipe, inputs, monkeypatch):
    """A 6,000-token question ran silently and answered "tumour tumour ..."; the positions past the model's
    context still run (as the original's), with a warning naming both lengths."""
    image = inputs / "image.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an ordinary prompt: no warning
        pipe.answer(image, "What is this?", max_new_tokens=1)
    assert pipe.model.config.max_position_embeddings > 100
    monkeypatch.setattr(pipe.model.config, "max_position_embeddings", 100)
    with pytest.warns(
        UserWarning, match=r"the prompt is \d+ positions long .* longer than the 100 the model"
    ):
        pipe.answer(image, "What is this?", max_new_tokens=1)


def test_sampled_batches_equal_one_at_a_time(pipe, inputs):
    """With a seed, a sample drew other tokens in a batch than alone (one generator shared by the batch)."""
    images = [inputs / "image.png", inputs / "image_square.png", inputs / "image.png"]
    questions = ["What is shown?", "Describe the image.", "Which organ is this?"]
    alone = [
        pipe.answer(i, q, temperature=2.0, seed=7, max_new_tokens=STEPS) for i, q in zip(images, questions)
    ]
    assert len(set(alone)) > 1  # sampling on random weights: the check below can fail
    assert pipe.answer_batch(images, questions, temperature=2.0, seed=7, max_new_tokens=STEPS) == alone


def test_bfloat16_images_and_channel_first_masks(pipe, inputs):
    """A bf16 tensor failed inside numpy ("unsupported ScalarType BFloat16"); a MONAI-style (1, H, W) mask was read
    as a 1-row colour image."""
    rgb = torch.from_numpy(np.asarray(Image.open(inputs / "image_square.png").convert("L"))).float()
    reference = pipe.answer(rgb, "What is shown?", max_new_tokens=STEPS)
    assert pipe.answer(rgb.to(torch.bfloat16), "What is shown?", max_new_tokens=STEPS) == reference
    mask = np.zeros(tuple(rgb.shape), np.uint8)
    mask[40:120, 50:150] = 1
    flat = pipe.answer_region(rgb, "What is this?", mask=mask, max_new_tokens=STEPS)
    assert pipe.answer_region(rgb, "What is this?", mask=mask[None], max_new_tokens=STEPS) == flat
    assert (
        pipe.answer_region(rgb, "What is this?", mask=torch.from_numpy(mask)[None], max_new_tokens=STEPS)
        == flat
    )


def test_region_questions_that_the_region_cannot_answer_say_why(pipe, inputs):
    image = inputs / "image_square.png"
    mask = np.zeros((256, 256), np.uint8)
    mask[10:50, 10:50] = 1
    with pytest.raises(ValueError, match="1 mask.* 2 <region> place"):
        pipe.answer_region(image, "Is <region> larger than <region>?", mask=mask)
    big = np.zeros((2048, 2048), np.uint8)
    # the release demo's 41-pixel point square falls between the model's samples (one every 85 px here)
    with pytest.raises(ValueError, match="one pixel every 85 pixels.*give a box or a mask"):
        pipe.answer_region(big, "What is this?", points=[(300, 300)])
