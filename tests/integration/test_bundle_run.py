"""The MONAI Bundle end to end on CPU with the tiny random-weight fixture model: metadata against the kept copy of
MONAI's published schema, inference (2D, NIfTI volume, DICOM series -> DICOM-SEG), evaluation, a few training steps,
cohorts (resumable on prompt and settings, a broken study reported, exit code 1), ``torchrun`` with 2 gloo processes
and ``python -m monai.bundle run`` (a bad prompt: one line, exit code 2).

Random weights: the tests assert structure, geometry and error handling, not medical quality.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.bundle import ConfigWorkflow, verify_metadata
from PIL import Image

from monai_medplib.adapters.bundle.errors import StudiesFailed
from monai_medplib.adapters.bundle.runner import load_pipeline
from monai_medplib.io import write_dicom_series
from tests.support.paths import REPO

BUNDLE = REPO / "bundle"
CONFIGS = BUNDLE / "configs"
SCHEMA = BUNDLE / "schema" / "meta_schema_20240725.json"
AFFINE = np.array(
    [[-1.5, 0, 0, 30.0], [0, -1.2, 0, 12.0], [0, 0, 2.5, -40.0], [0, 0, 0, 1]]
)  # LPS-like, anisotropic
SHAPE = (20, 16, 6)


@pytest.fixture(scope="module")
def model_dir(public_fixture: Path) -> Path:
    return public_fixture / "model"


@pytest.fixture(scope="module")
def pipeline(model_dir: Path):
    return load_pipeline(str(model_dir), device="cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundle_data")
    rng = np.random.default_rng(0)
    volume = np.round(rng.normal(40, 60, SHAPE)).astype(np.float32)  # integer HU, as CT stores them
    nib.save(nib.Nifti1Image(volume, AFFINE), root / "ct_a.nii.gz")
    write_dicom_series(volume, AFFINE, root / "ct_dicom")
    Image.fromarray(rng.integers(0, 255, (30, 44), dtype=np.uint8)).save(root / "xray.png")
    return {"root": root, "nii": root / "ct_a.nii.gz", "dicom": root / "ct_dicom", "png": root / "xray.png"}


def _infer(
    tmp_path: Path, pipeline, input_dict: dict, configs=("inference.json",), **override
) -> ConfigWorkflow:
    workflow = ConfigWorkflow(
        workflow_type="infer",
        config_file=[str(CONFIGS / c) for c in configs],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        bundle_root=str(BUNDLE),
        output_dir=str(tmp_path / "out"),
        network_def=pipeline,  # the loaded fixture model (ckpt loading is tested on its own below)
        max_new_tokens=4,
        force_seg=True,
        input_dict=input_dict,
        **override,
    )
    workflow.initialize()
    return workflow


def test_metadata_verifies_offline_against_vendored_schema(tmp_path: Path) -> None:
    verify_metadata(
        meta_file=str(CONFIGS / "metadata.json"), filepath=str(SCHEMA)
    )  # file exists: no download
    broken = json.loads((CONFIGS / "metadata.json").read_text())
    del broken["network_data_format"]["inputs"]["text"]["value_range"]
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="'value_range' is a required property"):  # a tensor needs it
        verify_metadata(meta_file=str(bad), filepath=str(SCHEMA))
    del broken["version"]
    bad.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="'version' is a required property"):
        verify_metadata(meta_file=str(bad), filepath=str(SCHEMA))
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    # volumes in, 3D labels out; 2D images are described in their own block
    assert len(meta["network_data_format"]["outputs"]["pred"]["spatial_shape"]) == 3
    assert len(meta["image2d_data_format"]["outputs"]["pred"]["spatial_shape"]) == 2


def test_ckpt_path_loads_the_model_through_the_config(tmp_path: Path, model_dir: Path, data) -> None:
    workflow = ConfigWorkflow(
        workflow_type="infer",
        config_file=str(CONFIGS / "inference.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        bundle_root=str(BUNDLE),
        ckpt_path=str(model_dir),
        output_dir=str(tmp_path / "out"),
        max_new_tokens=4,
        input_dict={"image": str(data["png"]), "question": "What is shown?"},
    )
    workflow.initialize()
    (result,) = workflow.run()[0]
    assert isinstance(result["vqa"]["answer"], str)
    assert json.loads(Path(result["outputs"]["answer"]).read_text())["vqa"]["question"] == "What is shown?"
    missing = ConfigWorkflow(
        workflow_type="infer",
        config_file=str(CONFIGS / "inference.json"),
        logging_file=False,
        bundle_root=str(tmp_path),
        ckpt_path="release",
        input_dict={"image": str(data["png"]), "question": "q"},
    )
    missing.initialize()
    with pytest.raises(RuntimeError) as raised:
        missing.run()
    assert "hf download Huangxs/MedPLIB-7b-2e" in str(raised.value.__cause__)


def test_volume_grounding_keeps_the_input_geometry(tmp_path: Path, pipeline, data) -> None:
    prompt = {
        "image": str(data["nii"]),
        "text": ["Please segment the liver.", "Segment the tumour."],
        "slices": [2, 3],
    }
    (result,) = _infer(tmp_path, pipeline, prompt).run()[0]
    label = nib.load(result["outputs"]["label"])
    assert label.shape == SHAPE and label.get_data_dtype() == np.uint8
    np.testing.assert_allclose(label.affine, AFFINE, atol=1e-5)
    values = np.asarray(label.dataobj)
    # only the two requested axial slices (voxel axis 2 here) can hold labels
    assert not values[:, :, [0, 1, 4, 5]].any()
    assert set(np.unique(values)) <= {0, 1, 2}
    saved = json.loads((tmp_path / "out" / "ct_a" / "ct_a_answer.json").read_text())
    targets = saved["grounding"]["targets"]
    assert {t: v["label"] for t, v in targets.items()} == {
        "Please segment the liver.": 1,
        "Segment the tumour.": 2,
    }
    assert saved["grounding"]["slices"] == [2, 3]
    assert targets["Segment the tumour."]["slices_with_seg"] == [2, 3]  # forced <SEG>
    assert sum(v["voxels"] for v in targets.values()) == int((values > 0).sum())


def test_keyframes_setting_runs_the_llm_on_key_slices(tmp_path: Path, pipeline, data) -> None:
    prompt = {"image": str(data["nii"]), "text": "Please segment the liver."}
    (result,) = _infer(tmp_path, pipeline, prompt, keyframes=4).run()[0]
    paths = result["grounding"]["paths"]
    by_path = result["grounding"]["targets"]["Please segment the liver."]["slice_paths"]
    # 6 axial slices, k = 4: keys 0, 4 and 5, plus what the adaptive check adds between 0 and 4
    assert paths["keyframes"] == 4 and by_path["key"] == 3 and sum(by_path.values()) == 6
    assert paths["llm_passes"] == 6 - by_path.get("propagated", 0)
    assert result["resume_key"] != _infer(tmp_path, pipeline, prompt).run()[0][0]["resume_key"]


def test_resume_keys_follow_the_dtype_and_the_prompt_template(tmp_path: Path, model_dir: Path, data) -> None:
    """bf16 changes masks and the template changes the prompt: a cohort re-run with either redoes its studies."""
    prompt = {"image": str(data["png"]), "question": "What is this?"}
    keys = {}
    for dtype, template in (("float32", "vicuna_v1"), ("bfloat16", "vicuna_v1"), ("float32", "llava_v1")):
        pipe = load_pipeline(str(model_dir), device="cpu", dtype=dtype, template=template)
        (result,) = _infer(tmp_path / f"{dtype}_{template}", pipe, prompt).run()[0]
        keys[dtype, template] = result["resume_key"]
    assert len(set(keys.values())) == 3, keys


def test_dicom_series_gets_a_dicom_seg(tmp_path: Path, pipeline, data) -> None:
    (result,) = _infer(
        tmp_path, pipeline, {"image": str(data["dicom"]), "text": "liver", "slices": [1]}
    ).run()[0]
    label = nib.load(result["outputs"]["label"])
    assert label.shape == SHAPE
    labelled = int((np.asarray(label.dataobj) > 0).sum())
    assert labelled > 0  # the forced <SEG> of the fixture model marks voxels on slice 1 (deterministic)
    seg = pydicom.dcmread(result["outputs"]["dicom_seg"])
    assert seg.Modality == "SEG" and seg.SegmentSequence[0].SegmentLabel == "liver"
    sources = {pydicom.dcmread(p).SOPInstanceUID for p in data["dicom"].iterdir()}
    referenced = {
        r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert referenced <= sources and referenced
    assert int(np.asarray(seg.pixel_array).sum()) == labelled


def test_2d_grounding_region_vqa_and_volume_vqa(tmp_path: Path, pipeline, data) -> None:
    (ground,) = _infer(tmp_path, pipeline, {"image": str(data["png"]), "text": "Segment the lung."}).run()[0]
    mask = np.asarray(Image.open(ground["outputs"]["label"]))
    assert mask.shape == (30, 44) and set(np.unique(mask)) <= {0, 255}  # one text: a 0 / 255 mask, as the CLI
    assert ground["grounding"]["foreground_pixels"]["Segment the lung."] == int((mask == 255).sum())
    texts = ["Segment the lung.", "Segment the heart."]
    (two,) = _infer(tmp_path, pipeline, {"image": str(data["png"]), "text": texts, "id": "two"}).run()[0]
    label = np.asarray(Image.open(two["outputs"]["label"]))
    assert set(np.unique(label)) <= {0, 1, 2}  # several texts: a label map, value n = the n-th text
    for n, text in enumerate(texts, start=1):
        per_text = np.asarray(Image.open(two["outputs"]["masks"][text]))
        assert set(np.unique(per_text)) <= {0, 255} and np.array_equal(per_text == 255, label == n)
    region = {
        "image": str(data["png"]),
        "question": "What is here?",
        "points": [[10, 12]],
        "id": "xray_region",
    }
    (answer,) = _infer(tmp_path, pipeline, region).run()[0]
    assert isinstance(answer["region_vqa"]["answer"], str) and "outputs" in answer
    volume_q = {"image": str(data["nii"]), "question": "What is here?", "points": [[5, 6, 4]], "id": "vq"}
    (vq,) = _infer(tmp_path, pipeline, volume_q).run()[0]
    assert vq["region_vqa"]["slice_index"] == 4  # the point's axial slice
    (whole,) = _infer(
        tmp_path, pipeline, {"image": str(data["nii"]), "question": "Which organ?", "id": "w"}
    ).run()[0]
    assert list(whole["vqa"]["answers"]) == [str(SHAPE[2] // 2)]  # middle axial slice by default


def test_a_single_frame_dicom_file_is_a_2d_image_and_a_multi_frame_one_a_volume(
    tmp_path: Path, pipeline
) -> None:
    """pydicom's real CT_small.dcm (one frame) is grounded as the CLI grounds it; emri_small.dcm (10 frames) is a
    volume."""
    import shutil

    from pydicom.data import get_testdata_file

    from monai_medplib.adapters.bundle.prompts import parse_prompt
    from monai_medplib.io.dicom_image import read_dicom_image

    single = Path(shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "ct_small.dcm"))
    (result,) = _infer(tmp_path, pipeline, {"image": str(single), "text": "liver"}).run()[0]
    assert result["kind"] == "image"
    mask = np.asarray(Image.open(result["outputs"]["label"]))
    expected = pipeline.ground(
        read_dicom_image(single), "Please segment the liver.", force_seg=True, max_new_tokens=4
    )
    assert mask.shape == (128, 128) and np.array_equal(mask == 255, np.asarray(expected.mask) > 0)
    region = {"image": str(single), "question": "What is here?", "points": [[60, 70]], "id": "ct_region"}
    (answer,) = _infer(tmp_path, pipeline, region).run()[0]
    assert isinstance(answer["region_vqa"]["answer"], str)
    with pytest.raises(ValueError, match=r"points.*\[\[x, y\], \.\.\.\] pixels of the image"):
        parse_prompt({**region, "points": [[60, 70, 0]]})  # a 2D image takes [x, y] points
    multi = Path(shutil.copy(get_testdata_file("emri_small.dcm"), tmp_path / "emri_small.dcm"))
    (volume,) = _infer(tmp_path, pipeline, {"image": str(multi), "question": "Which organ?"}).run()[0]
    assert volume["kind"] == "volume" and list(volume["vqa"]["answers"]) == ["5"]  # the middle of 10 frames


def _mecovqa_split(root: Path) -> Path:
    """Two images with a grounding, a closed-VQA and a region-VQA record each, train and test alike."""
    for folder in ("images", "masks", "masks_merged", "train", "test"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    grounding, closed, region = [], [], []
    for n in range(2):
        stem = f"ct_00--demo--case_{n}--z_{n:04d}"
        Image.fromarray(rng.integers(0, 255, (48, 64), dtype=np.uint8)).save(root / "images" / f"{stem}.png")
        mask = np.zeros((48, 64), dtype=np.uint8)
        mask[10:30, 20:40] = 255
        Image.fromarray(mask).save(root / "masks_merged" / f"{stem}--0001_merged.png")
        Image.fromarray(mask).save(root / "masks" / f"{stem}--region_0.png")
        image = f"images/{stem}.png"
        grounding.append(
            {
                "id": stem,
                "image": image,
                "conversations": [
                    {"from": "human", "value": "<image>\nPlease segment the liver."},
                    {"from": "gpt", "value": f"<SEG><mask>masks_merged/{stem}--0001_merged.png</mask>"},
                ],
            }
        )
        closed.append(
            {
                "id": stem,
                "image": image,
                "answer_type": "closed",
                "conversations": [
                    {"from": "human", "value": "<image>\nIs the liver visible?"},
                    {"from": "gpt", "value": "yes"},
                ],
            }
        )
        region.append(
            {
                "id": stem,
                "image": image,
                "answer_type": "open",
                "conversations": [
                    {
                        "from": "human",
                        "value": f"<image>\nWhat is in <region>masks/{stem}--region_0.png</region>?",
                    },
                    {"from": "gpt", "value": "liver"},
                ],
            }
        )
    names = {
        "train": ("MeCoVQA-Grounding.json", "MeCoVQA-Complex.json", "MeCoVQA-Region.json"),
        "test": (
            "MeCoVQA_Grounding_test.json",
            "MeCoVQA_Complex_VQA_test.json",
            "MeCoVQA_Region_VQA_test.json",
        ),
    }
    for split, files in names.items():
        for name, entries in zip(files, (grounding, closed, region)):
            (root / split / name).write_text(json.dumps(entries))
    return root


def test_evaluate_on_a_small_split(tmp_path: Path, pipeline) -> None:
    root = _mecovqa_split(tmp_path / "mecovqa")
    workflow = _infer(
        tmp_path, pipeline, {}, configs=("inference.json", "evaluate.json"), dataset_dir=str(root)
    )
    (report,) = workflow.run()
    assert (
        report["grounding"]["n"] == 2
        and report["vqa"]["closed"]["n"] == 2
        and report["vqa"]["open"]["n"] == 2
    )
    predictions = json.loads((tmp_path / "out" / "predictions.json").read_text())["predictions"]
    ious = [p["iou"] for p in predictions if p["task"] == "grounding"]
    assert report["grounding"]["miou"] == pytest.approx(sum(ious) / 2)
    assert report["grounding"]["mdice"] == pytest.approx(sum(2 * i / (1 + i) for i in ious) / 2)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["samples"] == 6


def test_cohort_is_resumable_and_reports_a_broken_study(tmp_path: Path, pipeline, data) -> None:
    studies = tmp_path / "studies"
    studies.mkdir()
    for name in ("p1", "p2"):
        (studies / f"{name}.nii.gz").write_bytes(data["nii"].read_bytes())
    (studies / "broken.nii.gz").write_text("not a NIfTI file")
    configs = ("inference.json", "batch_inference.json")
    prompt = {"text": "Please segment the liver.", "slices": [2]}
    first = _infer(tmp_path, pipeline, {}, configs=configs, studies_dir=str(studies), prompt=prompt).run()[0]
    assert first["done"] == ["p1", "p2"] and first["skipped"] == []
    assert [f["id"] for f in first["failed"]] == ["broken"]
    report = json.loads((tmp_path / "out" / "cohort_report.json").read_text())
    assert report["failed"][0]["image"].endswith("broken.nii.gz")
    cohort = _infer(tmp_path, pipeline, {}, configs=configs, studies_dir=str(studies), prompt=prompt)
    second = cohort.run()[0]
    assert second["done"] == [] and second["skipped"] == ["p1", "p2"] and len(second["failed"]) == 1
    with pytest.raises(RuntimeError) as raised:  # the config's finalize step; MONAI wraps what it raised
        cohort.finalize()
    assert isinstance(raised.value.__cause__, StudiesFailed)
    assert str(raised.value.__cause__).startswith("1 of 3 studies failed (broken: RuntimeError: ")
    # resume keys on the prompt and the outputs: a new prompt redoes every study, a deleted mask its study
    other = {"text": "Please segment the liver.", "slices": [3]}
    third = _infer(tmp_path, pipeline, {}, configs=configs, studies_dir=str(studies), prompt=other).run()[0]
    assert third["done"] == ["p1", "p2"] and third["skipped"] == []
    (tmp_path / "out" / "p2" / "p2_seg.nii.gz").unlink()
    fourth = _infer(tmp_path, pipeline, {}, configs=configs, studies_dir=str(studies), prompt=other).run()[0]
    assert fourth["done"] == ["p2"] and fourth["skipped"] == ["p1"]
    assert (tmp_path / "out" / "p2" / "p2_seg.nii.gz").is_file()


def test_a_rerun_clears_the_study_s_old_outputs_first(tmp_path: Path, pipeline, data, monkeypatch) -> None:
    """A re-run with another prompt removes the old answer before anything else (a run killed mid-study leaves a
    study that is not done, never an old answer beside new labels) and the old outputs it does not write again."""
    from monai_medplib.adapters.bundle.runner import BundlePromptRunner, study_done

    two = {"image": str(data["png"]), "text": ["Segment the lung.", "Segment the heart."], "id": "x"}
    (first,) = _infer(tmp_path, pipeline, two).run()[0]
    study = tmp_path / "out" / "x"
    assert sorted(p.name for p in study.iterdir()) == [
        "x_answer.json",
        "x_seg.png",
        "x_seg_1.png",
        "x_seg_2.png",
    ]

    def killed(self, prompt, result):  # the run dies after writing its label, before its answer
        (study / "x_seg.png").write_bytes(b"new label")
        raise KeyboardInterrupt

    monkeypatch.setattr(BundlePromptRunner, "_image", killed)
    with pytest.raises((KeyboardInterrupt, RuntimeError)):
        _infer(tmp_path, pipeline, {**two, "text": "Segment the lung."}).run()
    assert not study_done(tmp_path / "out", "x")  # the next run redoes it
    monkeypatch.undo()
    (again,) = _infer(tmp_path, pipeline, {**two, "text": "Segment the lung."}).run()[0]
    assert sorted(p.name for p in study.iterdir()) == [
        "x_answer.json",
        "x_seg.png",
    ]  # no stale per-text masks
    assert again["outputs"]["label"].endswith("x_seg.png") and "masks" not in again["outputs"]


def test_resume_sees_a_series_rewritten_in_place_and_a_model_retrained_in_place(tmp_path: Path, data) -> None:
    import os
    import shutil

    from monai_medplib.adapters.bundle.prompts import parse_prompt
    from monai_medplib.adapters.bundle.runner import BundlePromptRunner, resume_key

    series = tmp_path / "series"
    shutil.copytree(data["dicom"], series)
    prompt = parse_prompt({"image": str(series), "text": "liver"})
    before = resume_key(prompt, {})
    first = sorted(series.iterdir())[0]
    first.write_bytes(
        first.read_bytes() + b"\0\0"
    )  # a file of the series replaced; the folder entry unchanged
    assert resume_key(prompt, {}) != before
    model = tmp_path / "model"
    shutil.copytree(REPO / "monai_medplib" / "demo_model", model)
    runner = BundlePromptRunner(pipeline=None, output_dir=tmp_path / "out", model=str(model))
    files = runner.model_files()
    weights = model / "model.safetensors"
    os.utime(
        weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9)
    )  # retrained in place
    assert (
        BundlePromptRunner(pipeline=None, output_dir=tmp_path / "out", model=str(model)).model_files()
        != files
    )


def test_resume_sees_separate_clip_and_sam_weights(tmp_path: Path) -> None:
    """``clip_path`` / ``sam_path`` load weights the model folder lacks: another file, or the same file replaced in
    place, is another model, so the inference config hands them to the runner's resume key."""
    from monai.bundle import ConfigParser

    from monai_medplib.adapters.bundle.runner import BundlePromptRunner

    sam = tmp_path / "sam-med2d_b.pth"
    sam.write_bytes(b"weights")
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundle" / "configs" / "inference.json"))
    parser.update({"clip_path": None, "sam_path": str(sam)})
    components = parser.get_parsed_content("inferer#components")
    assert components == {"clip_path": None, "sam_path": str(sam)}

    def settings() -> dict:
        return BundlePromptRunner(
            pipeline=None, output_dir=tmp_path / "out", components=components
        ).settings()

    before = settings()
    os.utime(sam, ns=(sam.stat().st_atime_ns, sam.stat().st_mtime_ns + 10**9))  # replaced in place
    after = settings()
    assert (
        after["components"] == {"sam_path": str(sam)}
        and after["component_files"] != before["component_files"]
    )
    assert BundlePromptRunner(pipeline=None, output_dir=tmp_path / "out").settings()["components"] == {}


