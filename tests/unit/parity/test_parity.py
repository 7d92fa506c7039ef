"""The verify-parity runner: passes on the public fixture, fails (naming the stage) on tampered ones."""

from __future__ import annotations

import json
import math
import shutil

import torch
from safetensors.torch import load_file, save_file

from monai_medplib.cli import main
from monai_medplib.parity import run_parity
from monai_medplib.parity.compare import (
    EXACT,
    Tolerance,
    compare_binary_mask,
    compare_tensor,
    compare_values,
    parse_tolerance,
    threshold_margin,
)


def test_public_fixture_passes_every_row(public_fixture, capsys):
    code = main(["verify-parity", str(public_fixture)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "PARITY OK" in out
    rows = [line.split() for line in out.splitlines()[2:] if line and line.split()[0] != "PARITY"][:-1]
    assert len(rows) >= 120
    assert all(row[-1] == "ok" for row in rows), [r for r in rows if r[-1] != "ok"]
    quantities = {(row[0], row[1]) for row in rows}
    # every kind of stage of every case is there (spot checks, not the full list)
    for expected in [
        ("tokenization", "ids_tokenizer_image_token"),
        ("a_vqa", "images_clip"),
        ("a_vqa", "prefill_hidden_states_tail"),
        ("a_vqa", "greedy.new_ids"),
        ("b_region_vqa", "region_grid24"),
        ("b_region_vqa", "region_feature"),
        ("b_region_vqa", "evalpath_greedy.new_ids"),
        ("c_grounding", "seg_hidden_state"),
        ("c_grounding", "low_res_masks"),
        ("c_grounding", "pred_mask_binary"),
        ("d_grounding_square", "pred_mask_logits"),
        ("d_vqa_square", "prefill_router_argmax"),
        ("c_grounding", "training"),  # the dataset's input_ids
        ("c_grounding", "tf_losses.loss"),
        ("d_grounding_square", "tf_losses.unscale_mask_iou_loss"),
    ]:
        assert expected in quantities, expected
    assert "0 failed, 0 not compared" in out


def _small_fixture(public_fixture, tmp_path, tamper=None):
    """One renamed case (the square VQA prefill, no generation) in a fresh fixture dir; ``tamper`` edits tensors."""
    root = tmp_path / "fixture"
    (root / "expected").mkdir(parents=True)
    (root / "model").symlink_to(public_fixture / "model")
    shutil.copytree(public_fixture / "inputs", root / "inputs")
    expected = json.loads((public_fixture / "expected" / "expected.json").read_text())
    case = expected["cases"]["d_vqa_square"]
    del case["greedy"]
    expected["cases"] = {"zz_custom_case": case}
    (root / "expected" / "expected.json").write_text(json.dumps(expected))
    prompts = json.loads((root / "inputs" / "prompts.json").read_text())
    prompts["cases"] = {"zz_custom_case": prompts["cases"]["d_vqa_square"]}
    (root / "inputs" / "prompts.json").write_text(json.dumps(prompts))
    tensors = load_file(str(public_fixture / "expected" / "d_vqa_square.safetensors"))
    del tensors["greedy_step_logits"]
    if tamper:
        tamper(tensors)
    save_file(tensors, str(root / "expected" / "zz_custom_case.safetensors"))
    return root


def test_case_names_come_from_the_fixture(public_fixture, tmp_path):
    report = run_parity(_small_fixture(public_fixture, tmp_path))
    assert report.ok
    assert {row.case for row in report.rows} == {"model", "fixture", "zz_custom_case"}
    assert any(row.quantity == "prefill_logits" and row.ok for row in report.rows)


def test_a_tampered_stage_fails_and_is_named(public_fixture, tmp_path, capsys):
    def tamper(tensors):
        tensors["mm_projector_out"] = tensors["mm_projector_out"] + 1e-3
        tensors["surprise_tensor"] = torch.zeros(3)

    root = _small_fixture(public_fixture, tmp_path, tamper)
    assert main(["verify-parity", str(root), "--failures-only"]) == 1
    out = capsys.readouterr().out
    assert "mm_projector_out" in out and "FAIL" in out and "PARITY FAILED" in out
    assert "clip_features" not in out  # stages before and after still pass
    report = run_parity(root)
    failing = {row.quantity for row in report.failures}
    assert failing == {"mm_projector_out"}
    skipped = [row for row in report.rows if row.ok is None]
    assert [row.quantity for row in skipped] == ["surprise_tensor"]


def test_training_losses_are_compared_with_the_fixture_weights(public_fixture, tmp_path):
    """The training path's rows: a tampered stored loss fails alone, a changed weight moves the weighted totals."""
    root = tmp_path / "fixture"
    (root / "expected").mkdir(parents=True)
    for name in ("model", "inputs"):
        (root / name).symlink_to(public_fixture / name)
    shutil.copy(public_fixture / "expected" / "d_grounding_square.safetensors", root / "expected")
    expected = json.loads((public_fixture / "expected" / "expected.json").read_text())
    case = expected["cases"]["d_grounding_square"]
    case["tf_losses"]["unscale_mask_iou_loss"] += 1e-3
    case["tf_loss_weights"]["iou"] = 3.0  # the stored totals were made with 2.0
    expected["cases"] = {"d_grounding_square": case}
    (root / "expected" / "expected.json").write_text(json.dumps(expected))
    report = run_parity(root)
    training = [row for row in report.rows if row.quantity.startswith(("tf_losses", "training"))]
    assert len(training) == 1 + 4 + len(case["tf_losses"])
    # mask_iou_loss is not stored; the weighted totals carry the extra IoU weight
    assert {row.quantity for row in report.failures} == {
        "tf_losses.unscale_mask_iou_loss",
        "tf_losses.loss",
        "tf_losses.mask_loss",
    }
    loss = next(row for row in report.failures if row.quantity == "tf_losses.loss")
    iou = case["tf_losses"]["unscale_mask_iou_loss"] - 1e-3
    assert math.isclose(loss.diff, iou, rel_tol=1e-3)  # one more unit of the IoU term


def test_strict_loading_failure_is_a_failed_row(public_fixture, tmp_path):
    root = _small_fixture(public_fixture, tmp_path)
    (root / "model").unlink()
    shutil.copytree(
        public_fixture / "model", root / "model", ignore=shutil.ignore_patterns("model.safetensors")
    )
    weights = load_file(str(public_fixture / "model" / "model.safetensors"))
    weights["model.unexpected.weight"] = torch.zeros(1)
    save_file(weights, str(root / "model" / "model.safetensors"))
    report = run_parity(root)
    assert not report.ok and report.failures[0].quantity == "strict load"
    assert "model.unexpected.weight" in report.failures[0].note


def test_tolerance_strings_of_the_fixture():
    assert parse_tolerance("max-abs <= 1e-4 (fp32)") == Tolerance(1e-4)
    assert parse_tolerance("max-abs <= 1e-3 (values span about +-20)") == Tolerance(1e-3)
    assert parse_tolerance("max-abs <= 1e-5 (bit-exact if PIL bilinear ...)") == Tolerance(1e-5)
    assert parse_tolerance("exact") == EXACT and parse_tolerance("exact (informational)") == EXACT
    assert parse_tolerance(None) == Tolerance(1e-4)
    entry = {"pixels_within_1e-3_of_threshold": 17, "pixels_within_1e-4_of_threshold": 0}
    assert threshold_margin(entry) == 1e-3 and threshold_margin({}) == 1e-3


def test_comparisons():
    a = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    assert compare_tensor("c", "x", a + 5e-5, a, Tolerance(1e-4)).ok
    row = compare_tensor("c", "x", a + 2e-4, a, Tolerance(1e-4))
    assert not row.ok and math.isclose(row.diff, 2e-4, rel_tol=1e-3)
    assert not compare_tensor("c", "x", a[0], a, Tolerance(1)).ok  # shape
    assert compare_tensor("c", "x", a.long(), a, EXACT).ok
    assert compare_tensor("c", "x", a + 1e-3, a, EXACT).diff == 4
    assert compare_values("c", "ids", [1, 2, 3], [1, 2, 3]).ok
    assert compare_values("c", "ids", [1, 9, 3, 4], [1, 2, 3]).diff == 2
    assert not compare_values("c", "text", "a", "b").ok


def test_binary_mask_margin_rule():
    threshold = math.log(0.1 / 0.9)
    logits = torch.tensor([[threshold + 5e-4, threshold + 0.5], [threshold - 2.0, threshold - 5e-4]])
    expected = torch.sigmoid(logits) > 0.1
    flipped_near = expected.clone()
    flipped_near[0, 0] = ~flipped_near[0, 0]
    flipped_near[1, 1] = ~flipped_near[1, 1]
    row = compare_binary_mask("c", "m", flipped_near, expected, logits, threshold, 1e-3)
    assert row.ok and row.diff == 0 and "2 px differ" in row.note
    flipped_far = expected.clone()
    flipped_far[0, 1] = ~flipped_far[0, 1]
    assert not compare_binary_mask("c", "m", flipped_far, expected, logits, threshold, 1e-3).ok


def test_not_a_fixture(tmp_path, capsys):
    assert main(["verify-parity", str(tmp_path)]) == 2
    assert "not a parity fixture" in capsys.readouterr().err
