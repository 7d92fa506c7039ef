"""The MONAI Label app under a plain ``monailabel start_server`` with the shipped demo model, driven by 3D
Slicer's client: the server starts without our launcher, lists the tasks, and the grounded liver overlaps the
true LiTS liver. Also: ``--conf force_seg`` reaches the model (random-weight fixture model, no server).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import requests

from tests.support.app_clients import dice, load_slicer_client_module, read_result, slicer_infer
from tests.support.mlserver import APP_DIR, MONAILabelServer

pytestmark = pytest.mark.slow
GROUNDED_SLICES = [8, 24, 40, 56, 72, 88, 104, 120]  # spread over the whole CT, held-out block included


@pytest.fixture(scope="module")
def lits(tmp_path_factory):
    import nibabel as nib

    from monai_medplib.data.lits import load_lits_case

    studies = tmp_path_factory.mktemp("studies")
    case = load_lits_case()
    nib.save(nib.Nifti1Image(case.image, case.affine), str(studies / "lits117.nii.gz"))
    return studies, case


@pytest.fixture(scope="module")
def plain_server(lits):
    # `python -m monailabel.main start_server --app apps/medplib --studies DIR --conf model demo`: what the
    # `monailabel` console script runs; pydicom 3 works through the .pth hook scripts/install.sh installs
    with MONAILabelServer(lits[0], model="demo", launcher="monailabel") as server:
        yield server


def test_plain_monailabel_start_server_serves_info(plain_server):
    command = plain_server.command()
    assert (
        command[1:4] == ["-m", "monailabel.main", "start_server"]
        and "monai_medplib.adapters.monailabel.server" not in command
    )
    assert command[command.index("--app") + 1] == str(APP_DIR)
    info = requests.get(plain_server.url + "/info/", timeout=30).json()
    assert sorted(info["models"]) == [
        "medplib_grounding",
        "medplib_refine",
        "medplib_region_vqa",
        "medplib_vqa",
    ]
    assert info["models"]["medplib_grounding"]["medplib"] == {
        "model": "demo",
        "device": "cpu",
        "dtype": "float32",
        "llm_dtype": "float32",
        "quantization": "none",
    }
    assert info["datastore"]["total"] == 1
    assert "Traceback" not in plain_server.log_text()


def test_demo_model_grounds_the_liver(plain_server, lits, tmp_path):
    _, case = lits
    client = load_slicer_client_module().MONAILabelClient(plain_server.url, tmpdir=str(tmp_path))
    params = {"text": "liver", "slices": ",".join(map(str, GROUNDED_SLICES))}
    path, result = slicer_infer(client, "medplib_grounding", "lits117", params)
    label, affine = read_result(path)
    np.testing.assert_allclose(affine, case.affine, atol=1e-4)
    assert np.flatnonzero(label.any(axis=(0, 1))).tolist() == GROUNDED_SLICES
    liver = case.label >= 1  # LiTS liver + tumour
    per_slice = {k: dice(label[:, :, k] == 1, liver[:, :, k]) for k in GROUNDED_SLICES}
    assert min(per_slice.values()) >= 0.75, per_slice
    assert dice(label[:, :, GROUNDED_SLICES] == 1, liver[:, :, GROUNDED_SLICES]) >= 0.85, per_slice
    assert result["label_names"] == {"liver": 1}
    assert result["medplib"]["targets"]["liver"]["slices_with_seg"] == result["medplib"]["slices"]


def test_force_seg_conf_makes_a_random_weight_model_decode_masks(public_fixture):
    # the tiny fixture model has random weights: without force_seg it rarely says <SEG> and grounds nothing
    sys.path.insert(0, str(APP_DIR))
    from lib.engine import MedPLIBEngine
    from monai.data import MetaTensor

    engine = MedPLIBEngine.from_conf(
        {"model": str(public_fixture / "model"), "device": "cpu", "force_seg": "true"}
    )
    volume = MetaTensor(np.random.default_rng(0).normal(0, 100, (1, 40, 32, 6)).astype(np.float32))
    label, names, summary = engine.ground(volume, ["liver", "spleen"], [1, 4], "axial")
    assert names == {"liver": 1, "spleen": 2} and label.shape == (40, 32, 6)
    assert set(np.flatnonzero(label.any(axis=(0, 1)))) <= {1, 4}
    assert summary["slices"] == [1, 4]
    assert {text: target["slices_with_seg"] for text, target in summary["targets"].items()} == {
        "liver": [1, 4],
        "spleen": [1, 4],
    }


def test_fast_grounding_conf_takes_the_checked_shortcut_with_the_same_labels(lits):
    sys.path.insert(0, str(APP_DIR))
    import torch
    from lib.engine import MedPLIBEngine
    from monai.data import MetaTensor

    _, case = lits
    volume = MetaTensor(torch.from_numpy(case.image)[None], affine=torch.as_tensor(case.affine))
    labels, generate_calls = {}, {}
    for flag in ("false", "true"):
        engine = MedPLIBEngine.from_conf({"model": "demo", "device": "cpu", "fast_grounding": flag})
        pipeline, calls = engine.pipeline, []
        generate = pipeline.generate
        pipeline.generate = lambda *args, _g=generate, _c=calls, **kw: _c.append(1) or _g(*args, **kw)
        labels[flag], _, _ = engine.ground(volume, ["liver"], [40, 56, 72], "axial")
        generate_calls[flag] = len(calls)
    assert generate_calls == {"false": 1, "true": 0}  # the shortcut's <SEG> check passed on every slice
    assert labels["true"][..., [40, 56, 72]].any() and np.array_equal(labels["true"], labels["false"])


def test_keyframes_conf_and_request_parameter(lits):
    """--conf keyframes runs the LLM on key slices only; a request's own keyframes ("off") overrides it."""
    sys.path.insert(0, str(APP_DIR))
    import torch
    from lib.engine import MedPLIBEngine
    from monai.data import MetaTensor

    _, case = lits
    volume = MetaTensor(torch.from_numpy(case.image)[None], affine=torch.as_tensor(case.affine))
    engine = MedPLIBEngine.from_conf({"model": "demo", "device": "cpu", "keyframes": "8"})
    slices = list(range(40, 73))  # 33 slices: keys 40, 48, 56, 64, 72 before any bisection
    _, _, keyed = engine.ground(volume, ["liver"], slices, "axial")
    _, _, exact = engine.ground(volume, ["liver"], slices, "axial", keyframes=None)
    assert exact["paths"]["llm_passes"] == 33 and "keyframes" not in exact["paths"]
    assert keyed["paths"]["keyframes"] == 8 and 5 <= keyed["paths"]["llm_passes"] < 33
    paths = keyed["targets"]["liver"]["slice_paths"]
    assert paths["key"] == 5 and sum(paths.values()) == 33
    with pytest.raises(ValueError, match="--conf keyframes"):
        MedPLIBEngine.from_conf({"model": "demo", "device": "cpu", "keyframes": "every other"})


