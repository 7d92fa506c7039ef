"""Every shell block and Python snippet of README.md, bundle/docs/README.md and apps/medplib/README.md, run as
written in a workspace laid out like a clone, and their outputs checked (shapes, affines, found / not found).

A block runs after the blocks above it in its document (they make its inputs, as for a reader going down the page).
What is changed before running, and why, is in three tables:

* ``EXCUSED``: commands that are not run, each with its reason (a GPU, the release weights, a PACS, a package
  index, root); they are covered by the tests named there.
* ``PLACEHOLDERS``: paths that stand for the reader's own files, replaced by the demo's own data (the LiTS CT as
  NIfTI and as a DICOM series, its model-ready slice, a cohort folder of them, a small MeCoVQA-layout set).
* ``BUDGETS``: numbers that only set how long a run takes, lowered.

Servers are run until ``/info/`` answers, on a free port, and stopped; the ``curl`` examples get a running
``medplib serve`` on the demo CT.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from tests.support import docs

REPO = Path(__file__).resolve().parents[2]
README, BUNDLE, APP = "README.md", "bundle/docs/README.md", "apps/medplib/README.md"
DOCS = (README, BUNDLE, APP)
VENV = Path(sys.prefix)
BLOCK_TIMEOUT = 1700  # seconds; a block with its checks fits the test's own timeout below

INDEX = "installs from a package index (no network here); tests/integration/test_wheel_install.py installs the built wheel into a fresh environment the same way"
PACS = "needs a PACS (Orthanc with DICOMweb): tests/e2e/test_app_dicomweb.py and tests/e2e/test_ohif.py run this path"

# (document, text in the block, text in the command or None for the whole block) -> why it is not run
EXCUSED: dict[tuple[str, str, str | None], str] = {
    (
        README,
        "bash scripts/install.sh",
        "bash scripts/install.sh",
    ): "creates the environment this test runs in (CI runs it: .ci/run)",
    (README, "bash scripts/install.sh", "bash scripts/test.sh"): "runs the test suite this test belongs to",
    (README, "python3 -m venv medplib-env", None): INDEX
    + "; its last step, medplib demo, is the Quick start's",
    (README, "--device cuda", None): "needs a CUDA GPU; " + INDEX,
    (
        README,
        "--model /models/MedPLIB-7b-2e",
        "--model /models/MedPLIB-7b-2e",
    ): "needs the release weights (24 GB) and a PACS; the demo model on the same path: tests/e2e/test_app_dicomweb.py",
    (
        README,
        "sudo scripts/install_e2e.sh",
        "sudo scripts/install_e2e.sh",
    ): "needs root (installs Orthanc, Chromium, OHIF's viewer)",
    (
        README,
        "sudo scripts/install_e2e.sh",
        "tests/e2e/test_ohif.py",
    ): "the end-to-end tests are part of scripts/test.sh",
    (README, "8042/dicom-web --model /path/to/medplib-model", None): PACS,
    (README, "image=<SeriesInstanceUID>", None): PACS,
    (README, "tests/support/ohif.py --dicomweb", None): PACS + " (and OHIF's viewer)",
    (
        README,
        "multi_gpu_batch_inference",
        "torchrun --nproc_per_node 4",
    ): "one process per GPU; two gloo processes on a CPU: tests/integration/test_bundle_run.py::test_torchrun_cohort_with_two_gloo_processes",
    (
        BUNDLE,
        "multi_gpu_batch_inference",
        "torchrun --nproc_per_node 4",
    ): "one process per GPU; two gloo processes on a CPU: tests/integration/test_bundle_run.py::test_torchrun_cohort_with_two_gloo_processes",
    (
        BUNDLE,
        "multi_gpu_train",
        "torchrun --nproc_per_node 2",
    ): "one training process per GPU; two gloo processes: tests/integration/test_training_ddp.py",
    (APP, "8042/dicom-web", "8042/dicom-web"): PACS,
    (
        APP,
        "8042/dicom-web",
        "--model /models/MedPLIB-7b-2e --device cuda",
    ): "needs the release weights and a CUDA GPU",
}

# document -> [(placeholder, what stands in for it)]; "{name}" are the workspace's files (see ``Workspace``)
PLACEHOLDERS: dict[str, list[tuple[str, str]]] = {
    README: [
        ("/path/to/volumes", "{studies}"),
        ("/etc/medplib/token", "{root}/medplib_token"),
        ("/data/ct", "{studies}"),
        ("/data/cohort", "{cohort}"),
    ],
    BUNDLE: [
        ("/data/lits_117_ct.nii.gz", "{ct}"),
        ("/data/lits_117_dicom", "{dicom}"),
        ("/data/slice.png", "{slice_png}"),
        ("/data/cohort", "{cohort}"),
        ("/data/datalist.json", "{datalist}"),
        ("/data/mecovqa", "{mecovqa}"),
    ],
    APP: [("/path/to/volumes", "{studies}"), ("--studies DIR", "--studies {studies}")],
}
# document -> [(number, lower number)]: what only sets how long a run takes (a smoke run's steps, samples scored)
BUDGETS: dict[str, list[tuple[str, str]]] = {
    README: [("--max_samples 20", "--max_samples 4")],
    BUNDLE: [("--max_steps 100", "--max_steps 2"), ("--max_samples 50", "--max_samples 4")],
}
# blocks that talk to a running server: (document, text in the block)
NEEDS_SERVER = {(APP, "/infer/medplib_vqa?image=lits117")}


def _blocks() -> list[docs.Block]:
    return [b for doc in DOCS for b in docs.read_blocks(REPO, doc)]


BLOCKS = _blocks()


def _excused(block: docs.Block) -> dict[str, str]:
    """``{command text: reason}`` of the block's excused commands (``""`` for the whole block)."""
    found = {}
    for (doc, in_block, command), reason in EXCUSED.items():
        if doc == block.doc and in_block in block.text:
            found["" if command is None else command] = reason
    return found