def test_text_overrides_of_switches_are_read_as_words(tmp_path: Path, pipeline) -> None:
    """monai.bundle passes ``--force_seg false`` as the text "false": it must not switch the option on."""
    from monai_medplib.adapters.bundle.runner import BundlePromptRunner

    runner = BundlePromptRunner(
        pipeline, tmp_path / "o", force_seg="false", fast_grounding="False", overwrite="no"
    )
    assert (runner.force_seg, runner.fast_grounding, runner.overwrite) == (False, False, False)
    with pytest.raises(ValueError, match="force_seg"):
        BundlePromptRunner(pipeline, tmp_path / "o", force_seg="maybe")


def test_cohort_from_a_datalist(tmp_path: Path, pipeline, data) -> None:
    datalist = tmp_path / "datalist.json"
    datalist.write_text(
        json.dumps(
            {
                "testing": [
                    {"image": data["nii"].name, "label": "ignored.nii.gz", "question": "Which organ?"},
                    {"image": data["png"].name, "id": "chest"},
                ]
            }
        )
    )
    configs = ("inference.json", "batch_inference.json")
    report = _infer(
        tmp_path,
        pipeline,
        {},
        configs=configs,
        datalist=str(datalist),
        prompt={"text": "Segment the lung."},
    ).run()[0]
    # relative paths are read from the datalist's folder: copy the files beside it
    assert {f["id"] for f in report["failed"]} == {"ct_a", "chest"}
    for name in (data["nii"].name, data["png"].name):
        (tmp_path / name).write_bytes((data["root"] / name).read_bytes())
    report = _infer(
        tmp_path,
        pipeline,
        {},
        configs=configs,
        datalist=str(datalist),
        prompt={"text": "Segment the lung."},
    ).run()[0]
    assert report["done"] == ["chest", "ct_a"] and report["failed"] == []
    both = json.loads((tmp_path / "out" / "ct_a" / "ct_a_answer.json").read_text())
    assert "vqa" in both and "grounding" in both  # the study's question plus the cohort's text


