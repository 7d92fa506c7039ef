"""MeCoVQA reader / dataset on a synthetic SA-Med2D tree (real PNGs) and on the upstream oracle's entries."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from monai_medplib.data.mecovqa import (
    MeCoVQADataset,
    collate_mecovqa,
    ensure_merged_mask,
    invalid_region_grid,
    read_mecovqa,
    release_sub_component,
)
from monai_medplib.tokenization import IGNORE_INDEX, REGION_TOKEN_INDEX, MedPLIBTokenizer

STEM = "ct_00--Synth--case_01--z_0007"
SQUARE = "mr_00--Synth--case_02--x_0003"


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture()
def tree(tmp_path):
    """SAMed2Dv1/ with a 40x60 CT slice (two instance masks of class 1) and a 336x336 MR slice (regions)."""
    root = tmp_path / "SAMed2Dv1"
    rng = np.random.default_rng(0)
    _png(root / "images" / f"{STEM}.png", rng.integers(0, 255, (40, 60), dtype=np.uint8))
    inst0 = np.zeros((40, 60), np.uint8)
    inst0[5:15, 5:20] = 255
    inst1 = np.zeros((40, 60), np.uint8)
    inst1[10:30, 30:50] = 1  # any value >= 1 is foreground
    _png(root / "masks" / f"{STEM}--0001_000.png", inst0)
    _png(root / "masks" / f"{STEM}--0001_001.png", inst1)
    _png(
        root / "masks" / f"{STEM}--0011_000.png", np.full((40, 60), 255, np.uint8)
    )  # another class: not merged
    _png(root / "images" / f"{SQUARE}.png", rng.integers(0, 255, (336, 336, 3), dtype=np.uint8))
    region = np.zeros((336, 336), np.uint8)
    region[28:84, 28:84] = 255  # grid cells 2..5 x 2..5 (16 cells)
    region[280:295, 280:295] = 255  # cells 20..21 x 20..21: a smaller, separate component
    _png(root / "masks" / f"{SQUARE}--region.png", region)
    _png(root / "masks" / f"{SQUARE}--empty.png", np.zeros((336, 336), np.uint8))
    _png(tmp_path / "llavamed" / "pmc_1.png", np.zeros((8, 8), np.uint8))
    entries = [
        {
            "id": "vqa-1",
            "image": f"images/{STEM}",  # no .png suffix (some release files)
            "conversations": [
                {"from": "human", "value": "Is this a CT image?\n<image>"},
                {"from": "gpt", "value": "Yes."},
            ],
            "answer_type": "closed",
        },
        {
            "id": "region-1",
            "image": f"images/{SQUARE}.png",
            "conversations": [
                {
                    "from": "human",
                    "value": f"<image>\nWhat is in <region>masks/{SQUARE}--region.png</region>?",
                },
                {"from": "gpt", "value": "A cyst."},
            ],
        },
        {
            "id": "seg-1",
            "image": f"images/{STEM}.png",
            "conversations": [
                {"from": "human", "value": "<image>\nPlease segment the liver."},
                {"from": "gpt", "value": f"<SEG><mask>masks_merged/{STEM}--0001_merged.png</mask>"},
            ],
        },
        {
            "id": "region-empty",
            "image": f"images/{SQUARE}.png",
            "conversations": [
                {
                    "from": "human",
                    "value": f"<image>\nWhat is in <region>masks/{SQUARE}--empty.png</region>?",
                },
                {"from": "gpt", "value": "Nothing."},
            ],
        },
    ]
    json_path = root / "MeCoVQA_test.json"
    json_path.write_text(json.dumps(entries))
    return root, json_path, inst0 > 0, inst1 > 0


@pytest.fixture(scope="module")
def tokenizer(public_fixture):
    return MedPLIBTokenizer.from_pretrained(public_fixture / "model")


def test_reader_resolves_paths_tasks_and_builds_merged_mask(tree):
    root, json_path, inst0, inst1 = tree
    records = read_mecovqa(json_path, root)
    assert [r.task for r in records] == ["vqa", "region_vqa", "grounding", "region_vqa"]
    assert records[0].image == root / "images" / f"{STEM}.png"  # ".png" added
    assert records[0].answer_type == "closed"
    assert records[1].region_paths == [root / "masks" / f"{SQUARE}--region.png"]
    assert records[1].turns[0].answer == "A cyst."
    merged_path = records[2].mask_paths[0]
    assert merged_path == root / "masks_merged" / f"{STEM}--0001_merged.png" and merged_path.is_file()
    merged = np.array(Image.open(merged_path)) > 0
    assert np.array_equal(merged, inst0 | inst1)  # OR of the class-1 instances only (class 11 left out)
    # cached: reading again reuses the file even when the instances are gone
    for path in (root / "masks").glob(f"{STEM}--0001_*.png"):
        path.unlink()
    assert read_mecovqa(json_path, root)[2].mask_paths[0] == merged_path


def test_reader_cache_dir_and_errors(tree, tmp_path):
    root, json_path, inst0, inst1 = tree
    cache = tmp_path / "cache"
    built = ensure_merged_mask(f"masks_merged/{STEM}--1_merged.png", root, cache)  # class id padded to 0001
    assert built == cache / "masks_merged" / f"{STEM}--1_merged.png"
    assert np.array_equal(np.array(Image.open(built)) > 0, inst0 | inst1)
    assert not (root / "masks_merged").exists()
    with pytest.raises(FileNotFoundError, match="no instance masks"):
        ensure_merged_mask(f"masks_merged/{STEM}--0002_merged.png", root)
    with pytest.raises(FileNotFoundError, match="mask file not found"):
        ensure_merged_mask("masks/nothing.png", root)

    def write(entries):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(entries))
        return path

    turn = {"from": "human", "value": "<image>\nq"}
    with pytest.raises(FileNotFoundError, match="entry 'x': image 'images/missing.png' not found"):
        read_mecovqa(write([{"id": "x", "image": "images/missing.png", "conversations": [turn]}]), root)
    square = f"images/{SQUARE}.png"
    with pytest.raises(ValueError, match="entry 'e': no human / gpt turns"):
        read_mecovqa(write([{"id": "e", "image": square, "conversations": []}]), root)
    for bad in (
        "<image>\nWhat is in <region></region>?",
        f"<image>\nWhat is in <region>masks/{SQUARE}--region.png?",
    ):
        question = [{"from": "human", "value": bad}, {"from": "gpt", "value": "A cyst."}]
        with pytest.raises(ValueError, match="entry 'r': a malformed <region>...</region> tag"):
            read_mecovqa(write([{"id": "r", "image": square, "conversations": question}]), root)
    no_seg = [turn, {"from": "gpt", "value": f"<mask>masks/{STEM}--0011_000.png</mask>"}]
    with pytest.raises(ValueError, match="<SEG>"):
        read_mecovqa(write([{"id": "x", "image": f"images/{STEM}.png", "conversations": no_seg}]), root)
    with pytest.raises(ValueError, match="'conversations'"):
        read_mecovqa(write([{"id": "x", "image": f"images/{STEM}.png"}]), root)
    llavamed = read_mecovqa(
        write([{"id": "m", "image": "llavamed/pmc_1.png", "conversations": [turn]}]), root
    )
    assert llavamed[0].image == root.parent / "llavamed" / "pmc_1.png"  # resolved one level above the root


def _supervised(item):
    return [i for i, lab in zip(item["input_ids"].tolist(), item["labels"].tolist()) if lab != IGNORE_INDEX]


def test_dataset_items(tree, tokenizer):
    root, json_path, inst0, inst1 = tree
    dataset = MeCoVQADataset(read_mecovqa(json_path, root), tokenizer)
    vqa, region, seg, empty = (dataset[i] for i in range(4))

    assert _supervised(vqa) == tokenizer.encode("Yes.", add_bos=False) + [tokenizer.eos_id]
    assert vqa["input_ids"].tolist().count(-200) == 1 and not vqa["has_seg"]
    assert vqa["images_clip"].shape == (3, 336, 336) and vqa["images_sam"].shape == (3, 256, 256)
    assert vqa["original_size"] == (40, 60) and vqa["resize"] == (171, 256)  # int(40 * 256/60 + 0.5)
    assert vqa["masks"].shape == (0, 40, 60) and vqa["region_grids"] == []

    ids = region["input_ids"].tolist()
    k = ids.index(REGION_TOKEN_INDEX)
    assert ids[k - 1] == tokenizer.region_start_id and ids[k + 1] == tokenizer.region_end_id
    expected_grid = torch.zeros(24, 24, dtype=torch.uint8)
    expected_grid[2:6, 2:6] = 1  # largest component only
    assert region["region_valid"] and torch.equal(region["region_grids"][0], expected_grid)

    assert _supervised(seg) == [tokenizer.seg_id, tokenizer.eos_id]
    assert seg["has_seg"] and seg["masks"].shape == (1, 40, 60)
    assert torch.equal(seg["masks"][0], torch.from_numpy((inst0 | inst1).astype(np.float32)))

    # empty region: release marks the sample invalid (nothing supervised) and uses its 40x40-px flag block
    assert not empty["region_valid"] and _supervised(empty) == []
    assert torch.equal(empty["region_grids"][0], invalid_region_grid())
    assert int(invalid_region_grid().sum()) == 9

    batch = collate_mecovqa([vqa, seg], pad_id=tokenizer.pad_id)
    lengths = [len(vqa["input_ids"]), len(seg["input_ids"])]
    assert batch["input_ids"][0] == vqa["input_ids"].tolist() and batch["labels"][1] == seg["labels"].tolist()
    assert batch["input_ids_padded"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    short = lengths.index(min(lengths))
    assert (batch["labels_padded"][short, min(lengths) :] == IGNORE_INDEX).all()
    assert (batch["input_ids_padded"][short, min(lengths) :] == tokenizer.pad_id).all()
    assert batch["images_clip"].shape == (2, 3, 336, 336) and batch["has_seg"] == [False, True]
    assert [m.shape[0] for m in batch["masks"]] == [0, 1] and batch["resizes"] == [(171, 256)] * 2
    truncated = collate_mecovqa([vqa, seg], max_length=10)
    assert truncated["input_ids_padded"].shape == (2, 10)


def test_release_sub_component_stays_inside_the_component():
    grid = torch.zeros(24, 24, dtype=torch.uint8)
    grid[3:5, 3:7] = 1  # 8 cells < 10: untouched
    assert torch.equal(release_sub_component(grid, random.Random(0)), grid)
    grid[3:9, 3:9] = 1  # 36 cells
    for seed in range(20):
        sub = release_sub_component(grid, random.Random(seed))
        assert int(sub.sum()) >= 10 and bool(((sub == 1) <= (grid == 1)).all())


def test_matches_upstream_dataset_on_oracle_entries(public_fixture, tokenizer, tmp_path):
    """The oracle's LLaVA entries through our reader + dataset (eval template v1) give the upstream tensors."""
    entries = json.loads((public_fixture / "inputs" / "dataset_entries.json").read_text())["entries"]
    expected = json.loads((public_fixture / "expected" / "expected.json").read_text())["cases"]
    json_path = tmp_path / "oracle.json"
    json_path.write_text(json.dumps([entries["c_grounding"], entries["b_region_vqa"]]))
    records = read_mecovqa(json_path, public_fixture / "inputs")
    dataset = MeCoVQADataset(records, tokenizer, template="vicuna_v1")
    seg, region = dataset[0], dataset[1]

    case = expected["c_grounding"]
    assert seg["input_ids"].tolist() == case["full_teacher_forced_ids"]
    assert _supervised(seg) == case["full_teacher_forced_ids"][-2:]  # <SEG> and </s>
    assert list(seg["resize"]) == case["resize"] and list(seg["original_size"]) == case["original_size"]
    stored = load_file(public_fixture / "expected" / "c_grounding.safetensors")
    assert torch.allclose(seg["images_sam"], stored["images_sam"][0], atol=1e-5)

    prompt_ids = expected["b_region_vqa"]["input_ids"]
    assert region["input_ids"].tolist()[: len(prompt_ids)] == prompt_ids
    grid = load_file(public_fixture / "expected" / "b_region_vqa.safetensors")["region_grid24_dataset_path"]
    assert torch.equal(region["region_grids"][0], grid.to(torch.uint8))