def _runs(block: docs.Block) -> bool:
    excused = _excused(block)
    if "" in excused:
        return False
    if block.lang == "python":
        return True
    return any(not c.startswith("#") and not any(k in c for k in excused) for c in docs.commands(block.text))


RUN = [b for b in BLOCKS if _runs(b)]


class Workspace:
    """A folder laid out like a clone (``.venv``, ``apps/``, ``bundle/``) plus the demo data that stands in for the
    docs' placeholders; runs blocks once each, in document order."""

    def __init__(self, root: Path) -> None:
        from monai_medplib.commands._inputs import volume_slice
        from monai_medplib.data.lits import load_lits_case
        from monai_medplib.io import load_volume, save_nifti, write_dicom_series
        from monai_medplib.io.outputs import save_png

        self.root = root
        self.roots = {
            doc: root / re.sub(r"\W+", "_", doc) for doc in DOCS
        }  # one clone-like folder per document
        for folder in self.roots.values():
            folder.mkdir()
            docs.clone_like(REPO, folder, VENV)
        data = root / "docs_data"
        case = load_lits_case()
        ct = save_nifti(case.image, data / "lits_117_ct.nii.gz", affine=case.affine, dtype=None)
        write_dicom_series(case.image, case.affine, data / "lits_117_dicom", series_description="LiTS 117 CT")
        slice_png = save_png(volume_slice(load_volume(ct), ct, "axial", 64).pixels, data / "slice.png")
        studies = data / "studies"
        studies.mkdir()
        (studies / "lits117.nii.gz").symlink_to(ct)
        cohort = data / "cohort"
        cohort.mkdir()
        shutil.copy(ct, cohort / "lits_117_ct.nii.gz")
        shutil.copytree(data / "lits_117_dicom", cohort / "lits_117_dicom")
        datalist = data / "datalist.json"
        datalist.write_text(json.dumps({"testing": [{"image": str(ct)}]}))
        self.values = {
            "root": str(self.roots[README]),
            "ct": str(ct),
            "dicom": str(data / "lits_117_dicom"),
            "slice_png": str(slice_png),
            "studies": str(studies),
            "cohort": str(cohort),
            "datalist": str(datalist),
            "mecovqa": str(_small_mecovqa(case, data / "mecovqa")),
        }
        self.case = case
        self.results: dict[docs.Block, object] = {}

    def cwd(self, block: docs.Block) -> Path:
        """The document's folder; the bundle's README is run from its bundle folder, as it says."""
        return self.roots[block.doc] / "bundle" if block.doc == BUNDLE else self.roots[block.doc]

    def text(self, block: docs.Block) -> str:
        text = block.text
        for old, new in PLACEHOLDERS.get(block.doc, []) + BUDGETS.get(block.doc, []):
            text = re.sub(re.escape(old) + r"(?![\w.-])", new.format(**self.values), text)
        return text

    def run(self, block: docs.Block):
        """Run ``block`` (after the runnable blocks above it in its document) and return its completed process."""
        for earlier in RUN:
            if earlier.doc == block.doc and earlier.line < block.line:
                done = self.results.get(earlier) or self._run_one(earlier)
                if done.returncode != 0:
                    pytest.fail(f"a block above failed first: {earlier.id}\n{_tail(done)}")
        if block not in self.results:
            self._run_one(block)
        return self.results[block]

    def _run_one(self, block: docs.Block):
        text = self.text(block)
        if block.lang == "python":
            script = self.roots[block.doc] / f"docs_snippet_{block.line}.py"
            script.write_text(text + "\n" + PY_CHECKS.get((block.doc, block.line), _py_checks(block)))
            env = docs.environment(VENV / "bin", activated=True)
            done = docs.run([sys.executable, str(script)], self.cwd(block), env, BLOCK_TIMEOUT)
        else:
            port = docs.free_port()
            script = docs.shell_script(
                docs.Block(block.doc, block.line, block.lang, text), _excused(block), port
            )
            activated = not re.search(r"(^|[\s;&|(])\.venv/bin/", block.text)
            env = docs.environment(VENV / "bin", activated)
            if any(doc == block.doc and key in block.text for doc, key in NEEDS_SERVER):
                with docs.Server(VENV / "bin", Path(self.values["studies"]), self.cwd(block), env) as server:
                    script = script.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")
                    done = docs.run(["bash", "-c", script], self.cwd(block), env, BLOCK_TIMEOUT)
            else:
                done = docs.run(["bash", "-c", script], self.cwd(block), env, BLOCK_TIMEOUT)
        self.results[block] = done
        return done