@pytest.mark.slow
def test_a_few_training_steps(tmp_path: Path, model_dir: Path) -> None:
    from safetensors.torch import load_file

    root = _mecovqa_split(tmp_path / "mecovqa")
    out = tmp_path / "train"
    workflow = ConfigWorkflow(
        workflow_type="train",
        config_file=str(CONFIGS / "train.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        bundle_root=str(BUNDLE),
        ckpt_path=str(model_dir),
        dataset_dir=str(root),
        output_dir=str(out),
        max_epochs=2,  # 2 passes over the 2 grounding records of stage 3, 2 per batch: 2 optimizer steps
        batch_size=2,
        device="cpu",
    )
    workflow.initialize()
    assert workflow.check_properties() == []  # MONAI's TrainProperties: device, train#trainer#max_epochs, ...
    (summary,) = workflow.run()
    workflow.finalize()
    assert summary["stage"] == "stage3" and summary["steps"] == 2
    before, after = load_file(model_dir / "model.safetensors"), load_file(out / "hf" / "model.safetensors")
    assert before.keys() == after.keys()
    decoder = [k for k in before if k.startswith("model.visual_model.mask_decoder.")]
    clip = [k for k in before if k.startswith("model.vision_tower.")]
    assert any(not torch.equal(before[k], after[k]) for k in decoder)  # trained in full in stage III
    assert all(torch.equal(before[k], after[k]) for k in clip)  # frozen


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


@pytest.mark.slow
def test_torchrun_cohort_with_two_gloo_processes(tmp_path: Path, model_dir: Path, data) -> None:
    studies = tmp_path / "studies"
    studies.mkdir()
    for name in ("s1", "s2", "s3"):
        (studies / f"{name}.nii.gz").write_bytes(data["nii"].read_bytes())
    configs = [
        str(CONFIGS / c) for c in ("inference.json", "batch_inference.json", "multi_gpu_batch_inference.json")
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        json.dumps(configs),
        "--bundle_root",
        str(BUNDLE),
        "--ckpt_path",
        str(model_dir),
        "--output_dir",
        str(tmp_path / "out"),
        "--studies_dir",
        str(studies),
        "--max_new_tokens",
        "4",
        "--force_seg",
        "True",
        "--prompt",
        "{'text': 'Please segment the liver.', 'slices': [1]}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "cohort_report.json").read_text())
    assert report["world_size"] == 2 and report["done"] == ["s1", "s2", "s3"] and report["failed"] == []
    assert len(report["seconds_per_rank"]) == 2
    for name in ("s1", "s2", "s3"):
        assert nib.load(tmp_path / "out" / name / f"{name}_seg.nii.gz").shape == SHAPE


@pytest.mark.slow
def test_python_m_monai_bundle_run(tmp_path: Path, model_dir: Path, data) -> None:
    input_dict = {"image": str(data["nii"]), "text": "Please segment the liver.", "slices": [3]}
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(CONFIGS / "inference.json"),
        "--bundle_root",
        str(BUNDLE),
        "--ckpt_path",
        str(model_dir),
        "--output_dir",
        str(tmp_path / "out"),
        "--max_new_tokens",
        "4",
        "--input_dict",
        repr(input_dict),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((tmp_path / "out" / "ct_a" / "ct_a_answer.json").read_text())
    assert saved["grounding"]["slices"] == [3]
    assert nib.load(tmp_path / "out" / "ct_a" / "ct_a_seg.nii.gz").shape == SHAPE


def _bundle_run(tmp_path: Path, model_dir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--bundle_root",
        str(BUNDLE),
        "--ckpt_path",
        str(model_dir),
    ]
    cmd += ["--output_dir", str(tmp_path / "out"), "--max_new_tokens", "4", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(), cwd=tmp_path)


def _messages(stderr: str) -> list[str]:
    """stderr without MONAI's own notice about trusting config files (printed by every run)."""
    return [
        line for line in stderr.splitlines() if line.strip() and not line.startswith("parsing config_file")
    ]


@pytest.mark.slow
def test_a_bad_prompt_ends_in_one_line_and_exit_code_2(tmp_path: Path, model_dir: Path, data) -> None:
    bad = {"image": str(data["nii"]), "text": "liver", "points": [[1, 2, 3]]}
    proc = _bundle_run(
        tmp_path, model_dir, "--config_file", str(CONFIGS / "inference.json"), "--input_dict", repr(bad)
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert _messages(proc.stderr) == [
        "error: input_dict: region prompts ['points'] need a 'question' (region VQA); grounding ('text') takes no "
        "region prompt"
    ]
    assert not (tmp_path / "out").exists()


def test_an_unknown_dtype_ends_in_one_line_and_exit_code_2(tmp_path: Path, model_dir: Path, data) -> None:
    prompt = {"image": str(data["png"]), "question": "What is this?"}
    proc = _bundle_run(
        tmp_path,
        model_dir,
        "--config_file",
        str(CONFIGS / "inference.json"),
        "--dtype",
        "fp16",
        "--input_dict",
        repr(prompt),
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert _messages(proc.stderr) == [
        "error: dtype 'fp16' is not supported; use one of ['float32', 'bfloat16', 'float16']"
    ]


@pytest.mark.slow
def test_a_cohort_with_a_failed_study_exits_with_code_1(tmp_path: Path, model_dir: Path, data) -> None:
    studies = tmp_path / "studies"
    studies.mkdir()
    (studies / "good.nii.gz").write_bytes(data["nii"].read_bytes())
    (studies / "broken.nii.gz").write_text("not a NIfTI file")
    configs = json.dumps([str(CONFIGS / c) for c in ("inference.json", "batch_inference.json")])
    prompt = "{'text': 'liver', 'slices': [1]}"
    proc = _bundle_run(
        tmp_path, model_dir, "--config_file", configs, "--studies_dir", str(studies), "--prompt", prompt
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = [m for m in _messages(proc.stderr) if m.startswith("error:")]
    assert line.startswith("error: 1 of 2 studies failed (broken: ") and "cohort_report.json" in line
    assert (tmp_path / "out" / "good" / "good_seg.nii.gz").is_file()  # the good study was written
