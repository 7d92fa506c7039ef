"""Training losses: hand-computed values and the upstream oracle's teacher-forced losses."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from monai_medplib.training.losses import (
    LossWeights,
    focal_loss,
    gshard_aux_loss,
    iou_mse_loss,
    mask_losses,
    medplib_loss,
    sigmoid_bce_loss,
    soft_dice_loss,
    token_ce_loss,
)

IGNORE = -100


def test_token_ce_uniform_logits_and_dropped_samples():
    logits = torch.zeros(2, 4, 5)
    labels = torch.full((2, 4), IGNORE)
    labels[0, 2:] = torch.tensor([1, 3])  # two supervised tokens in sample 0, none in sample 1
    assert token_ce_loss(logits, labels).item() == pytest.approx(math.log(5))
    logits[0, 1, 1] = 10.0  # row 1 predicts label[2] = 1 almost surely
    expected = (-torch.log_softmax(logits[0, 1], -1)[1] + math.log(5)) / 2
    assert token_ce_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    nothing = token_ce_loss(torch.zeros(1, 3, 5, requires_grad=True), torch.full((1, 3), IGNORE))
    assert nothing.item() == 0.0 and nothing.requires_grad
    with pytest.raises(ValueError, match="logits"):
        token_ce_loss(torch.zeros(4, 5), torch.zeros(4, dtype=torch.long))


def test_gshard_aux_by_hand():
    # gates [[.75,.25],[.5,.5]], both tokens to expert 0: 2 * (0.625*1 + 0.375*0)
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    assert gshard_aux_loss(logits).item() == pytest.approx(1.25)


def test_mask_terms_by_hand():
    logits = torch.zeros(1, 2, 2)  # p = 0.5 everywhere
    gt = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    assert sigmoid_bce_loss(logits, gt).item() == pytest.approx(math.log(2))
    # I = 1, U = 2 + 2 -> 1 - (2 + 1e-6) / (4 + 1e-6)
    assert soft_dice_loss(logits, gt).item() == pytest.approx(1 - (2 + 1e-6) / (4 + 1e-6))
    # positives 0.25 * 0.25 * ln2, negatives 0.75 * 0.25 * ln2, averaged over 4 pixels (2 of each)
    assert focal_loss(logits, gt).item() == pytest.approx(0.125 * math.log(2), rel=1e-6)
    # soft IoU 1/3 vs predicted 0.5
    assert iou_mse_loss(logits, gt, torch.tensor([0.5])).item() == pytest.approx(1 / 36, rel=1e-5)
    with pytest.raises(ValueError, match="does not match"):
        sigmoid_bce_loss(logits, torch.zeros(1, 2, 3))


def test_mask_losses_average_masks_of_different_sizes():
    a, gt_a = torch.zeros(2, 2), torch.ones(2, 2)
    b, gt_b = torch.full((3, 5), 20.0), torch.ones(3, 5)
    parts = mask_losses([a, b], [gt_a, gt_b])
    assert parts["bce"].item() == pytest.approx((math.log(2) + math.log1p(math.exp(-20))) / 2, rel=1e-5)
    assert parts["iou"].item() == 0.0  # no IoU predictions given


def test_release_weights():
    assert (
        LossWeights() == LossWeights.release() == LossWeights(ce=1.0, dice=0.5, bce=2.0, iou=0.0, focal=0.0)
    )
    assert LossWeights.grounding_stage().dice == 5.0


@pytest.mark.parametrize(
    "case,gt_name", [("c_grounding", "gt_mask.png"), ("d_grounding_square", "gt_mask_square.png")]
)
def test_reproduces_upstream_teacher_forced_losses(public_fixture, case, gt_name):
    expected = json.loads((public_fixture / "expected" / "expected.json").read_text())["cases"][case]
    tensors = load_file(public_fixture / "expected" / f"{case}.safetensors")
    gt = torch.from_numpy(
        (np.array(Image.open(public_fixture / "inputs" / gt_name).convert("L")) >= 1).astype("float32")
    )

    # Expanded teacher-forced sequence "... ASSISTANT: <SEG></s>" (the image id -200 becomes 576 rows); the oracle
    # stores the last 8 logits rows, which cover every supervised target (<SEG> and </s>).
    ids = expected["full_teacher_forced_ids"]
    length = len(ids) - 1 + 576
    stored = tensors["tf_full_logits_last8"]
    logits = torch.zeros(1, length, stored.shape[-1])
    logits[:, -8:] = stored
    labels = torch.full((1, length), IGNORE)
    labels[0, -2:] = torch.tensor(ids[-2:])

    ref_w = expected["tf_loss_weights"]
    weights = LossWeights(
        ce=ref_w["ce"], dice=ref_w["dice"], bce=ref_w["bce"], iou=ref_w["iou"], focal=ref_w["focal"]
    )
    out = medplib_loss(
        logits,
        labels,
        pred_masks=[tensors["pred_mask_logits"]],
        gt_masks=[gt],
        pred_ious=[tensors["iou_predictions"][:, 0]],
        weights=weights,
    )
    for key, value in expected["tf_losses"].items():
        assert out[key].item() == pytest.approx(value, abs=1e-5), key