def _small_mecovqa(case, root: Path) -> Path:
    """A MeCoVQA-layout set from a few slices of the demo CT (the docs' ``/data/mecovqa``: a whole epoch of it is
    a short run)."""
    from monai_medplib.data.demo_dataset import build_demo_dataset
    from monai_medplib.transforms.intensity import SAMed2DNormalize

    eight = SAMed2DNormalize()(case.image.astype(np.float32)).numpy()
    picks = range(52, 76, 3)
    planes = [
        (plane, [take(eight, k) for k in picks], [take(case.label, k).astype(np.uint8) for k in picks])
        for plane, take in (
            ("axial", lambda v, k: np.ascontiguousarray(v[:, :, k].T)),
            ("coronal", lambda v, k: np.ascontiguousarray(v[:, k, :].T[::-1])),
            ("sagittal", lambda v, k: np.ascontiguousarray(v[k, :, :].T[::-1])),
        )
    ]
    build_demo_dataset(root, test_fraction=0.25, gap=0, planes=planes)
    return root


def _tail(done, chars: int = 4000) -> str:
    return f"exit {done.returncode}\n--- stdout\n{done.stdout[-chars:]}\n--- stderr\n{done.stderr[-chars:]}"


# ----------------------------------------------------------------------------------------------- checks
def _normal_mode(folder: Path) -> None:
    import os

    umask = os.umask(0)
    os.umask(umask)
    wrong = [
        f"{p} {oct(p.stat().st_mode & 0o777)}"
        for p in docs.files_under(folder)
        if p.stat().st_mode & 0o777 != 0o666 & ~umask
    ]
    assert not wrong, f"files without the normal mode {oct(0o666 & ~umask)}: {wrong[:5]}"


def _label_like(label_path: Path, image_path: Path) -> np.ndarray:
    """The label volume's data, after checking it lies on the image's voxel grid (shape and affine)."""
    label = nib.load(label_path)
    if Path(image_path).is_dir():  # a DICOM series: its grid as the pipeline reads it
        from monai_medplib.io import load_volume

        volume = load_volume(image_path)
        shape, affine = tuple(volume.shape[1:]), np.asarray(volume.affine)
    else:
        image = nib.load(image_path)
        shape, affine = image.shape, image.affine
    assert label.shape == shape, (label.shape, shape)
    np.testing.assert_allclose(label.affine, affine, atol=1e-4)
    return np.asarray(label.dataobj)


def _targets_agree(targets: dict, label: np.ndarray) -> None:
    """Found / voxels of a volume report agree with the label volume written beside it."""
    for text, t in targets.items():
        voxels = int(np.isin(label, t.get("label_values", [t["label"]])).sum())
        assert t["voxels"] == voxels and t["found"] == (voxels > 0), text
        assert not any("<SEG>" in a for a in t["answers"]), text  # the model's words, without its tokens


