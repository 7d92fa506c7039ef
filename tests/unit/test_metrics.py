"""Evaluation metrics against hand-computed values and the upstream oracle's recorded IoU."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from monai_medplib.metrics import (
    GroundingMeter,
    binarize_prediction,
    dice_3d,
    dice_from_iou,
    exact_match_score,
    f1_precision_recall,
    mask_iou,
    modality_of,
    normalize_word,
    open_accuracy,
    sentence_bleu,
    summarize,
    vqa_metrics,
)

# --- grounding ------------------------------------------------------------------------------------------------


def test_mask_iou_and_dice_by_hand():
    pred = np.array([[1, 1, 0], [0, 0, 0]], bool)
    gt = np.array([[0, 1, 1], [0, 0, 0]], bool)
    assert mask_iou(pred, gt) == pytest.approx(1 / 3)
    assert dice_from_iou(1 / 3) == pytest.approx(0.5)
    assert mask_iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 0.0  # empty union scores 0 (release)
    with pytest.raises(ValueError, match="does not match"):
        mask_iou(np.zeros((2, 2)), np.zeros((2, 3)))


def test_binarize_threshold_is_strict_point_one():
    # logit(0.1) = -2.1972: -2.2 is below, -2.19 above
    assert binarize_prediction(torch.tensor([-3.0, -2.2, -2.19, 0.0])).tolist() == [False, False, True, True]
    assert binarize_prediction(np.array([0.05, 0.1, 0.11]), pred_kind="probs").tolist() == [
        False,
        False,
        True,
    ]
    assert binarize_prediction(np.array([0, 3, 255], np.uint8)).tolist() == [False, True, True]
    with pytest.raises(ValueError, match="pred_kind"):
        binarize_prediction(np.zeros(2), pred_kind="prob")  # type: ignore[arg-type]


def test_modality_prefix():
    assert modality_of("images/ct_00--AMOS2022--amos_0001--x_0020.png") == "ct"
    assert modality_of("/data/x_ray--Chest--img1--2d_none.png") == "x"
    assert modality_of("ultrasound_00--BUSI--case--2d_none") == "ultrasound"


def test_grounding_meter_means_and_modalities():
    gt = np.array([[0, 1, 1], [0, 0, 0]], np.uint8) * 255
    meter = GroundingMeter(pred_kind="probs")
    assert meter.add("ct_00--A--c1--x_0001.png", np.array([[0.9, 0.9, 0.0], [0, 0, 0]]), gt) == pytest.approx(
        1 / 3
    )
    assert meter.add("ct_00--B--c2--x_0002.png", None, gt) == 0.0  # no <SEG> generated
    assert meter.add("mr_00--C--c3--z_0003.png", gt > 0, gt) == 1.0
    result = meter.result()
    assert result["n"] == 3 and result["n_without_seg"] == 1
    assert result["miou"] == pytest.approx((1 / 3 + 0 + 1) / 3)
    assert result["mdice"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert result["per_modality"]["ct"] == pytest.approx({"n": 2, "miou": 1 / 6, "mdice": 0.25})
    assert result["per_modality"]["mr"] == pytest.approx({"n": 1, "miou": 1.0, "mdice": 1.0})


@pytest.mark.parametrize(
    "case,gt_name", [("c_grounding", "gt_mask.png"), ("d_grounding_square", "gt_mask_square.png")]
)
def test_grounding_iou_matches_upstream_eval(public_fixture, case, gt_name):
    expected = json.loads((public_fixture / "expected" / "expected.json").read_text())["cases"][case]
    tensors = load_file(public_fixture / "expected" / f"{case}.safetensors")
    gt = np.array(Image.open(public_fixture / "inputs" / gt_name).convert("L"))
    logits = tensors["pred_mask_logits"]
    assert np.array_equal(binarize_prediction(logits), tensors["pred_mask_binary"].numpy().astype(bool))
    meter = GroundingMeter()
    iou = meter.add(expected["image"], logits, gt)
    assert iou == pytest.approx(expected["iou_vs_gt_mask (meaningless, random weights)"], abs=1e-7)


# --- VQA ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("The liver.", "liver"),
        ("Yes, there is one lesion.", "yes there is 1 lesion"),
        ("1,000 cells", "1000 cells"),  # a digit-comma-digit removes punctuation instead of spacing it
        ("left-kidney", "left kidney"),
        ("x - y", "x y"),
        ("dont know", "don't know"),
        ("3.5 cm.", "3.5 cm"),
        ("A cyst: benign", "cyst: benign"),  # ':' is not in the VQA punctuation list
        ("Im sure", "im sure"),  # capitalised contraction keys never match lower-cased text
        ("somebody'd", "somebodyd"),  # the table's reversed entry
        ("a." * 40 + " end", "a" * 33 + ".a" * 7 + ". end"),  # at most 32 periods removed
    ],
)
def test_normalize_word(text, expected):
    assert normalize_word(text) == expected


def test_exact_match_f1_by_hand():
    # distinct reference words found in the prediction / number of prediction words
    assert exact_match_score("liver kidney liver", "liver spleen") == pytest.approx(1 / 3)
    assert exact_match_score("", "liver") == 0.0
    # release quirk: tp counts the prediction's multiplicity (2), fp 1 (kidney), fn 1 (spleen)
    f1, precision, recall = f1_precision_recall("liver liver kidney", "liver spleen")
    assert (f1, precision, recall) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert f1_precision_recall("kidney", "liver") == (0.0, 0.0, 0.0)


def test_sentence_bleu_by_hand():
    ref = "a b c d e".split()
    assert sentence_bleu(ref, ref) == pytest.approx(1.0)
    # all precisions 1, brevity penalty exp(1 - 5/4)
    assert sentence_bleu(ref, "a b c d".split()) == pytest.approx(math.exp(-0.25))
    hyp = "a b x d e".split()  # p1 = 4/5, p2 = 2/4, p3 = 0/3
    assert sentence_bleu(ref, hyp, (1, 0, 0, 0)) == pytest.approx(0.8)
    assert sentence_bleu(ref, hyp, (0, 1, 0, 0)) == pytest.approx(0.5)
    assert 0 < sentence_bleu(ref, hyp) < 1e-70  # NLTK method0: log(float_min) for the empty order
    assert sentence_bleu(ref, "x y".split()) == 0.0  # no unigram match: exactly 0
    assert sentence_bleu(ref, []) == 0.0
    assert sentence_bleu("the cat".split(), "the the the".split(), (1, 0, 0, 0)) == pytest.approx(1 / 3)


def test_vqa_metrics_by_hand():
    records = [
        {"gt": "yes", "text": "Yes.", "answer_type": "CLOSED"},
        {"gt": "yes", "pred": "No", "answer_type": "yes/no"},
        {"gt": "The liver.", "pred": "liver", "answer_type": "open"},
        {"gt": "kidney", "pred": "left kidney", "answer_type": "other"},
        {"gt": "b", "pred": "b", "answer_type": "choice"},
    ]
    result = vqa_metrics(records)
    assert result["closed"] == {"n": 2, "accuracy": 0.5}
    assert result["n_skipped"] == 1
    open_part = result["open"]
    assert open_part["n"] == 2
    assert open_part["exact_match"] == pytest.approx((1 + 0.5) / 2)
    assert open_part["f1"] == pytest.approx((1 + 2 / 3) / 2)
    assert open_part["precision"] == pytest.approx(0.75)
    assert open_part["recall"] == pytest.approx(1.0)
    assert open_part["bleu_1"] == pytest.approx((1 + 0.5) / 2)
    assert open_part["bleu"] < 1e-70  # one-word answers have no bigram: NLTK's 4-gram BLEU is ~0
    with pytest.raises(ValueError, match="answer_type"):
        vqa_metrics([{"gt": "a", "pred": "a"}])


def test_open_accuracy_snaps_to_candidates():
    candidates = ["left kidney", "liver", "spleen"]
    assert open_accuracy("it is the liver", "liver", candidates) == 1.0
    assert open_accuracy("spleen", "liver", candidates) == 0.0
    records = [{"gt": c, "pred": "the " + c + " here", "answer_type": "open"} for c in candidates]
    assert vqa_metrics(records, use_candidates=True)["open"]["open_accuracy"] == 1.0


# --- volumes and report ---------------------------------------------------------------------------------------


def test_dice_3d_per_label():
    gt = np.zeros((2, 2, 2), np.uint8)
    pred = np.zeros((1, 2, 2, 2), np.uint8)  # leading channel is dropped
    gt[0, 0, :2] = 1
    pred[0, 0, 0, :2] = 1
    pred[0, 1, 1, 1] = 1  # |P|=3, |G|=2, overlap 2 -> 0.8
    pred[0, 1, 0, 0] = 2  # label 2 only predicted -> 0
    scores = dice_3d(torch.from_numpy(pred), gt)
    assert scores == pytest.approx({"1": 0.8, "2": 0.0})
    named = dice_3d(pred, gt, labels={"liver": 1, "tumour": 3})
    assert named["liver"] == pytest.approx(0.8) and math.isnan(named["tumour"])
    with pytest.raises(ValueError, match="does not match"):
        dice_3d(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))


def test_summarize_report_and_table():
    meter = GroundingMeter()
    meter.add("ct_1.png", np.ones((2, 2), bool), np.ones((2, 2)))
    vqa = vqa_metrics([{"gt": "yes", "pred": "yes", "answer_type": "closed"}])
    report, table = summarize(grounding=meter, vqa=vqa, volume_dice={"liver": 0.9})
    assert report["grounding"]["mdice"] == 1.0 and report["vqa"]["closed"]["accuracy"] == 1.0
    assert report["volume_dice"] == {"liver": 0.9}
    json.dumps(report)  # JSON-serialisable
    assert "mIoU / mDice" in table and "100.00 / 100.00" in table and "90.00" in table


def test_skipped_answers_are_counted_in_the_tables_too():
    """An answer_type that is neither closed nor open is not scored; the printed tables say how many."""
    from monai_medplib.evaluation.mecovqa import build_report, format_table

    records = [
        {"gt": "CT", "pred": "ct", "answer_type": "Closed-ended", "task": "vqa", "question_kind": "modality"},
        {"gt": "yes", "pred": "yes", "answer_type": "closed", "task": "vqa", "question_kind": "visible"},
    ]
    _, table = summarize(vqa=vqa_metrics(records))
    assert "skipped (answer_type not closed / open)  1" in table
    report = build_report(records)
    assert report["vqa"]["per_task"]["vqa"]["n_skipped"] == 1
    assert "skipped (answer_type not closed / open)" in format_table(report)


def test_half_precision_logits_are_scored_like_float32():
    gt = np.zeros((4, 4), bool)
    gt[0, 0] = True  # sigmoid(-2) = 0.12 > 0.1: the whole image is predicted, IoU 1 / 16
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        meter = GroundingMeter()
        meter.add("ct_j.png", torch.full((4, 4), -2.0, dtype=dtype), gt)
        assert meter.result()["miou"] == pytest.approx(1 / 16), dtype


def test_an_undefined_dice_is_written_as_json_null(tmp_path):
    from monai_medplib.io.outputs import write_json

    scores = dice_3d(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), labels={"liver": 1})
    assert math.isnan(scores["liver"])
    path = write_json(tmp_path / "r.json", {"volume_dice": scores, "per_slice": [float("inf"), 0.5]})
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}")) == {
        "volume_dice": {"liver": None},
        "per_slice": [None, 0.5],
    }
