"""Volume grounding / region VQA on a real CT (LiTS case 117, downsampled to 16^3) with the tiny public model.

Independent expectations: geometry is checked against re-oriented copies of the same volume, masks against a
one-slice-at-a-time reference built from ``ExtractSlice`` + ``processing`` + the model primitives, batching
against batch size 1, and cache hits by counting encoder calls.
"""

from __future__ import annotations

import contextlib
import dataclasses

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_medplib.checkpoint import load_medplib
from monai_medplib.data.lits import load_lits_case
from monai_medplib.pipeline import MedPLIBPipeline
from monai_medplib.pipeline.features import image_cache_bytes, image_prefix_length
from monai_medplib.processing import clip_pixels, postprocess_mask_logits, sam_pixels
from monai_medplib.tokenization import build_prompt
from monai_medplib.transforms import ExtractSlice, SAMed2DNormalize

LIVER = "Please segment the liver."
TUMOUR = "Can you segment the tumour inside the liver in this CT image?"  # longer: exercises left padding
STEP = 8  # 128^3 -> 16^3
SPACING = 1.5 * STEP


@pytest.fixture(scope="module")
def pipe(public_fixture):
    model, _, tokenizer = load_medplib(public_fixture / "model")
    return MedPLIBPipeline(model, tokenizer)


@pytest.fixture(scope="module")
def ct() -> MetaTensor:
    """LPS voxel order (i -> Left, j -> Posterior, k -> Superior), as LiTS / DICOM-derived NIfTI."""
    case = load_lits_case()
    image = torch.from_numpy(case.image[::STEP, ::STEP, ::STEP].copy())[None]
    return MetaTensor(image, affine=torch.as_tensor(np.diag([-SPACING, -SPACING, SPACING, 1.0])))


def _flipped_to_ras(ct: MetaTensor) -> MetaTensor:
    """The same world content stored in RAS voxel order (axes 0 and 1 reversed)."""
    n = ct.shape[1]
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    affine[:2, 3] = -SPACING * (n - 1)
    return MetaTensor(ct.as_tensor().flip(1, 2).clone(), affine=torch.as_tensor(affine))


def _permuted(ct: MetaTensor) -> MetaTensor:
    """The same content with the superior axis stored first: voxel (k, i, j)."""
    affine = np.asarray(ct.affine)[:, [2, 0, 1, 3]]
    return MetaTensor(ct.as_tensor().permute(0, 3, 1, 2).contiguous(), affine=torch.as_tensor(affine))