@pytest.mark.slow  # ~15 s: builds the oracle model and runs the full training forward
def test_oracle_entries_give_upstream_training_losses(public_fixture, tmp_path):
    """JSON entry -> our dataset -> training forward on the oracle weights = the upstream teacher-forced losses."""
    from monai_medplib.checkpoint import load_medplib
    from monai_medplib.training.forward import LossWeights, compute_losses

    model, _, tokenizer = load_medplib(public_fixture / "model")
    model.eval()
    entries = json.loads((public_fixture / "inputs" / "dataset_entries.json").read_text())["entries"]
    expected = json.loads((public_fixture / "expected" / "expected.json").read_text())["cases"]
    json_path = tmp_path / "oracle.json"
    json_path.write_text(json.dumps([entries["c_grounding"]]))
    dataset = MeCoVQADataset(
        read_mecovqa(json_path, public_fixture / "inputs"), tokenizer, template="vicuna_v1"
    )
    with torch.no_grad():
        out = compute_losses(
            model, collate_mecovqa([dataset[0]], pad_id=tokenizer.pad_id), tokenizer.seg_id, LossWeights()
        )
    reference = expected["c_grounding"]["tf_losses"]
    assert out["ce"].item() == pytest.approx(reference["ce_loss"], abs=1e-4)
    assert out["bce"].item() == pytest.approx(reference["unscale_mask_bce_loss"], abs=1e-4)
    assert out["dice"].item() == pytest.approx(reference["unscale_mask_dice_loss"], abs=1e-4)


def test_a_region_mask_of_another_size_is_refused(tree, tokenizer):
    """A region mask must cover its image: one of another size would be read as a shifted, rescaled region."""
    root, json_path, _, _ = tree
    _png(root / "masks" / "small-region.png", np.full((40, 32), 255, np.uint8))
    entries = json.loads(json_path.read_text())
    region = next(e for e in entries if e["id"] == "region-1")
    region["conversations"][0]["value"] = "<image>\nWhat is in <region>masks/small-region.png</region>?"
    json_path.write_text(json.dumps([region]))
    dataset = MeCoVQADataset(read_mecovqa(json_path, root), tokenizer)
    with pytest.raises(
        ValueError,
        match="entry 'region-1': region mask .*small-region.png is \\(40, 32\\), image is \\(336, 336\\)",
    ):
        dataset[0]
