"""The MedPLIB MONAI Label app behind a real server on 127.0.0.1, driven like 3D Slicer and OHIF do.

The pipeline here is ``tests/medplib_fake_pipeline.py`` (predictable outputs), so these tests check the
server and app plumbing: task listing, request shapes of both viewers, geometry of the returned labels,
error codes, concurrency, a non-blocked event loop and memory. ``test_app_model.py`` runs the real model.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from app_clients import (
    load_slicer_client_module,
    ohif_infer,
    read_result,
    slicer_config_params,
    slicer_infer,
    write_test_volume,
)
from mlserver import FAKE_PIPELINE, MONAILabelServer

pytestmark = pytest.mark.slow
TASKS = ["medplib_grounding", "medplib_vqa", "medplib_region_vqa", "medplib_refine"]


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("studies")
    volume, affine = write_test_volume(root / "ct1.nii.gz")
    return root, volume, affine


@pytest.fixture(scope="module")
def server(studies):
    with MONAILabelServer(studies[0], model="demo", conf={"pipeline": FAKE_PIPELINE}) as srv:
        yield srv


@pytest.fixture(scope="module")
def slicer(server, tmp_path_factory):
    module = load_slicer_client_module()
    return module, module.MONAILabelClient(server.url, tmpdir=str(tmp_path_factory.mktemp("slicer")))


def test_info_lists_tasks_with_config_labels_dimension(server, slicer):
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
    assert info["datastore"]["total"] == 1
    assert server.startup_seconds < 120


def _assert_same_geometry(result_affine, image_affine):
    np.testing.assert_allclose(result_affine, image_affine, atol=1e-4)


def test_slicer_grounding_whole_volume_two_texts(studies, slicer):
    _, volume, affine = studies
    module, client = slicer
    params = slicer_config_params(client.info(), "medplib_grounding")
    params["text"] = "liver; spleen"
    path, result = slicer_infer(client, "medplib_grounding", "ct1", params)
    label, label_affine = read_result(path)
    _assert_same_geometry(label_affine, affine)
    assert result["label_names"] == {"liver": 1, "spleen": 2}
    # the fake grounds text 0 as voxels above the median of the volume, on every slice
    expected = volume > np.percentile(volume, 50)
    np.testing.assert_array_equal(label == 1, expected)
    assert result["medplib"]["voxels"]["liver"] == int(expected.sum())
    assert set(result["medplib"]["answers"]) == {"liver", "spleen"}


def test_slicer_grounding_on_current_slice(studies, slicer):
    _, volume, _ = studies
    _, client = slicer
    path, result = slicer_infer(client, "medplib_grounding", "ct1", {"text": "liver", "slice": 5})
    label, _ = read_result(path)
    assert np.flatnonzero(label.any(axis=(0, 1))).tolist() == [5]
    assert result["medplib"]["slices"] == [5]


def test_slicer_vqa_answer_in_json(slicer):
    _, client = slicer
    params = slicer_config_params(client.info(), "medplib_vqa")
    params.update(question="Which organ is bright here?", slice=3)
    path, result = slicer_infer(client, "medplib_vqa", "ct1", params)
    assert result["answer"] == "fake answer on axial slice 3: Which organ is bright here?"
    label, _ = read_result(path)
    assert not label.any()


def test_slicer_vqa_defaults_to_the_middle_slice(slicer):
    _, client = slicer
    _, result = slicer_infer(client, "medplib_vqa", "ct1", {"question": "What is shown?"})
    assert result["medplib"]["slice"] == 6


def test_slicer_region_vqa_clicks(studies, slicer):
    # what onClickDeepgrow sends for a 2D deepgrow model: label, foreground, background, slice (+ config)
    _, client = slicer
    params = {"label": "lesion", "foreground": [[12, 10, 4], [14, 11, 4]], "background": [[2, 2, 4]]}
    params.update(slicer_config_params(client.info(), "medplib_region_vqa"))
    params["slice"] = 4
    path, result = slicer_infer(client, "medplib_region_vqa", "ct1", params)
    label, _ = read_result(path)
    assert sorted(map(tuple, np.argwhere(label == 1))) == [(12, 10, 4), (14, 11, 4)]
    assert result["label_names"] == {"lesion": 1}
    assert result["answer"].startswith("fake region answer (2 voxels)")
    assert result["medplib"]["prompt"] == "points"


def test_slicer_region_vqa_roi_with_swapped_corners(slicer):
    # getROIPointsXYZ interleaves (min, max) per axis after RAS->IJK; a flipped axis swaps them
    _, client = slicer
    params = {"label": "region", "foreground": [], "background": [], "roi": [30, 10, 25, 5, 2, 7]}
    params["question"] = "What is in the box?"
    path, result = slicer_infer(client, "medplib_region_vqa", "ct1", params)
    label, _ = read_result(path)
    k = (2 + 7) // 2
    expected = np.zeros_like(label)
    expected[10:31, 5:26, k] = 1
    np.testing.assert_array_equal(label, expected)
    assert result["medplib"]["slice"] == k and result["medplib"]["prompt"] == "roi"


def test_slicer_region_vqa_scribble_label_upload(studies, slicer, tmp_path):
    import nibabel as nib

    _, volume, affine = studies
    _, client = slicer
    scribbles = np.zeros(volume.shape, dtype=np.uint8)
    scribbles[20:24, 15:18, 8] = 1  # the selected segment
    scribbles[2:4, 2:4, 8] = 2  # background scribbles
    path_in = tmp_path / "scribbles.nii.gz"
    nib.save(nib.Nifti1Image(scribbles, affine), str(path_in))
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
    _, volume, _ = studies
    _, client = slicer
    params = {
        "label": "liver",
        "foreground": [[40, 35, 6]],
        "background": [[20, 18, 6]],
        "text": "liver",
        "slice": 6,
    }
    path, result = slicer_infer(client, "medplib_refine", "ct1", params)
    label, _ = read_result(path)
    prior = volume[:, :, 6] > np.percentile(volume, 50)
    ii, jj = np.mgrid[: volume.shape[0], : volume.shape[1]]
    expected = (prior | ((ii - 40) ** 2 + (jj - 35) ** 2 <= 9)) & ~((ii - 20) ** 2 + (jj - 18) ** 2 <= 9)
    np.testing.assert_array_equal(label[:, :, 6] == 1, expected)
    assert not label[:, :, :6].any() and not label[:, :, 7:].any()
    assert result["label_names"] == {"liver": 1}


def test_ohif_requests(server, studies):
    _, volume, affine = studies
    info = requests.get(server.url + "/info/", timeout=30).json()
    # deepgrow-type model: OHIF sends foreground / background of the current slice (no 'slice' key)
    params = {**info["models"]["medplib_region_vqa"]["config"], "foreground": [[11, 12, 2]], "background": []}
    reply = ohif_infer(server.url, "medplib_region_vqa", "ct1", params)
    assert reply.status_code == 200, reply.text
    path = _save(reply.content, ".nrrd")
    label, label_affine = read_result(path)
    _assert_same_geometry(label_affine, affine)
    assert list(map(tuple, np.argwhere(label))) == [(11, 12, 2)]
    # vista3d-style points / point_labels
    params = {"question": "What is it?", "points": [[5, 6, 7], [1, 1, 7]], "point_labels": [1, 0]}
    reply = ohif_infer(server.url, "medplib_region_vqa", "ct1", params)
    assert reply.status_code == 200, reply.text
    label, _ = read_result(_save(reply.content, ".nrrd"))
    assert list(map(tuple, np.argwhere(label))) == [(5, 6, 7)]
    # segmentation-type model with the options form and the label_prompt OHIF adds
    params = {**info["models"]["medplib_grounding"]["config"], "slices": "2-3", "label_prompt": [1]}
    reply = ohif_infer(server.url, "medplib_grounding", "ct1", params)
    assert reply.status_code == 200, reply.text
    label, _ = read_result(_save(reply.content, ".nrrd"))
    assert np.flatnonzero(label.any(axis=(0, 1))).tolist() == [2, 3]
    # output=json gives the answer alone
    reply = requests.post(
        server.url + "/infer/medplib_vqa",
        params={"image": "ct1", "output": "json"},
        files={"params": (None, json.dumps({"question": "Q?", "slice": 1}))},
        timeout=60,
    )
    assert reply.status_code == 200 and reply.json()["answer"].endswith("slice 1: Q?")


def _save(content: bytes, suffix: str) -> str:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=suffix, delete=False) as f:
        f.write(content)
    return f.name


def _post(server, model, image="ct1", params=None, raw_params=None, files=None, output=None):
    form = {"params": (None, raw_params if raw_params is not None else json.dumps(params or {}))}
    form.update(files or {})
    query = {"image": image} if image else {}
    if output:
        query["output"] = output
    return requests.post(f"{server.url}/infer/{model}", params=query, files=form, timeout=60)


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
        dict(model="medplib_region_vqa", params={"question": "q", "foreground": [[48, 0, 0]]}),
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
    ("no region", dict(model="medplib_region_vqa", params={"question": "q"}), 400, "no region"),
    ("missing question", dict(model="medplib_vqa", params={}), 400, "'question'"),
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
    reply = _post(server, "medplib_vqa", params={"question": "still there?", "slice": 2})
    assert reply.status_code == 200


def _one_request(server, n):
    model = TASKS[n % 4]
    params = {
        "medplib_grounding": {"text": "liver", "slice": n % 12},
        "medplib_vqa": {"question": f"q{n}", "slice": n % 12},
        "medplib_region_vqa": {"question": f"q{n}", "foreground": [[n % 48, n % 40, n % 12]]},
        "medplib_refine": {"text": "liver", "foreground": [[n % 48, 5, n % 12]]},
    }[model]
    return _post(server, model, params=params, output="json")


def test_twenty_concurrent_requests_all_answered(server):
    with ThreadPoolExecutor(max_workers=20) as pool:
        replies = list(pool.map(lambda n: _one_request(server, n), range(20)))
    assert [r.status_code for r in replies] == [200] * 20
    vqa = [r.json() for n, r in enumerate(replies) if TASKS[n % 4] == "medplib_vqa"]
    assert all(reply["answer"].endswith(f"q{n}") for n, reply in zip(range(1, 20, 4), vqa))


def test_memory_steady_over_200_requests(server):
    for n in range(20):  # warm up caches and allocator
        assert _one_request(server, n).status_code == 200
    before = server.rss_bytes()
    for n in range(200):
        assert _one_request(server, n).status_code == 200
    growth_mb = (server.rss_bytes() - before) / 2**20
    assert growth_mb < 40, f"server RSS grew by {growth_mb:.1f} MiB over 200 requests"


def test_long_inference_does_not_block_info_datastore_or_image(studies):
    # every model call sleeps 4 s; /info, /datastore and image download must answer meanwhile
    with MONAILabelServer(
        studies[0], model="demo", conf={"pipeline": FAKE_PIPELINE}, env={"MEDPLIB_FAKE_DELAY": "4"}
    ) as srv:
        slow = {}
        worker = threading.Thread(
            target=lambda: slow.setdefault("reply", _post(srv, "medplib_vqa", params={"question": "slow?"}))
        )
        start = time.perf_counter()
        worker.start()
        time.sleep(0.7)
        timings = {}
        for route in ("/info/", "/datastore/?output=all", "/datastore/image?image=ct1"):
            t = time.perf_counter()
            reply = requests.get(srv.url + route, timeout=30)
            timings[route] = time.perf_counter() - t
            assert reply.status_code == 200, (route, reply.text)
        assert worker.is_alive(), "the slow inference finished too early for the check to mean anything"
        assert max(timings.values()) < 2.0, timings
        worker.join(30)
        assert slow["reply"].status_code == 200 and time.perf_counter() - start >= 4