def _mask_png(path: Path, shape: tuple[int, int]) -> np.ndarray:
    mask = np.asarray(Image.open(path))
    assert mask.shape == shape and set(np.unique(mask)) <= {0, 255}, (path, mask.shape, np.unique(mask))
    return mask > 0


def check_quick_start(ws: Workspace, done) -> None:
    """``medplib demo``: each volume's label on its image's grid agreeing with the report, found / not found and the
    3D Dice printed for every text, the CT's DICOM-SEG on its series, the overlays."""
    root = ws.roots[README]
    report = json.loads((root / "outputs" / "demo" / "report.json").read_text())
    files = report["outputs"]
    assert set(report["volumes"]) == {"ct", "mr"}, list(report["volumes"])
    assert files["ct_image"].endswith("lits_117_ct.nii.gz") and files["mr_image"].endswith("mni152_t1.nii.gz")
    for key, summary in report["volumes"].items():
        label = _label_like(root / files[f"{key}_label"], root / files[f"{key}_image"])
        _targets_agree(summary["targets"], label)
        for text, t in summary["targets"].items():
            word = "found" if t["found"] else "not found"
            assert re.search(rf"^\s*{re.escape(text)}: {word}\b", done.stdout, re.M), (text, word)
            if t["in_reference"]:  # the figure against the reference label, as in the report
                assert 0 <= t["dice_3d"] <= 1, (text, t["dice_3d"])
                assert f"3D Dice ({text} vs the reference label): {t['dice_3d']:.4f}" in done.stdout, text
            else:
                assert t["dice_3d"] is None and f"({text} is not in this volume" in done.stdout, text
        assert Image.open(root / files[f"{key}_overlay"]).size[0] > 0
    assert [t for t, v in report["volumes"]["mr"]["targets"].items() if not v["in_reference"]] == ["liver"]
    import highdicom as hd
    import pydicom

    series = pydicom.dcmread(next((root / files["ct_dicom_series"]).iterdir())).SeriesInstanceUID
    if "ct_dicom_seg" in files:
        assert (
            hd.seg.segread(root / files["ct_dicom_seg"]).ReferencedSeriesSequence[0].SeriesInstanceUID
            == series
        )
    else:  # no DICOM-SEG only when nothing was grounded
        assert not any(t["found"] for t in report["volumes"]["ct"]["targets"].values())
    _normal_mode(root / "outputs" / "demo")


def check_command_line(ws: Workspace, done) -> None:
    root = ws.roots[README]
    assert np.asarray(Image.open(root / "slice.png")).shape == (128, 128)
    assert "slice.png: axial slice 64 of 128" in done.stdout
    masks = {
        t: _mask_png(root / "ground_out" / f"slice_{v}_{t}_mask.png", (128, 128))
        for v, t in ((1, "liver"), (2, "tumour"))
    }
    report = json.loads((root / "ground_out" / "slice_ground.json").read_text())
    for text, mask in masks.items():
        assert report["targets"][text]["found"] == bool(mask.any())
        assert report["targets"][text]["pixels"] == int(mask.sum())
    assert not (masks["liver"] & masks["tumour"]).any()  # one label per pixel
    _mask_png(root / "ground_out" / "lits_117_dicom_axial64_mask.png", (128, 128))
    label = _label_like(
        root / "volume_out" / "lits_117_ct_medplib.nii.gz", root / "outputs/demo/lits_117_ct.nii.gz"
    )
    volume_report = json.loads((root / "volume_out" / "lits_117_ct_medplib.json").read_text())
    _targets_agree(volume_report["targets"], label)
    assert set(np.flatnonzero(label.any(axis=(0, 1)))) <= set(range(40, 81))  # only the slices asked for
    for text in ("liver", "tumour"):
        assert re.search(rf"^{text}: (found, \d+ voxels|not found on the 41 axial slices)", done.stdout, re.M)
    keyframes = _label_like(
        root / "volume_kf" / "lits_117_ct_medplib.nii.gz", root / "outputs/demo/lits_117_ct.nii.gz"
    )
    _targets_agree(
        json.loads((root / "volume_kf" / "lits_117_ct_medplib.json").read_text())["targets"], keyframes
    )
    assert set(np.flatnonzero(keyframes.any(axis=(0, 1)))) <= set(range(40, 81))
    passes = re.search(
        r"^language model passes: (\d+) for 41 slices x 1 text \(keyframes every 8 slices\)",
        done.stdout,
        re.M,
    )
    assert passes and 6 <= int(passes[1]) <= 41, (
        passes
    )  # every 8th slice of 40-80 at least, each slice at most
    for folder in ("ground_out", "volume_out", "volume_kf"):
        _normal_mode(root / folder)


