"""Keyframe grounding (opt-in): the LLM on key slices, SAM on every slice with the keys' prompts.

Independent expectations: the exact path of the same pipeline (keyframes off), the key positions worked out by
hand, the prompt a propagated slice must carry (its nearest key's, or the hand-computed linear mix), and the two
limits of the adaptive check (a check that cannot pass degrades to exact grounding; one that always passes runs
the LLM on the initial keys only).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_medplib.checkpoint import load_medplib
from monai_medplib.data.lits import load_lits_case
from monai_medplib.pipeline import MedPLIBPipeline
from monai_medplib.pipeline.keyframes import key_positions

LIVER = "Please segment the liver."
STEP = 8  # 128^3 -> 16^3 voxels


@pytest.fixture(scope="module")
def pipe(public_fixture):
    model, _, tokenizer = load_medplib(public_fixture / "model")
    return MedPLIBPipeline(model, tokenizer)


@pytest.fixture(scope="module")
def ct() -> MetaTensor:
    case = load_lits_case()
    image = torch.from_numpy(case.image[::STEP, ::STEP, ::STEP].copy())[None]
    return MetaTensor(image, affine=torch.as_tensor(np.diag([-12.0, -12.0, 12.0, 1.0])))


def test_key_positions_are_the_ends_and_every_kth():
    assert key_positions(16, 4) == [0, 4, 8, 12, 15]
    assert key_positions(17, 8) == [0, 8, 16]
    assert key_positions(1, 8) == [0]
    assert key_positions(5, 1) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="keyframes must be >= 1"):
        key_positions(5, 0)


def test_every_slice_a_key_is_exact_grounding(pipe, ct):
    exact = pipe.ground_volume(ct, LIVER, force_seg=True, progress=False)
    keyed = pipe.ground_volume(ct, LIVER, force_seg=True, progress=False, keyframes=1)
    assert torch.equal(exact.label.as_tensor(), keyed.label.as_tensor())
    assert set(keyed.slice_paths[LIVER].values()) == {"key"}
    assert keyed.paths["llm_passes"] == exact.paths["llm_passes"] == 16


def test_a_check_that_cannot_pass_bisects_down_to_exact(pipe, ct):
    exact = pipe.ground_volume(ct, LIVER, force_seg=True, progress=False)
    keyed = pipe.ground_volume(ct, LIVER, force_seg=True, progress=False, keyframes=8, keyframe_check=1.0)
    paths = keyed.slice_paths[LIVER]
    assert "bisected" in paths.values()
    # wherever an interval was accepted, its two keys' prompts gave identical masks on its middle slice; on the
    # random-weight model that happens only where both masks are empty, so the label matches the exact one
    assert torch.equal(exact.label.as_tensor(), keyed.label.as_tensor())
    assert keyed.paths["llm_passes"] == sum(p != "propagated" for p in paths.values())


def test_a_check_that_always_passes_runs_the_llm_on_the_initial_keys_only(pipe, ct):
    keyed = pipe.ground_volume(ct, LIVER, force_seg=True, progress=False, keyframes=4, keyframe_check=0.0)
    keys = key_positions(16, 4)
    paths = keyed.slice_paths[LIVER]
    key_prompts = {i: keyed.slice_results[(LIVER, i)].seg_embedding for i in keys}
    # the forced random-weight model gives every key slice a mask (a key without one would be checked closer)
    assert all(keyed.slice_results[(LIVER, i)].mask.any() for i in keys)
    assert keyed.paths["llm_passes"] == len(keys)
    assert {i for i, p in paths.items() if p == "key"} == set(keys)
    for i, path in paths.items():
        if path != "propagated":
            continue
        nearest = min(keys, key=lambda k: (abs(k - i), k))
        torch.testing.assert_close(keyed.slice_results[(LIVER, i)].seg_embedding, key_prompts[nearest])


def test_linear_interpolation_mixes_the_two_keys(pipe, ct):
    keyed = pipe.ground_volume(
        ct,
        LIVER,
        force_seg=True,
        progress=False,
        keyframes=8,
        keyframe_check=0.0,
        keyframe_interpolation="linear",
    )
    paths = keyed.slice_paths[LIVER]
    for i, path in paths.items():
        if path != "propagated":
            continue
        a = max(k for k, p in paths.items() if p != "propagated" and k < i)
        b = min(k for k, p in paths.items() if p != "propagated" and k > i)
        w = (i - a) / (b - a)
        ea = keyed.slice_results[(LIVER, a)].seg_embedding
        eb = keyed.slice_results[(LIVER, b)].seg_embedding
        torch.testing.assert_close(keyed.slice_results[(LIVER, i)].seg_embedding, (1 - w) * ea + w * eb)


def test_intervals_between_keys_without_seg_stay_empty(pipe, ct):
    """Without force_seg the random-weight model answers without <SEG> on these slices: nothing is propagated."""
    slices = [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]
    exact = pipe.ground_volume(ct, LIVER, slices=slices, progress=False)
    keyed = pipe.ground_volume(ct, LIVER, slices=slices, progress=False, keyframes=5)
    assert not any(exact.has_seg[LIVER].values())
    assert not bool(keyed.label.any())
    assert keyed.paths["llm_passes"] == 3  # positions 0, 5 and 10 of the list: slices 0, 6 and 11
    assert {i for i, p in keyed.slice_paths[LIVER].items() if p == "key"} == {0, 6, 11}
    assert keyed.summary()["targets"][LIVER]["found"] is False


def test_bad_keyframe_settings_are_named(pipe, ct):
    with pytest.raises(ValueError, match="keyframes must be >= 1"):
        pipe.ground_volume(ct, LIVER, progress=False, keyframes=0)
    with pytest.raises(ValueError, match="interpolation"):
        pipe.ground_volume(ct, LIVER, progress=False, keyframes=4, keyframe_interpolation="cubic")
    with pytest.raises(ValueError, match="check_dice"):
        pipe.ground_volume(ct, LIVER, progress=False, keyframes=4, keyframe_check=1.5)


def test_keys_follow_the_volume_order_whatever_the_order_of_the_slices_given(pipe, ct):
    """A shuffled slice list must not make far slices neighbours (measured before: [64, 60, 62, 61, 63] made 64
    and 63 the keys and gave 60 the prompt of 64)."""
    listed = [9, 2, 14, 5, 0, 11, 7, 3, 15, 1, 12, 6, 10, 4, 13, 8]
    given = pipe.ground_volume(ct, LIVER, slices=listed, force_seg=True, progress=False, keyframes=4)
    ordered = pipe.ground_volume(
        ct, LIVER, slices=sorted(listed), force_seg=True, progress=False, keyframes=4
    )
    assert given.slice_paths == ordered.slice_paths
    assert {i for i, p in given.slice_paths[LIVER].items() if p == "key"} == set(key_positions(16, 4))
    assert torch.equal(given.label.as_tensor(), ordered.label.as_tensor())


def test_a_propagated_slice_reports_no_answer_of_its_own(pipe, ct):
    keyed = pipe.ground_volume(ct, LIVER, force_seg=True, progress=False, keyframes=4, keyframe_check=0.0)
    propagated = {i for i, p in keyed.slice_paths[LIVER].items() if p == "propagated"}
    assert (
        propagated
        and not propagated & set(keyed.answers[LIVER])
        and not propagated & set(keyed.has_seg[LIVER])
    )
    ran = set(keyed.slice_paths[LIVER]) - propagated
    assert set(keyed.answers[LIVER]) == ran == set(keyed.has_seg[LIVER])
    target = keyed.summary()["targets"][LIVER]
    assert target["slices_with_seg"] == sorted(ran)
    shown = np.flatnonzero(keyed.label.as_tensor()[0].numpy().any(axis=(0, 1))).tolist()  # axial: k
    assert target["slices_with_mask"] == shown and set(shown) & propagated  # propagated masks still count