@pytest.mark.parametrize("slots", [1, 2])
def test_decode_slots_bound_the_volumes_decoded_at_once(tmp_path, monkeypatch, slots):
    """Eight requests for four new images: each image is decoded once, never more than ``decode_slots`` at a time."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import nibabel as nib

    sys.path.insert(0, str(APP_DIR))
    import lib.engine as engine_module

    paths = []
    for n in range(4):
        data = np.random.default_rng(n).integers(-100, 100, (24, 20, 6)).astype(np.int16)
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / f"v{n}.nii.gz"))
        paths.append(str(tmp_path / f"v{n}.nii.gz"))
    engine = engine_module.MedPLIBEngine.from_conf(
        {"model": "demo", "device": "cpu", "decode_slots": str(slots)}
    )
    engine.load()
    lock, running, seen, decoded = threading.Lock(), [0], [], []
    real_load = engine_module.load_volume

    def counting_load(path, limits=None):
        with lock:
            running[0] += 1
            seen.append(running[0])
            decoded.append(path)
        time.sleep(0.3)  # long enough that the four decodes would overlap without the bound
        try:
            return real_load(path, limits)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(engine_module, "load_volume", counting_load)
    with ThreadPoolExecutor(max_workers=8) as pool:
        volumes = list(pool.map(lambda n: engine.volume(paths[n % 4]), range(8)))
    assert sorted(decoded) == sorted(paths)  # one decode per image
    assert max(seen) == slots
    assert [tuple(v.shape) for v in volumes] == [(1, 24, 20, 6)] * 8
    with pytest.raises(ValueError, match="--conf decode_slots"):
        engine_module.MedPLIBEngine.from_conf({"model": "demo", "device": "cpu", "decode_slots": "0"})


def test_refine_after_the_image_file_is_replaced_grounds_the_new_image(lits, tmp_path):
    """A refinement starts from the last grounding of the same image: a file replaced under the same path
    (``PUT /datastore/image`` with the same id) is a new image, whose grounding is run again."""
    import os

    import nibabel as nib

    sys.path.insert(0, str(APP_DIR))
    from lib.engine import MedPLIBEngine

    _, case = lits
    path = tmp_path / "study.nii.gz"
    nib.save(nib.Nifti1Image(case.image, case.affine), str(path))
    engine = MedPLIBEngine.from_conf({"model": "demo", "device": "cpu"})
    groundings = []
    ground = engine.ground
    engine.ground = lambda *args, **kw: groundings.append(1) or ground(*args, **kw)
    inside = np.argwhere(case.label[:, :, 64] == 1)[0].tolist()

    def refine() -> np.ndarray:
        return engine.refine(engine.volume(str(path)), 64, [(*inside, 64)], [], "axial", "liver")

    first = refine()
    refine()
    assert len(groundings) == 1  # the second refinement of the same file starts from the cached grounding
    flat = np.full(case.image.shape, -1000, dtype=case.image.dtype)  # air only: no liver to ground
    nib.save(nib.Nifti1Image(flat, case.affine), str(path))
    os.utime(path, ns=(1, 1))  # a different mtime even on a coarse clock
    refine()
    assert len(groundings) == 2
    assert first.any()
