"""The MedPLIB MONAI Label app behind a real ``medplib serve`` server on 127.0.0.1, driven like 3D Slicer and OHIF.

The model is the shipped demo model (given as a directory, as a user gives a real checkpoint), the images a
12-slice slab of the real LiTS CT stored mirrored along i (``ct1``, so results must come back in the file's
own voxel grid) and the whole LiTS CT (``lits``). Checked: task listing, the request shapes of both viewers,
the geometry and content of returned labels (the grounded liver lies on the true liver), 4xx errors,
20 concurrent requests, memory over 200 requests and a long grounding that does not block other routes.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from tests.support.app_clients import (
    dice,
    load_slicer_client_module,
    ohif_infer,
    read_result,
    slicer_config_params,
    slicer_infer,
    write_lits_slab,
)
from tests.support.mlserver import MONAILabelServer

pytestmark = pytest.mark.slow
TASKS = ["medplib_grounding", "medplib_vqa", "medplib_region_vqa", "medplib_refine"]
SHAPE = (128, 128, 12)
REGION_ANSWERS = {"liver", "tumour", "background"}  # what the demo model was trained to answer
REGION_QUESTION = "What is the object in this region?"


@pytest.fixture(scope="module")
def demo_dir():
    from monai_medplib.checkpoint import resolve_model_path

    return str(resolve_model_path("demo"))


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    import nibabel as nib

    from monai_medplib.data.lits import load_lits_case

    root = tmp_path_factory.mktemp("studies")
    slab = write_lits_slab(root / "ct1.nii.gz")
    case = load_lits_case()
    nib.save(nib.Nifti1Image(case.image, case.affine), str(root / "lits.nii.gz"))
    return root, slab


@pytest.fixture(scope="module")
def server(studies, demo_dir):
    with MONAILabelServer(studies[0], model=demo_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def slicer(server, tmp_path_factory):
    module = load_slicer_client_module()
    return module, module.MONAILabelClient(server.url, tmpdir=str(tmp_path_factory.mktemp("slicer")))


def test_info_lists_tasks_with_config_labels_dimension(server, slicer, demo_dir):
    info = slicer[1].info()
    assert info["name"] == "MedPLIB"
    assert sorted(info["models"]) == sorted(TASKS)
    expected = {
        "medplib_grounding": ("segmentation", 3, "text"),
        "medplib_vqa": ("segmentation", 2, "question"),
        "medplib_region_vqa": ("deepgrow", 2, "question"),
        "medplib_refine": ("deepgrow", 2, "text"),
    }
    for name, (kind, dim, field) in expected.items():
        model = info["models"][name]
        assert (model["type"], model["dimension"]) == (kind, dim)
        assert isinstance(model["config"][field], str) and model["config"][field]
        assert model["medplib"] == {
            "model": demo_dir,
            "device": "cpu",
            "dtype": "float32",
            "llm_dtype": "float32",
            "quantization": "none",
        }
    assert info["datastore"]["total"] == 2
    assert server.startup_seconds < 120


def test_slicer_grounding_whole_volume_two_texts(studies, slicer):
    _, slab = studies
    _, client = slicer
    params = slicer_config_params(client.info(), "medplib_grounding")
    params["text"] = "liver; tumour"
    path, result = slicer_infer(client, "medplib_grounding", "ct1", params)
    label, label_affine = read_result(path)
    assert label.shape == SHAPE
    np.testing.assert_allclose(label_affine, slab.affine, atol=1e-4)
    assert result["label_names"] == {"liver": 1, "tumour": 2}
    assert set(np.unique(label)) <= {0, 1, 2}
    # the mirrored file: a label in the wrong voxel order would miss the liver
    assert dice(label > 0, slab.liver) >= 0.85
    targets = result["medplib"]["targets"]
    assert {t: v["voxels"] for t, v in targets.items()} == {
        "liver": int((label == 1).sum()),
        "tumour": int((label == 2).sum()),
    }
    assert result["medplib"]["slices"] == list(range(12))
    assert set(targets) == {"liver", "tumour"} and targets["liver"]["slices_with_seg"] == list(range(12))


def test_slicer_grounding_on_current_slice(studies, slicer):
    _, slab = studies
    _, client = slicer
    path, result = slicer_infer(client, "medplib_grounding", "ct1", {"text": "liver", "slice": 5})
    label, _ = read_result(path)
    assert np.flatnonzero(label.any(axis=(0, 1))).tolist() == [5]
    assert dice(label[:, :, 5] == 1, slab.liver[:, :, 5]) >= 0.85
    assert result["medplib"]["slices"] == [5]


def test_slicer_vqa_answer_in_json(slicer):
    _, client = slicer
    params = slicer_config_params(client.info(), "medplib_vqa")
    params.update(question="Is the liver visible in this image?", slice=3)
    path, reply = slicer_infer(client, "medplib_vqa", "ct1", params)
    # VQA writes no label: the reply holds the JSON alone, which Slicer's client hands back as its form
    assert path is None
    result = json.loads(reply["params"])
    assert result["answer"] == "yes"  # every slice of the slab shows liver
    assert result["medplib"]["slice"] == 3 and result["medplib"]["axis"] == "axial"


def test_slicer_uploads_a_volume_under_its_node_name_and_asks_about_it(studies, slicer, tmp_path):
    """Slicer's Upload sends the node name as the image id; a series loaded from DICOM is named "2: CT Abdomen",
    which the server refused ("may only hold letters, digits...")."""
    import shutil

    _, client = slicer
    local = tmp_path / "upload.nii.gz"
    shutil.copy(studies[0] / "ct1.nii.gz", local)
    assert client.upload_image(str(local), "2: CT Abdomen")["image"] == "2: CT Abdomen"
    params = slicer_config_params(client.info(), "medplib_vqa")
    params.update(question="Is the liver visible in this image?", slice=3)
    _, reply = slicer_infer(client, "medplib_vqa", "2: CT Abdomen", params)
    assert json.loads(reply["params"])["answer"] == "yes"
    assert (studies[0] / "2: CT Abdomen.nii.gz").is_file()  # stored in the studies folder under that name
    client.datastore()  # the server keeps listing


def test_slicer_vqa_defaults_to_the_middle_slice(slicer):
    _, client = slicer
    _, reply = slicer_infer(
        client, "medplib_vqa", "ct1", {"question": "Which plane is this image: axial, coronal or sagittal?"}
    )
    result = json.loads(reply["params"])
    assert result["medplib"]["slice"] == 6
    assert result["answer"] in {"axial", "coronal", "sagittal"}  # the demo model's plane answer (73 % right)


def test_slicer_region_vqa_clicks(studies, slicer):
    # what onClickDeepgrow sends for a 2D deepgrow model: label, foreground, background, slice (+ config)
    _, client = slicer
    params = {"label": "lesion", "foreground": [[60, 50, 4], [64, 52, 4]], "background": [[2, 2, 4]]}
    params.update(slicer_config_params(client.info(), "medplib_region_vqa"))
    params["slice"] = 4
    path, result = slicer_infer(client, "medplib_region_vqa", "ct1", params)
    label, _ = read_result(path)
    assert label[60, 50, 4] == 1 and label[64, 52, 4] == 1 and label[2, 2, 4] == 0
    assert np.flatnonzero(label.any(axis=(0, 1))).tolist() == [4]
    # each click marks a square region around it (the demo's region prompt), not a whole slice
    assert 2 < label.sum() < 0.2 * SHAPE[0] * SHAPE[1]
    assert result["label_names"] == {"lesion": 1} and result["medplib"]["prompt"] == "points"
    assert result["answer"] in REGION_ANSWERS
    assert result["medplib"]["region_voxels"] == int(label.sum())


@pytest.mark.parametrize("sent_slice", [None, 285, 0, 5], ids=["no-slice", "mm-offset", "off-roi", "in-roi"])
def test_slicer_region_vqa_roi_with_swapped_corners(slicer, sent_slice):
    # getROIPointsXYZ interleaves (min, max) per axis after RAS->IJK; a flipped axis swaps them. For an ROI
    # without clicks Slicer sends slice = round(abs(red view offset in mm)): not a slice index, so a value the
    # ROI does not cover is not used (285 is past the 12 slices, 0 is in the volume but not in the ROI)
    _, client = slicer
    params = {"label": "region", "foreground": [], "background": [], "roi": [30, 10, 25, 5, 2, 7]}
    params["question"] = "What is in the box?"
    if sent_slice is not None:
        params["slice"] = sent_slice
    path, result = slicer_infer(client, "medplib_region_vqa", "ct1", params)
    label, _ = read_result(path)
    k = result["medplib"]["slice"]
    assert 2 <= k <= 7 and result["medplib"]["prompt"] == "roi"
    if sent_slice == 5:
        assert k == 5
    expected = np.zeros_like(label)
    expected[10:31, 5:26, k] = 1
    np.testing.assert_array_equal(label, expected)
    assert result["answer"] in REGION_ANSWERS


def test_slicer_region_vqa_scribble_label_upload(studies, slicer, tmp_path):
    import nibabel as nib

    _, slab = studies
    _, client = slicer
    scribbles = np.zeros(SHAPE, dtype=np.uint8)
    scribbles[50:62, 60:70, 8] = 1  # the selected segment (a few CLIP patches: smaller ones vanish)
    scribbles[2:4, 2:4, 8] = 2  # background scribbles
    path_in = tmp_path / "scribbles.nii.gz"
    nib.save(nib.Nifti1Image(scribbles, slab.affine), str(path_in))
    params = {
        "question": "What is this?",
        "roi": [],
        "label_info": [{"name": "tumour", "id": 1}, {"name": "background_scribbles", "id": 2}],
        "selected_label_name": "tumour",
    }
    path, result = slicer_infer(client, "medplib_region_vqa", "ct1", params, label_in=str(path_in))
    label, _ = read_result(path)
    np.testing.assert_array_equal(label == 1, scribbles == 1)
    assert result["medplib"]["prompt"] == "scribble" and result["medplib"]["slice"] == 8


def test_slicer_refine_clicks_on_grounded_mask(studies, slicer):
    _, slab = studies
    _, client = slicer
    inside = _deep_inside(slab.liver[:, :, 6])
    params = {
        "label": "liver",
        "foreground": [[*inside, 6]],
        "background": [[5, 5, 6]],
        "text": "liver",
        "slice": 6,
    }
    path, result = slicer_infer(client, "medplib_refine", "ct1", params)
    label, _ = read_result(path)
    # The clicks reach SAM-Med2D's prompt encoder on the cached embedding (tests/unit/pipeline/test_refinement.py checks the
    # decoder call by hand). What they do to the mask is the model's: the demo model never trained point
    # prompts (its data has text prompts only), so only where the result lands is asserted here.
    assert np.flatnonzero(label.any(axis=(0, 1))).tolist() in ([6], [])
    assert set(np.unique(label)) <= {0, 1}
    assert result["label_names"] == {"liver": 1} and result["medplib"]["voxels"] == int(label.sum())


def _deep_inside(mask: np.ndarray) -> tuple[int, int]:
    """The (i, j) of ``mask`` farthest from its border."""
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(mask)
    return tuple(int(c) for c in np.unravel_index(np.argmax(distance), mask.shape))


def test_ohif_requests(server, studies):
    _, slab = studies
    info = requests.get(server.url + "/info/", timeout=30).json()
    # deepgrow-type model: OHIF sends foreground / background of the current slice (no 'slice' key)
    params = {**info["models"]["medplib_region_vqa"]["config"], "foreground": [[71, 72, 2]], "background": []}
    reply = ohif_infer(server.url, "medplib_region_vqa", "ct1", params)
    assert reply.status_code == 200, reply.text
    label, label_affine = read_result(_save(reply.content, ".nrrd"))
    np.testing.assert_allclose(label_affine, slab.affine, atol=1e-4)
    assert label[71, 72, 2] == 1 and np.flatnonzero(label.any(axis=(0, 1))).tolist() == [2]
    # vista3d-style points / point_labels: the background point marks nothing
    params = {"question": "What is it?", "points": [[40, 60, 7], [1, 1, 7]], "point_labels": [1, 0]}
    reply = ohif_infer(server.url, "medplib_region_vqa", "ct1", params)
    assert reply.status_code == 200, reply.text
    label, _ = read_result(_save(reply.content, ".nrrd"))
    assert label[40, 60, 7] == 1 and label[1, 1, 7] == 0
    assert np.flatnonzero(label.any(axis=(0, 1))).tolist() == [7]
    # segmentation-type model with the options form and the label_prompt OHIF adds
    params = {**info["models"]["medplib_grounding"]["config"], "slices": "2-3", "label_prompt": [1]}
    reply = ohif_infer(server.url, "medplib_grounding", "ct1", params)
    assert reply.status_code == 200, reply.text
    label, _ = read_result(_save(reply.content, ".nrrd"))
    assert np.flatnonzero(label.any(axis=(0, 1))).tolist() == [2, 3]
    assert dice(label[:, :, 2:4] == 1, slab.liver[:, :, 2:4]) >= 0.85
    # output=json gives the answer alone
    reply = requests.post(
        server.url + "/infer/medplib_vqa",
        params={"image": "ct1", "output": "json"},
        files={"params": (None, json.dumps({"question": "Is the liver visible in this image?", "slice": 1}))},
        timeout=60,
    )
    assert reply.status_code == 200 and reply.json()["answer"] == "yes"


def _save(content: bytes, suffix: str) -> str:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=suffix, delete=False) as f:
        f.write(content)
    return f.name


def _post(server, model, image="ct1", params=None, raw_params=None, files=None, output=None, timeout=60):
    form = {"params": (None, raw_params if raw_params is not None else json.dumps(params or {}))}
    form.update(files or {})
    query = {"image": image} if image else {}
    if output:
        query["output"] = output
    return requests.post(f"{server.url}/infer/{model}", params=query, files=form, timeout=timeout)


def test_a_page_of_another_site_cannot_change_the_server(server):
    """A browser posts a multipart form to 127.0.0.1 without a preflight: any web page the user opens could save
    an empty "spleen" result over the final label of an open server (no token, loopback: the default)."""
    save = {"save_label": True, "label_tag": "final", "text": "spleen", "slices": "0"}
    form = {"params": (None, json.dumps(save))}
    url = f"{server.url}/infer/medplib_grounding"
    stats = lambda: requests.get(f"{server.url}/datastore/", params={"output": "stats"}, timeout=30).json()  # noqa: E731
    before = stats()
    for headers in (
        {"Origin": "https://evil.example"},
        {"Origin": "null"},  # a sandboxed frame or a local file
        {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"},  # a browser that sends no Origin
    ):
        reply = requests.post(
            url, params={"image": "ct1", "output": "json"}, files=form, headers=headers, timeout=60
        )
        assert reply.status_code == 403 and "another site" in reply.json()["detail"], reply.text
    assert stats() == before
    # the server's own pages (OHIF at /ohif/) and clients without an Origin (Slicer, scripts) are served
    own = {"Origin": server.url}
    reply = requests.post(
        url.replace("grounding", "vqa"),
        params={"image": "ct1", "output": "json"},
        files={"params": (None, json.dumps({"question": "q", "slice": 1}))},
        headers=own,
        timeout=60,
    )
    assert reply.status_code == 200, reply.text


BAD_REQUESTS = [
    ("unknown model", dict(model="medplib_nope", params={"question": "q"}), 404, "unknown model"),
    (
        "unknown image",
        dict(model="medplib_vqa", image="ct_missing", params={"question": "q"}),
        404,
        "not found",
    ),
    (
        "points outside",
        dict(model="medplib_region_vqa", params={"question": "q", "foreground": [[128, 0, 0]]}),
        400,
        "outside",
    ),
    ("negative point", dict(model="medplib_refine", params={"foreground": [[-1, 0, 0]]}), 400, "outside"),
    (
        "empty ROI",
        dict(model="medplib_region_vqa", params={"question": "q", "roi": [3, 3, 5, 9, 1, 2]}),
        400,
        "empty",
    ),
    (
        "clicks off the slice",
        dict(model="medplib_region_vqa", params={"question": "q", "foreground": [[5, 5, 1]], "slice": 8}),
        400,
        "no foreground clicks on slice 8",
    ),
    (
        "ROI, slice not a number",
        dict(model="medplib_region_vqa", params={"question": "q", "roi": [3, 9, 5, 9, 1, 2], "slice": "top"}),
        400,
        "'slice' must be a whole number",
    ),
    ("no region", dict(model="medplib_region_vqa", params={"question": "q"}), 400, "no region"),
    ("empty question", dict(model="medplib_vqa", params={"question": " "}), 400, "'question'"),
    ("10 kB question", dict(model="medplib_vqa", params={"question": "why " * 2560}), 400, "characters"),
    ("missing text", dict(model="medplib_grounding", params={"text": " ; "}), 400, "'text'"),
    ("malformed params", dict(model="medplib_vqa", raw_params="{question: 'q'"), 400, "not valid JSON"),
    ("params not object", dict(model="medplib_vqa", raw_params="[1, 2]"), 400, "JSON object"),
    ("slice out of range", dict(model="medplib_vqa", params={"question": "q", "slice": 99}), 400, "outside"),
    (
        "bad extension",
        dict(model="medplib_vqa", params={"question": "q", "result_extension": ".exe"}),
        400,
        "result_extension",
    ),
    (
        "two-file result format",
        dict(model="medplib_grounding", params={"text": "liver", "result_extension": ".mhd"}),
        400,
        "result_extension",
    ),
    (
        "dicom_seg locally",
        dict(model="medplib_vqa", params={"question": "q"}, output="dicom_seg"),
        400,
        "DICOMweb",
    ),
]


@pytest.mark.parametrize("case, kwargs, status, words", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_are_4xx_with_a_message(server, case, kwargs, status, words):
    reply = _post(server, **kwargs)
    assert reply.status_code == status, reply.text
    assert words in reply.json()["detail"]


def test_uploads_that_are_not_volumes(server, tmp_path):
    from PIL import Image

    garbage = tmp_path / "notes.nii.gz"
    garbage.write_bytes(b"this is not an image at all" * 20)
    reply = _post(
        server,
        "medplib_vqa",
        image="",
        params={"question": "q"},
        files={"file": (garbage.name, garbage.open("rb"))},
    )
    assert reply.status_code == 415, reply.text
    assert "could not read" in reply.json()["detail"]

    png = tmp_path / "slice.png"
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(png)
    reply = _post(
        server, "medplib_vqa", image="", params={"question": "q"}, files={"file": (png.name, png.open("rb"))}
    )
    assert reply.status_code == 400 and "3D volume" in reply.json()["detail"]

    reply = _post(
        server,
        "medplib_region_vqa",
        params={"question": "q"},
        files={"label": ("l.nii.gz", garbage.open("rb"))},
    )
    assert reply.status_code == 415 and "uploaded label" in reply.json()["detail"]


def test_server_keeps_serving_after_errors(server):
    for _ in range(3):
        _post(server, "medplib_vqa", raw_params="{")
        _post(server, "medplib_region_vqa", params={"question": "q", "foreground": [[999, 0, 0]]})
    assert server.alive()
    params = {"question": "Is the liver visible in this image?", "slice": 2}
    reply = _post(server, "medplib_vqa", params=params, output="json")
    assert reply.status_code == 200 and reply.json()["answer"] == "yes"


def _one_request(server, n):
    """Request ``n`` of a mixed stream: every task in turn, each on one slice of ``ct1``."""
    model = TASKS[n % 4]
    params = {
        "medplib_grounding": {"text": "liver", "slice": n % 12},
        "medplib_vqa": {"question": "Is the liver visible in this image?", "slice": n % 12},
        "medplib_region_vqa": {"question": REGION_QUESTION, "foreground": [[40 + n % 48, 60, n % 12]]},
        "medplib_refine": {"text": "liver", "foreground": [[64, 40 + n % 40, n % 12]]},
    }[model]
    return _post(server, model, params=params, output="json", timeout=300)


def test_twenty_concurrent_requests_all_answered(server):
    with ThreadPoolExecutor(max_workers=20) as pool:
        replies = list(pool.map(lambda n: _one_request(server, n), range(20)))
    assert [r.status_code for r in replies] == [200] * 20
    results = [r.json() for r in replies]
    for n, result in enumerate(results):  # each reply belongs to its own request
        assert result["medplib"]["task"] == TASKS[n % 4].removeprefix("medplib_")
        if TASKS[n % 4] == "medplib_vqa":
            assert result["answer"] == "yes" and result["medplib"]["slice"] == n % 12
        if TASKS[n % 4] == "medplib_region_vqa":
            assert result["medplib"]["slice"] == n % 12 and result["answer"] in REGION_ANSWERS
        if TASKS[n % 4] == "medplib_grounding":
            assert result["medplib"]["slices"] == [n % 12]
            assert result["medplib"]["targets"]["liver"]["voxels"] > 500


def test_memory_steady_over_200_requests(server):
    for n in range(24):  # warm up caches (every slice of ct1 once per task) and the allocator
        assert _one_request(server, n).status_code == 200
    before = server.rss_bytes()
    for n in range(200):
        assert _one_request(server, n).status_code == 200
    growth_mb = (server.rss_bytes() - before) / 2**20
    assert growth_mb < 40, f"server RSS grew by {growth_mb:.1f} MiB over 200 requests"


def test_long_inference_does_not_block_info_datastore_or_image(server):
    # grounding 64 slices of the whole LiTS CT takes seconds; /info, /datastore and image download answer meanwhile
    slow = {}
    params = {"text": "liver", "slices": "0-63"}
    worker = threading.Thread(
        target=lambda: slow.setdefault(
            "reply", _post(server, "medplib_grounding", "lits", params, timeout=300)
        )
    )
    start = time.perf_counter()
    worker.start()
    time.sleep(1.0)
    timings = {}
    for route in ("/info/", "/datastore/?output=all", "/datastore/image?image=ct1"):
        t = time.perf_counter()
        reply = requests.get(server.url + route, timeout=30)
        timings[route] = time.perf_counter() - t
        assert reply.status_code == 200, (route, reply.text)
    assert worker.is_alive(), "the slow inference finished too early for the check to mean anything"
    assert max(timings.values()) < 2.0, timings
    worker.join(300)
    assert slow["reply"].status_code == 200, slow["reply"].text
    assert time.perf_counter() - start > max(timings.values()) + 1.0