@contextlib.contextmanager
def seg_boost(model, seg_id: int, decode_steps_only: bool = False):
    """Make ``<SEG>`` the argmax (random weights never emit it): +1e4 on its logit, optionally only while decoding."""
    state = {"decoding": False}

    def on_embed(module, args, output):
        ids = args[0]
        state["decoding"] = (
            ids.dim() == 2 and ids.shape[1] == 1
        )  # generate feeds [B, 1]; prompts are 1-D chunks

    def on_head(module, args, output):
        if decode_steps_only and not state["decoding"]:
            return output
        output = output.clone()
        output[..., seg_id] += 1e4
        return output

    hooks = [
        model.model.embed_tokens.register_forward_hook(on_embed),
        model.lm_head.register_forward_hook(on_head),
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


@contextlib.contextmanager
def count_encoder_calls(model):
    calls = {"clip": 0, "sam": 0}

    def counter(name):
        def hook(module, args):
            calls[name] += args[0].shape[0]

        return hook

    hooks = [
        model.model.vision_tower.register_forward_pre_hook(counter("clip")),
        model.model.visual_model.image_encoder.register_forward_pre_hook(counter("sam")),
    ]
    try:
        yield calls
    finally:
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def reference_probs(pipe, volume: MetaTensor, text: str, index: int) -> torch.Tensor:
    """One slice the original way: ExtractSlice of the normalised volume, batch-1 CLIP / prefill / SAM."""
    model, tok = pipe.model, pipe.tokenizer
    grey = ExtractSlice("axial", index)(SAMed2DNormalize()(volume))[0].numpy()
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    embeds, mask = model.build_inputs_embeds(
        [tok.encode_prompt(build_prompt(text, "vicuna_v1"))], model.clip_features(clip_pixels(rgb)[None])
    )
    hidden = model.llm_forward(embeds, mask).hidden_states[:, -1]
    pixels, resize = sam_pixels(rgb)
    low_res, _ = model.model.visual_model.decode(
        model.model.visual_model.encode_image(pixels[None]), text_embeds=model.seg_embeddings(hidden)
    )
    return torch.sigmoid(postprocess_mask_logits(low_res, resize, grey.shape))[0, 0]


# ------------------------------------------------------------------------------------------ geometry
def test_output_geometry_matches_input_for_ras_lps_and_permuted(pipe, ct):
    lps = pipe.ground_volume(ct, LIVER, slices=[6, 9], force_seg=True)
    ras_input, perm_input = _flipped_to_ras(ct), _permuted(ct)
    ras = pipe.ground_volume(ras_input, LIVER, slices=[6, 9], force_seg=True)
    perm = pipe.ground_volume(perm_input, LIVER, slices=[6, 9], force_seg=True)
    for result, source in ((lps, ct), (ras, ras_input), (perm, perm_input)):
        assert result.label.shape == source.shape and result.label.dtype == torch.uint8
        assert result.probs.shape == source.shape
        assert torch.equal(result.label.affine, source.affine) and torch.equal(
            result.probs.affine, source.affine
        )
    # only the grounded axial slices carry a label, and it is not trivially empty
    assert lps.label[0, :, :, [6, 9]].any() and not lps.label[0, :, :, :6].any()
    # the same world voxels get the same label however the volume is stored
    assert torch.equal(ras.label.as_tensor().flip(1, 2), lps.label.as_tensor())
    assert torch.equal(perm.label.as_tensor().permute(0, 2, 3, 1), lps.label.as_tensor())
    torch.testing.assert_close(
        perm.probs.as_tensor().permute(0, 2, 3, 1), lps.probs.as_tensor(), atol=1e-4, rtol=0
    )


def test_slice_equals_one_image_reference(pipe, ct):
    result = pipe.ground_volume(ct, LIVER, slices=[7], force_seg=True)
    expected = reference_probs(pipe, ct, LIVER, 7)
    got = ExtractSlice("axial", 7)(result.probs[:1])[0]
    torch.testing.assert_close(got.as_tensor(), expected, atol=1e-4, rtol=0)
    assert result.answers[LIVER] == {7: "<SEG>"} and result.has_seg[LIVER] == {7: True}
    assert result.paths["forced"] == 1


def test_nifti_path_input_keeps_file_geometry(pipe, ct, tmp_path):
    path = tmp_path / "ct.nii.gz"
    affine = np.asarray(ct.affine)
    affine[:3, 3] = (10.0, -20.0, 30.0)
    nib.save(nib.Nifti1Image(ct[0].numpy(), affine), str(path))
    result = pipe.ground_volume(path, LIVER, slices=[8], force_seg=True)
    assert tuple(result.label.shape) == (1, 16, 16, 16)
    np.testing.assert_allclose(np.asarray(result.label.affine), affine, atol=1e-5)


# ------------------------------------------------------------------------------------------ batching
def test_batched_equals_sequential_with_padding(pipe, ct):
    slices = [5, 8, 11]
    one = pipe.ground_volume(ct, [LIVER, TUMOUR], slices=slices, force_seg=True, batch_size=1)
    pipe.feature_cache.clear()
    many = pipe.ground_volume(ct, [LIVER, TUMOUR], slices=slices, force_seg=True, batch_size=3)
    torch.testing.assert_close(many.probs.as_tensor(), one.probs.as_tensor(), atol=1e-4, rtol=0)
    assert torch.equal(many.label.as_tensor(), one.label.as_tensor())
    assert many.paths["forced"] == 6 and many.paths["encoded"] == 3


def test_batched_generation_equals_sequential(pipe, ct):
    """Left-padded greedy decoding: <SEG> appears at decode step 1, so its state comes from a decode step."""
    with seg_boost(pipe.model, pipe.tokenizer.seg_id, decode_steps_only=True):
        one = pipe.ground_volume(ct, [LIVER, TUMOUR], slices=[6, 10], batch_size=1, max_new_tokens=2)
        many = pipe.ground_volume(ct, [LIVER, TUMOUR], slices=[6, 10], batch_size=2, max_new_tokens=2)
    assert many.answers == one.answers
    assert all(v for per_text in many.has_seg.values() for v in per_text.values())
    assert all(answer.endswith("<SEG>") and answer != "<SEG>" for answer in many.answers[LIVER].values())
    torch.testing.assert_close(many.probs.as_tensor(), one.probs.as_tensor(), atol=1e-4, rtol=0)
    assert many.paths["generate"] == 4


def test_shortcut_matches_generation_and_falls_back(pipe, ct):
    with seg_boost(pipe.model, pipe.tokenizer.seg_id):
        fast = pipe.ground_volume(ct, LIVER, slices=[6, 9], fast=True)
        slow = pipe.ground_volume(ct, LIVER, slices=[6, 9], max_new_tokens=2)
    assert fast.paths["shortcut"] == 2 and fast.paths["generate"] == 0
    assert slow.paths["generate"] == 2 and slow.answers[LIVER][6] == "<SEG> <SEG>"
    torch.testing.assert_close(fast.probs.as_tensor(), slow.probs.as_tensor(), atol=1e-4, rtol=0)
    # random weights: <SEG> is never the argmax, every slice falls back to generation (and gets no mask)
    plain = pipe.ground_volume(ct, LIVER, slices=[6, 9], fast=True, max_new_tokens=2)
    assert plain.paths["shortcut"] == 0 and plain.paths["generate"] == 2
    assert not any(plain.has_seg[LIVER].values()) and not plain.label.any()


# ------------------------------------------------------------------------------------------ cache
@contextlib.contextmanager
def llm_lengths(model):
    """Sequence lengths the language model is run on (prefills and decode steps)."""
    lengths: list[int] = []

    def hook(module, args, kwargs):
        lengths.append(kwargs["inputs_embeds"].shape[1])

    handle = model.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield lengths
    finally:
        handle.remove()


def test_second_question_prefills_only_its_own_tokens(pipe, ct):
    pipe.feature_cache.clear()
    with llm_lengths(pipe.model) as lengths:
        first = pipe.ground_volume(ct, LIVER, slices=[3], force_seg=True)
        second = pipe.ground_volume(ct, TUMOUR, slices=[3], force_seg=True)
    liver, tumour = pipe.prompt_ids(LIVER), pipe.prompt_ids(TUMOUR)
    # the first prompt is prefilled whole, once (its prefix states are kept from that pass), the second
    # prefills only its question on them
    assert lengths == [len(liver) - 1 + 576, len(tumour) - image_prefix_length(tumour)]
    assert lengths[1] < 40
    assert first.paths["prefix_computed"] == 1 and second.paths["prefix_cached"] == 1
    torch.testing.assert_close(
        ExtractSlice("axial", 3)(second.probs[:1])[0].as_tensor(),
        reference_probs(pipe, ct, TUMOUR, 3),
        atol=1e-4,
        rtol=0,
    )


def test_one_image_in_the_cache_takes_image_cache_bytes(pipe, ct):
    pipe.feature_cache.clear()
    pipe.ground_volume(ct, LIVER, slices=[5], force_seg=True)
    prefix = image_prefix_length(pipe.prompt_ids(LIVER))
    config = pipe.model.config  # CLIP 576 x 32 + SAM 256 x 16 x 16 + K and V of every layer, in float32
    expected = 4 * (576 * 32 + 256 * 16 * 16 + 2 * config.num_hidden_layers * (prefix - 1 + 576) * 64)
    assert image_cache_bytes(config, torch.float32, prefix) == expected
    assert pipe.feature_cache.nbytes == expected and len(pipe.feature_cache) == 2  # features + prefix


def test_cache_hit_skips_both_encoders(pipe, ct):
    pipe.feature_cache.clear()
    with count_encoder_calls(pipe.model) as calls:
        first = pipe.ground_volume(ct, LIVER, slices=[4], force_seg=True)
        assert calls == {"clip": 1, "sam": 1}
        second = pipe.ground_volume(ct, TUMOUR, slices=[4], force_seg=True)
        pipe.answer_volume_region(ct, "What is this?", points=[(8, 8, 4)], max_new_tokens=1)
        pipe.answer_volume(ct, "Is this normal?", index=4, max_new_tokens=1)
        assert calls == {"clip": 1, "sam": 1}
        pipe.ground_volume(ct, LIVER, slices=[4, 5], force_seg=True)  # only the new slice is encoded
        assert calls == {"clip": 2, "sam": 2}
    assert first.paths["encoded"] == 1 and second.paths == {**second.paths, "encoded": 0, "cached": 1}
    assert pipe.feature_cache.stats.hits >= 4


# ------------------------------------------------------------------------------------------ labels
def test_several_texts_make_one_multi_label_volume(pipe, ct, capsys):
    result = pipe.ground_volume(ct, [LIVER, TUMOUR], slices=[12], force_seg=True, progress=True)
    assert "grounding axial slices" in capsys.readouterr().err
    assert result.label_names == {LIVER: 1, TUMOUR: 2}
    assert "probs" not in vars(result)  # the dense float volume is only built when asked for
    assert result.probs.shape == (2, 16, 16, 16) and torch.equal(result.probs.affine, ct.affine)
    assert not result.probs.as_tensor()[..., [k for k in range(16) if k != 12]].any()  # 0 off the slice
    probs, label = result.probs.as_tensor()[:, :, :, 12], result.label.as_tensor()[0, :, :, 12]
    expected = torch.where(probs.max(0).values > 0.1, probs.argmax(0) + 1, 0)
    assert torch.equal(label.long(), expected)
    assert set(torch.unique(label).tolist()) == {0, 1, 2}  # both texts win somewhere on this slice
    assert result.mask.dtype == torch.bool and torch.equal(
        result.mask.as_tensor(), result.label.as_tensor() > 0
    )
    prior = result.slice_results[(TUMOUR, 12)]
    assert prior.mask.shape == (16, 16) and prior.low_res_logits.shape == (1, 64, 64)


def test_array_inputs_as_users_hold_them(pipe, ct):
    """A flipped numpy view (negative strides) and big-endian data are volumes too; one slice index may be a numpy
    integer."""
    array = np.ascontiguousarray(ct.as_tensor()[0].numpy())
    reference = pipe.ground_volume(array, LIVER, slices=[8], force_seg=True).label.as_tensor()
    flipped = pipe.ground_volume(np.flip(array, 0), LIVER, slices=[8], force_seg=True).label.as_tensor()
    copied = pipe.ground_volume(np.flip(array, 0).copy(), LIVER, slices=[8], force_seg=True).label.as_tensor()
    assert torch.equal(flipped, copied)  # the view is the volume its copy is
    big_endian = array.astype(array.dtype.newbyteorder(">"))
    assert torch.equal(
        pipe.ground_volume(big_endian, LIVER, slices=[8], force_seg=True).label.as_tensor(), reference
    )
    assert torch.equal(
        pipe.ground_volume(array, LIVER, slices=np.int64(8), force_seg=True).label.as_tensor(), reference
    )


def test_bad_requests(pipe, ct):
    with pytest.raises(ValueError, match="slice index 16 is outside"):
        pipe.ground_volume(ct, LIVER, slices=[16], force_seg=True)
    with pytest.raises(ValueError, match="distinct"):
        pipe.ground_volume(ct, [LIVER, LIVER], slices=[1])
    with pytest.raises(ValueError, match="unknown slice axis"):
        pipe.ground_volume(ct, LIVER, axis="oblique")
    with pytest.raises(FileNotFoundError):
        pipe.ground_volume("/nonexistent/ct.nii.gz", LIVER)


# ------------------------------------------------------------------------------------------ region VQA
def test_region_prompts_map_to_their_slice(pipe, ct):
    perm = _permuted(ct)  # superior axis stored first: the axial slice index is the first voxel index
    by_point = pipe.answer_volume_region(perm, "What is this?", points=[(9, 3, 12)], max_new_tokens=2)
    assert by_point.slice_index == 9 and by_point.region[9, 3, 12]
    assert by_point.region[9].sum() == by_point.region.sum() == by_point.region_2d.sum()

    roi = pipe.answer_volume_region(ct, "What is this?", roi=[2, 6, 3, 7, 10, 12], max_new_tokens=2)
    assert roi.slice_index == 11
    expected = np.zeros((16, 16, 16), dtype=bool)
    expected[2:7, 3:8, 11] = True
    assert np.array_equal(roi.region, expected)

    scribble = np.zeros((16, 16, 16), dtype=np.uint8)
    scribble[4:9, 5, 13] = 1
    by_scribble = pipe.answer_volume_region(ct, "What is this?", scribble=scribble, max_new_tokens=2)
    assert by_scribble.slice_index == 13 and np.array_equal(by_scribble.region, scribble.astype(bool))
    assert isinstance(by_scribble.answer, str) and by_scribble.answer


def test_region_answer_uses_the_region(pipe, ct):
    """Different regions on one slice change the region token and so the answer (a click's 41x41 px square
    covers all of a 16x16 slice, so boxes in opposite corners are used)."""
    near = pipe.answer_volume_region(ct, "What is this?", roi=[0, 4, 0, 4, 8, 8], max_new_tokens=6)
    far = pipe.answer_volume_region(ct, "What is this?", roi=[11, 15, 11, 15, 8, 8], max_new_tokens=6)
    assert near.slice_index == far.slice_index == 8
    assert near.answer != far.answer


def test_region_prompt_errors(pipe, ct):
    with pytest.raises(ValueError, match="outside the volume"):
        pipe.answer_volume_region(ct, "What?", points=[(3, 3, 16)])
    with pytest.raises(ValueError, match="outside the volume"):
        pipe.answer_volume_region(ct, "What?", points=[(-2, 3, 3)])
    with pytest.raises(ValueError, match="not on axial slice"):
        pipe.answer_volume_region(ct, "What?", points=[(3, 3, 3), (3, 3, 5)])
    with pytest.raises(ValueError, match="does not overlap"):
        pipe.answer_volume_region(ct, "What?", roi=[20, 30, 0, 5, 0, 5])
    with pytest.raises(ValueError, match="needs points"):
        pipe.answer_volume_region(ct, "What?")


# ------------------------------------------------------------------------------------------ one cache, 2D + volume
def test_volume_and_2d_calls_share_features_and_the_text_prompt(pipe, ct):
    pipe.feature_cache.clear()
    with count_encoder_calls(pipe.model) as calls:
        grounded = pipe.ground_volume(ct, LIVER, slices=[9], force_seg=True)
        prior = grounded.slice_results[(LIVER, 9)]
        assert prior.seg_embedding is not None and prior.seg_embedding.shape == (256,)
        refined = pipe.refine_volume(ct, 9, [(8, 8, 9)], [1], prior=prior)
        # the same slice as a 2D image (its RGB copy: same pixels, same key)
        grey = ExtractSlice("axial", 9)(SAMed2DNormalize()(ct))[0].numpy()
        again = pipe.ground(np.repeat(grey[:, :, None], 3, axis=2), LIVER, force_seg=True)
        assert calls == {"clip": 1, "sam": 1}
    assert refined.shape == (16, 16, 16) and refined[..., 9].any() and not refined[..., 8].any()
    # the refinement prompted SAM with the <SEG> text embedding: without it the result differs
    without_text = pipe.refine(grey, [(8, 8)], [1], prior=dataclasses.replace(prior, seg_embedding=None))
    with_text = pipe.refine(grey, [(8, 8)], [1], prior=prior)
    assert not np.array_equal(with_text.probs, without_text.probs)
    np.testing.assert_allclose(
        again.probs, ExtractSlice("axial", 9)(grounded.probs[:1])[0].numpy(), atol=1e-4
    )


def test_a_structure_name_grounds_as_its_request_keyed_by_the_name():
    """ground_volume turns "liver" into the trained request and keys every result by what the caller passed."""
    case = load_lits_case()
    volume = MetaTensor(torch.from_numpy(case.image)[None], affine=torch.from_numpy(case.affine))
    pipe = MedPLIBPipeline.from_pretrained("demo")
    by_name = pipe.ground_volume(volume, "liver", slices=[64], progress=False)
    asked = pipe.ground_volume(volume, "Please segment the liver.", slices=[64], progress=False)
    assert by_name.requests == {"liver": "Please segment the liver."}
    assert set(by_name.label_names) == set(by_name.has_seg) == set(by_name.answers) == {"liver"}
    assert by_name.has_seg["liver"] == asked.has_seg["Please segment the liver."]
    assert torch.equal(by_name.label.as_tensor(), asked.label.as_tensor())
    with pytest.raises(ValueError, match="ask for the same thing"):
        pipe.ground_volume(volume, ["liver", "Please segment the liver."], slices=[64], progress=False)


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (
            lambda pipe, ct: pipe.ground_volume(ct, "liver", slices=[5], keyframes=True),
            "keyframes must be a whole",
        ),
        (
            lambda pipe, ct: pipe.ground_volume(ct, "liver", slices=[5], keyframes=2.5),
            "keyframes must be a whole",
        ),
        (
            lambda pipe, ct: pipe.answer_volume_region(ct, "What?", points=(10, 10, 5)),
            "a list of \\(i, j, k\\)",
        ),
    ],
)
def test_volume_calls_name_a_bad_argument(pipe, ct, call, words):
    """keyframes=True ran as k = 1, 2.5 failed inside range(); one point not in a list was a TypeError."""
    with pytest.raises(ValueError, match=words):
        call(pipe, ct)
