"""The MeCoVQA evaluator (``monai_medplib.evaluation``) and ``medplib eval``.

* scoring against hand-computed values (a stub pipeline returns hand-made mask logits);
* the random-weight fixture model through the real pipeline: a grounding answer without ``<SEG>`` scores 0;
* the CLI on a small split (fixture model).

The demo model's acceptance on the demo held-out split is in tests/integration/test_demo_model.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from monai_medplib.evaluation import RELEASE_TEST_FILES, evaluate_mecovqa, resolve_eval_files
from monai_medplib.metrics import mask_iou

SIZE = (40, 60)  # height, width of the hand-made images


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _conversation(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]


def _gt_box() -> np.ndarray:
    mask = np.zeros(SIZE, dtype=np.uint8)
    mask[0:10, 0:20] = 255  # 200 pixels
    return mask


def _make_split(root: Path, n: int = 3) -> Path:
    """``n`` images, each with one grounding (liver), one closed-VQA and one region-VQA entry (release names)."""
    rng = np.random.default_rng(0)
    grounding, closed, region = [], [], []
    for k in range(n):
        stem = f"ct_00--hand--case_0--z_{k:04d}"
        _write_png(root / "images" / f"{stem}.png", rng.integers(0, 255, SIZE, dtype=np.uint8))
        _write_png(root / "masks_merged" / f"{stem}--0001_merged.png", _gt_box())
        _write_png(root / "masks" / f"{stem}--region_0.png", _gt_box())
        image = f"images/{stem}.png"
        grounding.append(
            {
                "id": f"{stem}--0001",
                "image": image,
                "target": "liver",
                "conversations": _conversation(
                    "Please segment the liver.", f"<SEG><mask>masks_merged/{stem}--0001_merged.png</mask>"
                ),
            }
        )
        closed.append(
            {
                "id": f"{stem}--liver_visible",
                "image": image,
                "question_kind": "liver_visible",
                "answer_type": "closed",
                "conversations": _conversation("Is the liver visible in this image?", "yes"),
            }
        )
        region.append(
            {
                "id": f"{stem}--region_0",
                "image": image,
                "answer_type": "open",
                "conversations": _conversation(
                    f"What is inside <region>masks/{stem}--region_0.png</region>?", "liver"
                ),
            }
        )
    for task, entries in (("grounding", grounding), ("vqa", closed), ("region_vqa", region)):
        path = root / RELEASE_TEST_FILES[task]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(entries))
    return root


class _StubPipeline:
    """Stands in for MedPLIBPipeline: fixed grounding logits per call order, fixed answers."""

    template = "vicuna_v1"

    def __init__(self, logits: list[np.ndarray | None], answers: list[str]) -> None:
        self.logits, self.answers = list(logits), list(answers)

    def ground_batch(self, images, texts, **options):
        out = []
        for _ in images:
            logits = self.logits.pop(0)
            answer = "<SEG>" if logits is not None else "I cannot."
            out.append(SimpleNamespace(logits=logits, has_seg=logits is not None, answer=answer))
        return out

    def answer_batch(self, images, questions, **options):
        return [self.answers.pop(0) for _ in images]


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_split(tmp_path_factory.mktemp("mecovqa"))


@pytest.fixture(scope="module")
def fixture_pipeline(public_fixture: Path):
    from monai_medplib.pipeline import MedPLIBPipeline

    return MedPLIBPipeline.from_pretrained(public_fixture / "model", device="cpu")


def test_scores_hand_made_masks_release_way(split: Path) -> None:
    # sample 0: 10x10 box inside the 10x20 truth -> IoU 100 / 200 = 0.5
    first = np.full(SIZE, -10.0, dtype=np.float32)
    first[0:10, 0:10] = 10.0
    # sample 2: threshold 0.1 on sigmoid: logit -2.0 (p = 0.119) is foreground, -2.5 (p = 0.076) is not;
    # foreground rows 0..9, cols 0..39 -> |P & G| = 200, |P | G| = 400 -> IoU 0.5
    third = np.full(SIZE, -2.5, dtype=np.float32)
    third[0:10, 0:40] = -2.0
    stub = _StubPipeline([first, None, third], answers=["yes", "no", "Yes."])
    report, table, rows = evaluate_mecovqa(stub, split, tasks=["grounding", "vqa"], batch_size=2)
    ious = [r["iou"] for r in rows if r["task"] == "grounding"]
    assert ious == [0.5, 0.0, 0.5]  # sample 1 has no <SEG>: 0, as the release scores it
    truth = _gt_box() > 0
    assert ious[0] == mask_iou(first > 0, truth) and ious[2] == mask_iou(third > -2.197, truth)
    assert [r["dice"] for r in rows if r["task"] == "grounding"] == pytest.approx([2 / 3, 0.0, 2 / 3])
    g = report["grounding"]
    assert g["n"] == 3 and g["n_without_seg"] == 1
    assert g["miou"] == pytest.approx(1 / 3) and g["mdice"] == pytest.approx(4 / 9)
    assert g["per_modality"]["ct"]["n"] == 3 and g["per_target"]["liver"]["mdice"] == pytest.approx(4 / 9)
    # closed VQA: normalised exact match ("Yes." -> "yes"); per task and per question kind
    closed = report["vqa"]["per_task"]["vqa"]["closed"]
    assert closed == {"n": 3, "accuracy": pytest.approx(2 / 3)}
    assert report["vqa"]["per_kind"]["liver_visible"]["closed"]["accuracy"] == pytest.approx(2 / 3)
    assert "target liver" in table and "kind liver_visible" in table and "66.7" in table


def test_limit_and_file_resolution(split: Path, tmp_path: Path) -> None:
    stub = _StubPipeline([None] * 5, answers=["yes"] * 5)
    report, _, rows = evaluate_mecovqa(stub, split, limit=1, tasks=["grounding", "vqa"])
    assert len(rows) == 2 and report["samples"] == 2 and report["protocol"]["limit"] == 1
    explicit = {"vqa": str(split / RELEASE_TEST_FILES["vqa"])}  # absolute path
    assert resolve_eval_files(tmp_path, explicit) == {"vqa": split / RELEASE_TEST_FILES["vqa"]}
    assert list(resolve_eval_files(split)) == ["grounding", "vqa", "region_vqa"]
    with pytest.raises(ValueError, match="unknown evaluation task"):
        resolve_eval_files(split, tasks=["segmentation"])
    with pytest.raises(FileNotFoundError, match="region_vqa test file not found"):
        resolve_eval_files(tmp_path, tasks=["region_vqa"])
    with pytest.raises(FileNotFoundError, match="no MeCoVQA test file"):
        resolve_eval_files(tmp_path)


def test_a_bad_entry_stops_the_run_before_any_inference(tmp_path: Path) -> None:
    """Every file is read and checked first: a bad last entry must not throw away the inference before it."""
    split = _make_split(tmp_path / "split")
    calls = []
    stub = _StubPipeline([None] * 9, answers=["yes"] * 9)
    stub.ground_batch = lambda *a, **k: calls.append("ground") or _StubPipeline.ground_batch(stub, *a, **k)
    region_file = split / RELEASE_TEST_FILES["region_vqa"]
    entries = json.loads(region_file.read_text())
    entries[-1]["image"] = "images/gone.png"
    region_file.write_text(json.dumps(entries))
    with pytest.raises(
        FileNotFoundError, match=f"{region_file}: entry '{entries[-1]['id']}': image 'images/gone.png'"
    ):
        evaluate_mecovqa(stub, split)
    assert calls == []
    stem = "ct_00--hand--case_0--z_0001"
    _write_png(split / "masks_merged" / f"{stem}--0001_merged.png", np.zeros((40, 32), np.uint8))
    with pytest.raises(
        ValueError, match=f"grounding entry '{stem}--0001': its mask .* is 40 x 32, its image"
    ):
        evaluate_mecovqa(stub, split, tasks=["grounding"])
    (split / RELEASE_TEST_FILES["vqa"]).write_text("[]")
    with pytest.raises(ValueError, match="no test entries \\(an empty vqa split\\)"):
        evaluate_mecovqa(stub, split, tasks=["vqa"])
    assert calls == []


def test_random_weights_without_seg_score_zero_and_forced_seg_matches_mask_iou(
    split: Path, fixture_pipeline
) -> None:
    _, _, rows = evaluate_mecovqa(fixture_pipeline, split, tasks=["grounding"], max_new_tokens=3)
    assert rows and all("<SEG>" not in r["pred"] for r in rows)  # random weights never say <SEG> here
    assert all(r["iou"] == 0.0 and r["dice"] == 0.0 and not r["has_seg"] for r in rows)
    report, _, forced = evaluate_mecovqa(
        fixture_pipeline, split, tasks=["grounding"], force_seg=True, max_new_tokens=3
    )
    assert report["grounding"]["n_without_seg"] == 0
    truth = _gt_box() > 0
    for row in forced:
        mask = fixture_pipeline.ground(row["image"], "Please segment the liver.", force_seg=True).mask
        assert row["iou"] == pytest.approx(mask_iou(mask, truth), abs=1e-12)
    assert report["grounding"]["miou"] == pytest.approx(np.mean([r["iou"] for r in forced]))


def test_region_vqa_with_and_without_the_region(split: Path, fixture_pipeline) -> None:
    passed = evaluate_mecovqa(fixture_pipeline, split, tasks=["region_vqa"], max_new_tokens=3, limit=2)
    dropped = evaluate_mecovqa(
        fixture_pipeline, split, tasks=["region_vqa"], max_new_tokens=3, limit=2, official_eval_region=True
    )
    for evaluation in (passed, dropped):
        open_part = evaluation.report["vqa"]["per_task"]["region_vqa"]["open"]
        assert open_part["n"] == 2 and 0.0 <= open_part["f1"] <= 1.0
    assert dropped.report["protocol"]["official_eval_region"] is True
    # one answer of the batch equals the per-sample pipeline call
    row = passed.rows[0]
    mask = split / "masks" / f"{row['id']}.png"
    single = fixture_pipeline.answer_region(row["image"], row["question"], mask=str(mask), max_new_tokens=3)
    assert row["pred"] == single


def test_cli_writes_report_and_prints_table(
    split: Path, public_fixture: Path, tmp_path: Path, capsys
) -> None:
    from monai_medplib.cli import main

    out = tmp_path / "eval" / "report.json"
    argv = ["eval", "--data-root", str(split), "--model", str(public_fixture / "model"), "--device", "cpu"]
    argv += ["--limit", "2", "--force-seg", "--max-new-tokens", "3", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "mIoU / mDice" in printed and "closed accuracy" in printed and str(out) in printed
    report = json.loads(out.read_text())
    assert report["grounding"]["n"] == 2 and report["samples"] == 6 and report["model"].endswith("model")
    predictions = json.loads((out.parent / "report_predictions.json").read_text())["predictions"]
    assert len(predictions) == 6 and {p["task"] for p in predictions} == {"grounding", "vqa", "region_vqa"}
    assert main(["eval", "--data-root", str(split), "--file", "nonsense", "--out", str(out)]) == 2
    assert "TASK=PATH" in capsys.readouterr().err


def test_cli_keeps_the_predictions_scored_before_a_failure(
    split: Path, public_fixture: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """A device error on the third batch (hours into a release-size run) must not lose the two scored before it."""
    from monai_medplib.cli import main
    from monai_medplib.evaluation import mecovqa

    score, calls = mecovqa._Scorer.score, []

    def failing_third(self, task, samples):
        calls.append(task)
        if len(calls) == 3:
            raise RuntimeError("CUDA out of memory")
        return score(self, task, samples)

    monkeypatch.setattr(mecovqa._Scorer, "score", failing_third)
    out = tmp_path / "eval" / "report.json"
    argv = ["eval", "--data-root", str(split), "--model", str(public_fixture / "model"), "--device", "cpu"]
    argv += [
        "--limit",
        "2",
        "--batch-size",
        "1",
        "--max-new-tokens",
        "3",
        "--out",
        str(out),
        "--no-acceptance",
    ]
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        main(argv)
    saved = json.loads((out.parent / "report_predictions.json").read_text())
    assert [p["task"] for p in saved["predictions"]] == calls[:2] == ["grounding", "grounding"]
    assert saved["stopped_by"] == "RuntimeError: CUDA out of memory" and not out.exists()
    assert "the 2 predictions scored so far are in" in capsys.readouterr().err
