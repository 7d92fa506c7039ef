"""The acceptance report's building blocks: simulated clicks, balanced accuracy, the threshold checks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from monai_medplib.evaluation.acceptance import (
    ACCEPTANCE,
    CLICK_GAIN,
    _balanced,
    acceptance_checks,
    format_acceptance,
)
from monai_medplib.evaluation.clicks import dice, next_click, simulate_clicks


def test_dice_of_hand_made_masks():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert dice(a, b) == 1.0
    a[0, :2] = True
    b[0, 1:3] = True
    assert dice(a, b) == 0.5  # 2 * 1 / (2 + 2)


def test_next_click_goes_to_the_middle_of_the_largest_error():
    gt = np.zeros((20, 20), bool)
    gt[2:9, 2:9] = True  # 49 px structure, entirely missed
    pred = np.zeros((20, 20), bool)
    pred[14:17, 14:17] = True  # 9 px false positive
    (x, y), label = next_click(pred, gt)
    assert label == 1 and (x, y) == (5.0, 5.0)  # the centre of the missed square
    pred[2:9, 2:9] = True  # now only the false positive is wrong
    (x, y), label = next_click(pred, gt)
    assert label == 0 and (x, y) == (15.0, 15.0)
    assert next_click(gt, gt) is None


@dataclass
class _Result:
    mask: np.ndarray


class _Clicker:
    """Stands in for the pipeline: a positive click adds a 3x3 square, a negative one removes it."""

    def __init__(self) -> None:
        self.calls = []

    def refine(self, image, points, labels, prior):
        self.calls.append((list(points), list(labels)))
        mask = prior.mask.copy()
        x, y = (int(v) for v in points[-1])
        mask[y - 1 : y + 2, x - 1 : x + 2] = labels[-1] == 1
        return _Result(mask)


def test_simulate_clicks_passes_every_click_so_far_and_scores_each_step():
    gt = np.zeros((12, 12), bool)
    gt[1:4, 1:4] = gt[7:10, 7:10] = True
    prior = _Result(np.zeros((12, 12), bool))
    pipe = _Clicker()
    trace = simulate_clicks(pipe, None, gt, prior, clicks=3)
    assert trace.first_label == 1
    assert trace.dice == [0.0, 2 * 9 / 27, 1.0, 1.0]  # one square, both squares, exact (no third call)
    assert [len(points) for points, _ in pipe.calls] == [1, 2]


def test_balanced_accuracy_and_checks():
    rows = [("yes", True)] * 9 + [("no", False)] * 1
    scores = _balanced(rows)
    assert scores["accuracy"] == 0.9 and scores["balanced_accuracy"] == 0.5  # majority answer only
    figures = {
        name: (threshold if op != ">" else threshold + 0.01) for name, (op, threshold) in ACCEPTANCE.items()
    }
    assert all(acceptance_checks(figures).values())
    figures["mdice tumour"] = 0.49
    figures["liver vs tumour mask dice"] = None  # not measured: fails
    checks = acceptance_checks(figures)
    assert not checks["mdice tumour"] and not checks["liver vs tumour mask dice"]


def test_a_figure_not_asked_for_is_skipped_not_failed():
    """``medplib eval --clicks 0`` ("0 skips") printed the click check as NO and stored false."""
    figures = {name: None for name in ACCEPTANCE}
    checks = acceptance_checks(figures, skipped=[CLICK_GAIN])
    assert checks[CLICK_GAIN] is None and checks["mdice liver"] is False
    report = {
        "figures": figures,
        "checks": checks,
        "grounding": {"mean_over_targets": 0.5, "zero_prompt_mean_over_targets": 0.1, "clicks": {}},
    }
    lines = {line.split("  ")[0].strip(): line for line in format_acceptance(report).splitlines()}
    assert lines[CLICK_GAIN].endswith("skipped") and lines["mdice liver"].endswith("NO")