def check_training(ws: Workspace, done) -> None:
    run = ws.roots[README] / "runs" / "stage3"
    assert (run / "hf" / "model.safetensors").is_file() and (run / "hf" / "config.json").is_file()
    assert json.loads((run / "check" / "slice_ground.json").read_text())["targets"]["liver"]["request"]
    report = json.loads((run / "eval.json").read_text())
    assert report["model"] == "runs/stage3/hf" and "grounding" in json.dumps(report)
    assert (ws.roots[README] / "demo_data" / "train" / "MeCoVQA-Grounding.json").is_file()
    _normal_mode(run / "hf")


def check_readme_bundle(ws: Workspace, done) -> None:
    out = ws.roots[README] / "bundle" / "eval"
    ct = ws.roots[README] / "outputs" / "demo" / "lits_117_ct.nii.gz"
    answer = json.loads((out / "lits_117_ct" / "lits_117_ct_answer.json").read_text())
    _targets_agree(
        answer["grounding"]["targets"], _label_like(out / "lits_117_ct" / "lits_117_ct_seg.nii.gz", ct)
    )
    assert (out / "lits_117_dicom" / "lits_117_dicom_seg.dcm").is_file() or not any(
        t["found"]
        for t in json.loads((out / "lits_117_dicom" / "lits_117_dicom_answer.json").read_text())["grounding"][
            "targets"
        ].values()
    )
    for name in ("region", "slice"):  # region VQA on a voxel of the CT, and on a box of the 2D slice
        assert json.loads((out / name / f"{name}_answer.json").read_text())["region_vqa"]["answer"].strip()


def check_readme_cohort(ws: Workspace, done) -> None:
    out = ws.roots[README] / "bundle" / "eval"
    report = json.loads(
        (out / "cohort_report.json").read_text()
    )  # the cohort folder: the CT and its DICOM series
    assert report["studies"] == 2 and report["failed"] == [] and len(report["done"] + report["skipped"]) == 2
    assert (out / "metrics.json").is_file()
    assert (ws.roots[README] / "bundle" / "models" / "train" / "hf" / "model.safetensors").is_file()


def check_bundle_inference(ws: Workspace, done) -> None:
    out = ws.roots[BUNDLE] / "bundle" / "eval"
    ct = json.loads((out / "lits_117_ct" / "lits_117_ct_answer.json").read_text())
    _targets_agree(
        ct["grounding"]["targets"],
        _label_like(out / "lits_117_ct" / "lits_117_ct_seg.nii.gz", Path(ws.values["ct"])),
    )
    dicom = json.loads((out / "lits_117_dicom" / "lits_117_dicom_answer.json").read_text())
    assert list(dicom["grounding"]["targets"]) == ["liver", "liver tumour"]
    label = _label_like(out / "lits_117_dicom" / "lits_117_dicom_seg.nii.gz", Path(ws.values["dicom"]))
    _targets_agree(dicom["grounding"]["targets"], label)
    for name in (
        "ct_region",
        "slice",
    ):  # region VQA on a voxel of the CT (its own id), and on a box of the slice
        assert json.loads((out / name / f"{name}_answer.json").read_text())["region_vqa"]["answer"].strip()


def check_bundle_cohort(ws: Workspace, done) -> None:
    # the last command of the block: the datalist (one study, the CT)
    report = json.loads((ws.roots[BUNDLE] / "bundle" / "eval" / "cohort_report.json").read_text())
    assert report["studies"] == 1 and report["failed"] == [] and len(report["done"] + report["skipped"]) == 1


def check_bundle_training(ws: Workspace, done) -> None:
    assert (ws.roots[BUNDLE] / "bundle" / "eval" / "metrics.json").is_file()
    assert (ws.roots[BUNDLE] / "bundle" / "models" / "train" / "hf" / "model.safetensors").is_file()


def check_app_curl(ws: Workspace, done) -> None:
    reply = json.loads(done.stdout)  # output=json: the result JSON
    assert isinstance(reply["answer"], str) and reply["answer"].strip(), reply
    assert reply["medplib"]["question"] == "Is the liver visible?" and reply["medplib"]["slice"] == 60


