"""The bundle's input_dict validation, run through ConfigWorkflow as the model-zoo unit tests do (no model needed).

Every error case builds the inference workflow with ``network_def`` disabled (None), the way zoo tests set
``checkpointloader#_disabled_``: the prompt is rejected by the config's ``initialize`` step, before the model would
be loaded.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigWorkflow
from PIL import Image

from monai_medplib.adapters.bundle.prompts import parse_prompt
from tests.support.paths import REPO

BUNDLE = REPO / "bundle"
CONFIGS = BUNDLE / "configs"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prompts")
    png = root / "xray.png"
    Image.fromarray(np.zeros((40, 50), dtype=np.uint8)).save(png)
    nii = root / "ct_01.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 9, 5), dtype=np.float32), np.diag([-1.0, -1.0, 2.0, 1.0])), nii)
    txt = root / "notes.txt"
    txt.write_text("not an image")
    return {"png": png, "nii": nii, "txt": txt, "root": root}


def _workflow(tmp_path: Path, input_dict: object, initialize: bool = True) -> ConfigWorkflow:
    workflow = ConfigWorkflow(
        workflow_type="infer",
        config_file=str(CONFIGS / "inference.json"),
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        bundle_root=str(BUNDLE),
        output_dir=str(tmp_path / "out"),
        network_def=None,
        input_dict=input_dict,
    )
    if initialize:
        workflow.initialize()
    return workflow


def test_valid_prompts_are_parsed(files: dict[str, Path]) -> None:
    grounding = parse_prompt({"image": str(files["nii"]), "text": ["liver", "tumour"], "slices": 2})
    assert grounding.is_volume and not grounding.is_dicom_series
    assert grounding.id == "ct_01" and grounding.texts == ("liver", "tumour") and grounding.slices == (2,)
    region = parse_prompt(
        {
            "image": str(files["nii"]),
            "question": "What is it?",
            "points": [[1, 2, 3], [4, 5, 1]],
            "point_labels": [1, 0],
        }
    )
    assert region.points == ((1.0, 2.0, 3.0),) and region.ignored_points == 1 and region.axis == "axial"
    flat = parse_prompt(
        {"image": str(files["png"]), "question": "Where?", "box": [1, 2, 30, 20], "id": "case-7"}
    )
    assert not flat.is_volume and flat.box == (1.0, 2.0, 30.0, 20.0) and flat.id == "case-7"


# (input_dict built from the files fixture, exception type, message the user must see)
ERRORS = [
    (lambda f: ["not", "a", "dict"], ValueError, "input_dict must be a dict of prompts, got list"),
    (
        lambda f: {"image": str(f["png"]), "text": "x", "label": 3},
        ValueError,
        "input_dict has unknown keys ['label']",
    ),
    (lambda f: {"text": "liver"}, ValueError, "input_dict['image']: is required"),
    (
        lambda f: {"image": str(f["root"] / "missing.nii.gz"), "text": "x"},
        FileNotFoundError,
        "input_dict['image']: file not found",
    ),
    (
        lambda f: {"image": str(f["txt"]), "text": "x"},
        ValueError,
        "input_dict['image']: unsupported file type 'notes.txt'",
    ),
    (lambda f: {"image": str(f["png"])}, ValueError, "input_dict needs 'text' (grounding) or 'question'"),
    (
        lambda f: {"image": str(f["png"]), "text": ""},
        ValueError,
        "input_dict['text']: must be a non-empty string",
    ),
    (
        lambda f: {"image": str(f["png"]), "text": ["a", "a"]},
        ValueError,
        "input_dict['text']: texts must be distinct",
    ),
    (
        lambda f: {"image": str(f["png"]), "question": 5},
        ValueError,
        "input_dict['question']: must be a non-empty string",
    ),
    (
        lambda f: {"image": str(f["png"]), "question": "q", "point_labels": [1]},
        ValueError,
        "input_dict['point_labels']: given without 'points'",
    ),
    (
        lambda f: {"image": str(f["png"]), "question": "q", "points": [[1, 2, 3]]},
        ValueError,
        "input_dict['points']: must be [[x, y], ...] pixels",
    ),
    (
        lambda f: {"image": str(f["nii"]), "question": "q", "points": [[1, 2]]},
        ValueError,
        "input_dict['points']: must be [[i, j, k], ...] voxel",
    ),
    (
        lambda f: {"image": str(f["png"]), "question": "q", "points": [[1, "a"]]},
        ValueError,
        "input_dict['points']: must hold finite numbers",
    ),
    (
        lambda f: {"image": str(f["png"]), "question": "q", "points": [[1, 2], [3, 4]], "point_labels": [1]},
        ValueError,
        "input_dict['point_labels']: must match points: 2 points",
    ),
    (
        lambda f: {"image": str(f["png"]), "question": "q", "points": [[1, 2]], "point_labels": [2]},
        ValueError,
        "input_dict['point_labels']: values must be 1 (region), 0 (background) or -1",
    ),
    (
        lambda f: {"image": str(f["png"]), "question": "q", "points": [[1, 2]], "point_labels": [0]},
        ValueError,
        "input_dict['point_labels']: no point is labelled 1",
    ),
    (
        lambda f: {"image": str(f["png"]), "question": "q", "box": [1, 2, 3]},
        ValueError,
        "input_dict['box']: must be [x0, y0, x1, y1] pixels for a 2D image",
    ),
    (
        lambda f: {"image": str(f["nii"]), "question": "q", "box": [1, 2, 3, 4]},
        ValueError,
        "input_dict['box']: must be [i0, i1, j0, j1, k0, k1] voxel ROI for a volume",
    ),
    (
        lambda f: {"image": str(f["png"]), "question": "q", "region_mask": str(f["root"] / "no.png")},
        FileNotFoundError,
        "input_dict['region_mask']: file not found",
    ),
    (
        lambda f: {"image": str(f["png"]), "text": "liver", "box": [1, 2, 3, 4]},
        ValueError,
        "input_dict: region prompts ['box'] need a 'question'",
    ),
    (
        lambda f: {"image": str(f["png"]), "question": "q", "box": [1, 2, 3, 4], "points": [[1, 2]]},
        ValueError,
        "input_dict: give one region prompt for a 2D image, got ['points', 'box']",
    ),
    (
        lambda f: {"image": str(f["nii"]), "text": "x", "axis": "oblique"},
        ValueError,
        "input_dict['axis']: must be one of ['axial', 'coronal', 'sagittal']",
    ),
    (
        lambda f: {"image": str(f["nii"]), "text": "x", "slices": [1, -2]},
        ValueError,
        "input_dict['slices']: must be a slice index or a non-empty list",
    ),
    (
        lambda f: {"image": str(f["png"]), "text": "x", "slices": [1]},
        ValueError,
        "input_dict['slices']: applies to volumes only; xray.png is a 2D image",
    ),
    (
        lambda f: {"image": str(f["nii"]), "question": "q", "points": [[1, 2, 3]], "slices": [1, 2]},
        ValueError,
        "input_dict['slices']: region VQA reads one slice",
    ),
    (
        lambda f: {"image": str(f["png"]), "text": "x", "id": "a/b"},
        ValueError,
        "input_dict['id']: must be a non-empty name without path separators",
    ),
    (
        lambda f: {"image": str(f["png"]), "text": "x", "id": ".."},
        ValueError,
        "input_dict['id']: must name a folder inside output_dir, got '..'",
    ),
    (
        lambda f: {"image": str(f["root"] / ".."), "text": "x"},
        ValueError,
        "input_dict['id']: must name a folder inside output_dir, got '..' (taken from the image path",
    ),
]


@pytest.mark.parametrize(("build", "error", "message"), ERRORS, ids=[e[2][:48] for e in ERRORS])
def test_prompt_error_through_config_workflow(
    tmp_path: Path, files: dict[str, Path], build, error, message
) -> None:
    workflow = _workflow(tmp_path, build(files), initialize=False)
    with pytest.raises(RuntimeError) as raised:  # ConfigExpression wraps what the expression raised
        workflow.initialize()  # the config's initialize step checks input_dict before anything is loaded
    cause = raised.value.__cause__
    assert isinstance(cause, error), f"expected {error.__name__}, got {type(cause).__name__}: {cause}"
    assert message in str(cause)
    assert not (tmp_path / "out").exists()  # nothing written for a rejected prompt


def test_a_leading_config_sigil_is_escaped_with_a_backslash(files: dict[str, Path]) -> None:
    # MONAI reads '@liver' as a reference and '$...' as Python before the prompt reaches us: '\\@' keeps the text
    prompt = parse_prompt(
        {"image": str(files["png"]), "text": ["\\@liver", "\\$x", "\\y"], "question": "\\%q"}
    )
    assert prompt.texts == ("@liver", "$x", "\\y") and prompt.question == "%q"


def test_an_escaped_text_passes_monai_s_parser(tmp_path: Path, files: dict[str, Path]) -> None:
    workflow = _workflow(tmp_path, {"image": str(files["png"]), "text": "\\@liver"})
    assert workflow.parser.get_parsed_content("dataset")[0]["text"] == "\\@liver"  # untouched by MONAI
    unescaped = _workflow(tmp_path, {"image": str(files["png"]), "text": "@liver"}, initialize=False)
    with pytest.raises(ValueError, match="the referring item `@liver` is not defined"):
        unescaped.initialize()
