"""Click refinement (MedPLIBPipeline.refine) on the tiny upstream fixture model (300 x 420 image)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_medplib.pipeline import MedPLIBPipeline
from monai_medplib.pipeline.refinement import sam_frame_points
from monai_medplib.pipeline.results import GroundingResult
from monai_medplib.processing import load_rgb

TEXT = "Please segment the liver."


@pytest.fixture(scope="module")
def pipe(public_fixture):
    return MedPLIBPipeline.from_pretrained(public_fixture / "model", device="cpu")  # exact comparisons


@pytest.fixture(scope="module")
def image(public_fixture):
    rgb = load_rgb(public_fixture / "inputs" / "image.png")
    assert rgb.shape[:2] == (300, 420)
    return rgb


@pytest.fixture(scope="module")
def prior(pipe, image):
    return pipe.ground(image, TEXT, force_seg=True)


@pytest.fixture
def encoder_calls(pipe):
    calls = []
    handle = pipe.model.model.visual_model.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    yield calls
    handle.remove()


def _sam(pipe):
    return pipe.model.model.visual_model


def test_sam_frame_mapping_non_square():
    # 300 rows x 420 cols: ResizeLongestSide(256) -> (183, 256); centre pad top = (256 - 183) // 2 = 36, left = 0.
    # x scales by 256/420, y by 183/300 (the ratio the pixels were resized by, as SAM's apply_coords).
    mapped = sam_frame_points([[0, 0], [210, 150], [419.5, 299.5]], (300, 420))
    expected = [
        [0.0, 36.0],
        [210 * 256 / 420, 150 * 183 / 300 + 36],  # 128.0, 127.5
        [419.5 * 256 / 420, 299.5 * 183 / 300 + 36],  # 255.695..., 218.695
    ]
    assert mapped.dtype == torch.float32
    np.testing.assert_allclose(mapped.numpy(), expected, atol=1e-4)
    assert mapped[1].tolist() == [128.0, 127.5]
    # square images: no padding, uniform scale
    np.testing.assert_allclose(sam_frame_points([[100, 50]], (512, 512)).numpy(), [[50.0, 25.0]])


def test_ground_keeps_the_seg_embedding(pipe, image, prior):
    assert (
        prior.has_seg and prior.seg_embedding.shape == (256,) and prior.seg_embedding.dtype == torch.float32
    )
    # decoding the stored embedding alone reproduces the grounding's low-res logits exactly
    emb = pipe.encode_images([image])[0].sam_embedding
    low_res, _ = _sam(pipe).decode(emb[None], text_embeds=prior.seg_embedding.reshape(1, 1, -1))
    assert torch.equal(low_res[0].float(), prior.low_res_logits)


def test_clicks_reach_sam_in_the_sam_frame(pipe, image, prior, monkeypatch):
    seen = {}
    real = _sam(pipe).decode

    def record(embeddings, text_embeds=None, points=None, boxes=None, mask_input=None):
        seen.update(text=text_embeds, points=points, mask=mask_input)
        return real(embeddings, text_embeds=text_embeds, points=points, boxes=boxes, mask_input=mask_input)

    monkeypatch.setattr(_sam(pipe), "decode", record)
    result = pipe.refine(image, [(210, 150), (0, 299)], [1, 0], prior=prior)
    coords, labels = seen["points"]
    np.testing.assert_allclose(coords[0].numpy(), [[128.0, 127.5], [0.0, 299 * 183 / 300 + 36]], atol=1e-4)
    assert labels.tolist() == [[1, 0]]
    assert torch.equal(seen["text"].reshape(-1), prior.seg_embedding)  # sparse = <SEG> embedding + clicks
    assert torch.equal(seen["mask"][0], prior.low_res_logits)  # dense = the prior's low-res logits
    assert result.answer == prior.answer and result.token_ids == prior.token_ids and result.has_seg


def test_refine_with_cached_features_skips_the_image_encoder(
    pipe, image, prior, encoder_calls, public_fixture
):
    first = pipe.refine(image, [(210, 150)], [1], prior=prior)
    again = pipe.refine(public_fixture / "inputs" / "image.png", [(210, 150)], [1], prior=prior)
    features = pipe.encode_images([image])[0]
    from_features = pipe.refine(features, [(210, 150)], [1], prior=prior)
    assert encoder_calls == []
    assert torch.equal(first.low_res_logits, again.low_res_logits)
    assert torch.equal(first.low_res_logits, from_features.low_res_logits)
    # control: a pipeline without cache does run the encoder (the counter works)
    uncached = MedPLIBPipeline(pipe.model, pipe.tokenizer)
    uncached.refine(image, [(210, 150)], [1], prior=prior)
    assert len(encoder_calls) == 1


def test_no_clicks_with_prior_is_the_mask_input_path(pipe, image, prior):
    one = pipe.refine(image, [], [], prior=prior)
    two = pipe.refine(image, [], [], prior=prior)
    assert torch.equal(one.low_res_logits, two.low_res_logits)
    emb = pipe.encode_images([image])[0].sam_embedding
    with torch.no_grad():
        expected, iou = _sam(pipe).decode(
            emb[None],
            text_embeds=prior.seg_embedding.reshape(1, 1, -1),
            mask_input=prior.low_res_logits[None],
        )
    assert torch.equal(one.low_res_logits, expected[0].float())
    assert one.iou_prediction == pytest.approx(float(iou))
    # post-processing and threshold exactly as ground(): crop quirk, 300 x 420, sigmoid > 0.1
    logits = pipe.postprocess(one.low_res_logits, pipe.encode_images([image])[0])
    np.testing.assert_array_equal(one.logits, logits.numpy())
    np.testing.assert_array_equal(one.mask, torch.sigmoid(logits).numpy() > 0.1)


def test_clicks_change_the_mask_and_geometry_is_the_image(pipe, image, prior):
    base = pipe.refine(image, [], [], prior=prior)
    clicked = pipe.refine(image, [(60, 40), (380, 260)], [1, 0], prior=prior)
    assert not torch.equal(base.low_res_logits, clicked.low_res_logits)
    for result in (base, clicked):
        assert result.mask.shape == result.probs.shape == result.logits.shape == (300, 420)
        assert result.mask.dtype == bool and result.low_res_logits.shape == (1, 64, 64)
    chained = pipe.refine(image, [(60, 40)], [1], prior=clicked)  # a refinement is the next prior
    assert torch.equal(chained.seg_embedding, prior.seg_embedding)


def test_text_without_prior_grounds_first(pipe, image, prior):
    via_text = pipe.refine(image, [(210, 150)], [1], text=TEXT, force_seg=True)
    via_prior = pipe.refine(image, [(210, 150)], [1], prior=prior)
    # the prior's prompt was prefilled whole, this one continues from the cached image prefix: same up to
    # float rounding
    torch.testing.assert_close(via_text.low_res_logits, via_prior.low_res_logits, atol=1e-4, rtol=0)


def test_points_only_without_prior_or_text(pipe, image, monkeypatch):
    seen = {}
    real = _sam(pipe).decode

    def record(embeddings, **prompts):
        seen.update(prompts)
        return real(embeddings, **prompts)

    monkeypatch.setattr(_sam(pipe), "decode", record)
    result = pipe.refine(image, [(210, 150)], [1])
    assert seen["text_embeds"] is None and seen["mask_input"] is None and seen["points"] is not None
    assert result.mask.shape == (300, 420) and result.answer == "" and result.seg_embedding is None


def test_prior_without_seg_adds_nothing(pipe, image):
    empty = GroundingResult.empty((300, 420), "no", [5, 2])
    with pytest.raises(ValueError, match="nothing to refine"):
        pipe.refine(image, [], [], prior=empty)
    assert pipe.refine(image, [(10, 10)], [1], prior=empty).answer == "no"


@pytest.mark.parametrize(
    ("points", "labels", "message"),
    [
        ([(420, 10)], [1], r"point #0 \(x=420, y=10\) is outside the 300x420 image"),
        ([(5, 5), (10, -1)], [1, 0], r"point #1 \(x=10, y=-1\)"),
        ([(5, 5)], [2], "labels must be 1 .* or 0"),
        ([(5, 5)], ["yes"], "labels must be 1 .* or 0"),
        ([(5, 5), (6, 6)], [1], "2 points but 1 labels"),
        ([(5, 5, 5)], [1], r"shape \(N, 2\)"),
        ([], [], "nothing to refine"),
    ],
)
def test_bad_clicks(pipe, image, points, labels, message):
    with pytest.raises(ValueError, match=message):
        pipe.refine(image, points, labels)


def test_prior_of_another_image_and_stray_options(pipe, image, prior):
    with pytest.raises(ValueError, match="another image"):
        pipe.refine(image[:200], [(5, 5)], [1], prior=prior)
    with pytest.raises(ValueError, match="force_seg"):
        pipe.refine(image, [(5, 5)], [1], prior=prior, force_seg=True)


def test_refine_in_bfloat16(public_fixture, image):
    pipe = MedPLIBPipeline.from_pretrained(public_fixture / "model", device="cpu", dtype=torch.bfloat16)
    prior = pipe.ground(image, TEXT, force_seg=True)
    result = pipe.refine(image, [(210, 150)], [1], prior=prior)
    assert result.low_res_logits.dtype == torch.float32 and result.seg_embedding.dtype == torch.float32
    assert result.mask.shape == (300, 420) and np.isfinite(result.logits).all()