# (document, text in the block) -> check of its outputs
CHECKS: dict[tuple[str, str], Callable[[Workspace, object], None]] = {
    (README, "bash scripts/install.sh"): check_quick_start,
    (README, "medplib slice outputs/demo/lits_117_ct.nii.gz"): check_command_line,
    (README, "medplib demo-data --out demo_data"): check_training,
    (README, "'points': [[40, 57, 64]]"): check_readme_bundle,
    (README, "--studies_dir /data/cohort"): check_readme_cohort,
    (BUNDLE, "/data/lits_117_ct.nii.gz"): check_bundle_inference,
    (BUNDLE, "--studies_dir /data/cohort"): check_bundle_cohort,
    (BUNDLE, "--max_steps 100"): check_bundle_training,
    (APP, "/infer/medplib_vqa?image=lits117"): check_app_curl,
}

# Python snippets: assertions appended to the snippet, run in its namespace
PY_CHECKS: dict[tuple[str, int], str] = {}


def _py_checks(block: docs.Block) -> str:
    if block.doc == README and "pipe.ground_volume(ct" in block.text:
        return (
            "import nibabel as _nib, numpy as _np\n"
            "assert res.mask.shape == (128, 128) and res.mask.dtype == bool and res.probs.shape == (128, 128)\n"
            "assert tuple(vol.label.shape) == (1, 128, 128, 128) and tuple(vol.probs.shape) == (2, 128, 128, 128)\n"
            "_np.testing.assert_allclose(_np.asarray(vol.label.affine), _nib.load(ct).affine, atol=1e-4)\n"
            "assert set(_np.unique(vol.label.numpy())) <= {0, 1, 2}\n"
            "_t = vol.summary()['targets']['liver']\n"
            "assert _t['voxels'] == int((vol.label == 1).sum()) and _t['found'] == (_t['voxels'] > 0)\n"
            "print('docs: python checks passed')\n"
        )
    return "print('docs: python checks passed')\n"


def _find(doc: str, key: str) -> docs.Block:
    matches = [b for b in BLOCKS if b.doc == doc and key in b.text]
    assert len(matches) == 1, f"{doc}: {key!r} is in {len(matches)} blocks"
    return matches[0]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("docs"))


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("block", RUN, ids=[b.id for b in RUN])
def test_a_documented_block_runs_as_written(workspace: Workspace, block: docs.Block) -> None:
    done = workspace.run(block)
    assert done.returncode == 0, f"{block.id}\n{_tail(done)}"
    if block.lang == "python":
        assert "docs: python checks passed" in done.stdout
    for (doc, key), check in CHECKS.items():
        if doc == block.doc and key in block.text:
            check(workspace, done)
    servers = [c for c in docs.commands(workspace.text(block)) if docs.SERVER.search(c)]
    servers = [c for c in servers if not any(k in c for k in _excused(block)) and not c.startswith("#")]
    assert done.stdout.count("docs: server answered /info/") == len(servers), done.stdout[-2000:]


def test_every_block_is_run_or_excused_and_every_table_entry_is_used() -> None:
    assert {b.doc for b in BLOCKS} == set(DOCS)
    for (doc, in_block, command), reason in EXCUSED.items():
        matches = [b for b in BLOCKS if b.doc == doc and in_block in b.text]
        assert len(matches) == 1, f"EXCUSED {doc}: {in_block!r} is in {len(matches)} blocks"
        if command is not None:
            assert any(command in c for c in docs.commands(matches[0].text)), (doc, command)
        assert reason
    for doc, key in [*CHECKS, *NEEDS_SERVER]:
        _find(doc, key)
    for doc, pairs in PLACEHOLDERS.items():
        for old, _ in pairs:
            assert any(old in b.text for b in BLOCKS if b.doc == doc), (
                f"PLACEHOLDERS {doc}: {old!r} is not used"
            )
    for block in BLOCKS:
        if block in RUN:
            continue
        excused = _excused(block)
        assert excused, f"{block.id} is neither run nor excused"
    # every run block with outputs is checked beyond its exit code
    assert all(
        any(d == b.doc and k in b.text for d, k in CHECKS) or b.lang == "python" or docs.SERVER.search(b.text)
        for b in RUN
    ), [b.id for b in RUN if not any(d == b.doc and k in b.text for d, k in CHECKS)]
