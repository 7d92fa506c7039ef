"""The demo dataset builder on two small synthetic volumes (a "CT" and an "MR"), and the real MNI152 reader."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from monai_medplib.data.demo_dataset import build_demo_dataset, region_masks
from monai_medplib.data.demo_prompts import ABSENT_ANSWER, CLOSED_QUESTIONS, NAMING_QUESTIONS, TARGETS
from monai_medplib.data.demo_slices import (
    CT_REGION_LABELS,
    CT_TARGET_LABELS,
    MR_REGION_LABELS,
    MR_TARGET_LABELS,
    DemoVolume,
    iter_slices,
)


def _planes(num: int, size: int, seed: int, ring: bool):
    """Slices with a disc of label 1 holding a smaller disc of label 2 (``ring``: label 2 in the middle)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.ogrid[:size, :size]
    out = {}
    for plane in ("axial", "coronal", "sagittal"):
        images, labels = [], []
        for i in range(num):
            outer = (rows - size // 2) ** 2 + (cols - size // 2) ** 2 <= (size // 3) ** 2
            inner = (rows - size // 2) ** 2 + (cols - size // 2 - (0 if ring else 3)) ** 2 <= (size // 6) ** 2
            label = np.where(inner, 2, np.where(outer, 1, 0)).astype(np.uint8)
            if i == 0:
                label[:] = 0  # an empty edge slice: every structure absent
            images.append(
                (30 + 100 * (label > 0) + 50 * (label == 2) + rng.integers(0, 20, label.shape)).astype(
                    np.uint8
                )
            )
            labels.append(label)
        out[plane] = (images, labels)
    return out


@pytest.fixture(scope="module")
def volumes():
    ct = DemoVolume(
        "ct", "CT", "ct_00--T--c", CT_TARGET_LABELS, CT_REGION_LABELS, planes=_planes(10, 40, 0, False)
    )
    mr = DemoVolume(
        "mr", "MR", "mr_00--T--m", MR_TARGET_LABELS, MR_REGION_LABELS, planes=_planes(10, 48, 1, True)
    )
    return [ct, mr]


@pytest.fixture(scope="module")
def built(volumes, tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    summary = build_demo_dataset(root, test_fraction=0.2, gap=1, volumes=volumes, copies=3, max_turns=4)
    load = lambda rel: json.loads((root / rel).read_text())  # noqa: E731
    return root, summary, load


def test_presence_is_true_false_or_ambiguous(volumes):
    ct, mr = volumes
    s = next(iter_slices([ct], ("train",)))
    assert s.index == 0 and not any(s.presence.values())  # the empty edge slice
    s = next(iter_slices([mr], ("test",)))
    assert s.presence["brain"] and s.presence["grey matter"] and s.presence["white matter"]
    assert s.presence["liver"] is False and s.presence["tumour"] is False  # another modality's structures


def test_grounding_rounds_ask_for_shown_and_absent_structures(built):
    root, summary, load = built
    rounds = [
        (e, q["value"], a["value"])
        for e in load("train/MeCoVQA-Grounding.json")
        for q, a in zip(e["conversations"][::2], e["conversations"][1::2])
    ]
    assert max(len(e["conversations"]) for e in load("train/MeCoVQA-Grounding.json")) > 2  # several targets
    naming = [r for r in rounds if r[1].endswith(NAMING_QUESTIONS)]
    rounds = [r for r in rounds if r not in naming]
    seg = [r for r in rounds if r[2].startswith("<SEG><mask>masks_merged/")]
    absent = [r for r in rounds if "<SEG>" not in r[2]]
    assert seg and absent and len(seg) + len(absent) == len(rounds)
    # naming rounds: "<request> Which structure does this request name?" -> the canonical name of its target
    assert naming and all(
        a in TARGETS and any(n in q.split("?")[0] for n in TARGETS[a].names) for _, q, a in naming
    )
    sentences = {ABSENT_ANSWER.format(target=t) for t in TARGETS}
    assert {a for _, _, a in absent} <= sentences
    # an MR slice is asked for the liver (and answered without <SEG>); a CT slice is never given a brain mask
    assert any(e["modality"] == "MR" and "liver" in q for e, q, a in absent)
    assert not any(e["modality"] == "CT" and ("brain" in q or "matter" in q) for e, q, _ in seg)
    # every mask named exists and matches its image's size
    for e, _, a in seg[:20]:
        mask = re.search(r"<mask>(.*)</mask>", a).group(1)
        assert (root / mask).is_file() and (root / e["image"]).is_file()


def test_closed_vqa_is_balanced_and_held_out_wordings_stay_out_of_training(built):
    _, _, load = built
    answers = [t["value"] for e in load("train/MeCoVQA-Complex.json") for t in e["conversations"][1::2]]
    yes, no = answers.count("yes"), answers.count("no")
    assert yes and no and 0.6 < yes / no < 1.7
    assert {"CT", "MRI"} <= set(answers) and {"axial", "coronal", "sagittal"} <= set(answers)
    asked = {
        t["value"].replace("<image>\n", "")
        for n in ("MeCoVQA-Complex.json", "MeCoVQA-Grounding.json")
        for e in load(f"train/{n}")
        for t in e["conversations"][::2]
    }
    for sets in CLOSED_QUESTIONS.values():
        phrases = [p for t in TARGETS.values() for p in t.noun_phrases]
        held_out = {w.format(target=p) for w in sets["held_out"] for p in phrases}
        trained = {w.format(target=p) for w in sets["train"] for p in phrases}
        assert not held_out & asked and asked & trained
    test = load("test/MeCoVQA_Complex_VQA_test.json")
    assert {e["wording"] for e in test} == {"train", "held_out"}
    assert all(len(e["conversations"]) == 2 for e in test)  # one round per test entry


def test_plane_questions_are_asked_about_whole_slices_only(built):
    _, _, load = built
    plane_questions = {q for sets in [CLOSED_QUESTIONS["plane"]] for q in sets["train"]}
    about = [
        e["image"]
        for e in load("train/MeCoVQA-Complex.json")
        for t in e["conversations"][::2]
        if t["value"].replace("<image>\n", "") in plane_questions
    ]
    crops = [e for e in load("train/MeCoVQA-Complex.json") if "--crop_" in e["image"]]
    assert about and crops  # both kinds exist, and no plane question is about a crop
    assert not [image for image in about if "--crop_" in image]


def test_regions_cover_the_five_classes_and_lie_inside_their_class(volumes, built):
    import random

    _, _, load = built
    answers = {t["value"] for e in load("train/MeCoVQA-Region.json") for t in e["conversations"][1::2]}
    assert {"liver", "tumour", "grey matter", "white matter", "background"} <= answers
    s = next(iter_slices(volumes[:1], ("test",)))
    for cls, mask in region_masks(s, random.Random(0)):
        assert mask.any() and s.region_class_map()[cls][mask].all()


def test_split_keeps_the_held_out_slab_out_of_training(built):
    root, summary, load = built
    assert summary["split"]["ct"]["axial"]["test"] == [4, 5] and summary["split"]["mr"]["sagittal"][
        "gap"
    ] == [3, 6]
    train_images = {
        e["image"] for n in ("Grounding", "Complex", "Region") for e in load(f"train/MeCoVQA-{n}.json")
    }
    test_images = {e["image"] for e in load("test/MeCoVQA_Grounding_test.json")}
    assert test_images and not train_images & test_images
    assert not any(re.search(r"_000[3-6]\.png", p) for p in train_images)  # gap (3, 6) and test (4, 5)


def test_mni_reader_thresholds_the_tissue_maps_and_keeps_the_geometry():
    import nibabel as nib

    from monai_medplib.data.mni import MNI_CUBE, MNI_FILES, load_mni_case, mni_data_dir

    case = load_mni_case()
    assert case.image.shape == case.label.shape == (MNI_CUBE,) * 3
    grey = nib.load(str(mni_data_dir() / MNI_FILES["gm"]))
    probability = np.asarray(grey.dataobj, dtype=np.float32) / 255.0
    # the same world point in the source map and in the cube: voxel (100, 110, 80) of the source
    world = grey.affine @ np.array([100, 110, 80, 1.0])
    ijk = np.round(np.linalg.inv(case.affine) @ world).astype(int)[:3]
    assert (case.label[tuple(ijk)] == 1) == (probability[100, 110, 80] >= 0.5)
    assert (case.label == 1).sum() == (probability >= 0.5).sum()  # no grey-matter voxel lost by the crop


def test_a_held_out_build_alone_is_the_held_out_part_of_the_full_build(built, volumes, tmp_path):
    """One random stream draws every slice in volume order: building the test split alone must still give the
    very test files of the build the model was trained beside (the ones its card reports), and no training file."""
    root, _, _ = built
    alone = tmp_path / "alone"
    build_demo_dataset(
        alone, test_fraction=0.2, gap=1, volumes=volumes, copies=3, max_turns=4, splits=("test",)
    )
    for name in sorted(p.name for p in (root / "test").iterdir()):
        assert (alone / "test" / name).read_text() == (root / "test" / name).read_text(), name
    assert all(json.loads(p.read_text()) == [] for p in (alone / "train").iterdir())
    tests = {e["image"] for p in (alone / "test").iterdir() for e in json.loads(p.read_text())}
    assert sorted(p.name for p in (alone / "images").iterdir()) == sorted(t.split("/")[-1] for t in tests)


def test_evaluation_data_is_built_with_the_recipe_s_settings(tmp_path, monkeypatch):
    """medplib eval's default held-out split is the one the model card reports: built with RECIPE_DATA, and built
    again over a folder of other settings."""
    from monai_medplib.commands import eval as eval_command
    from monai_medplib.data import demo_dataset

    calls = []

    def fake_build(folder, **kwargs):
        calls.append(kwargs)
        (folder / "split.json").parent.mkdir(parents=True, exist_ok=True)
        (folder / "split.json").write_text(json.dumps({"volumes": {}, **demo_dataset.RECIPE_DATA}))

    monkeypatch.setattr(demo_dataset, "build_demo_dataset", fake_build)
    (tmp_path / "split.json").write_text(json.dumps({"volumes": {}, "seed": 0, "copies": 1, "max_turns": 1}))
    eval_command.demo_data_root(tmp_path)
    assert calls == [{"splits": ("test",), **demo_dataset.RECIPE_DATA}]
    eval_command.demo_data_root(tmp_path)  # now of the recipe's settings: kept
    assert len(calls) == 1
