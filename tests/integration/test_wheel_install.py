"""The wheel, installed the way README "Installation" tells users, and used from a folder outside the repository.

One fresh virtual environment for the module (pip's cache makes the second and later installs quick):

1. ``pip wheel --no-deps . -w dist`` in the clone;
2. in a new venv: ``pip install torch==2.13.0`` (the README's CPU command adds PyTorch's CPU index; here the machine's
   pip configuration already resolves the local CPU build, and ``TORCH_INDEX_URL`` is honoured as scripts/install.sh
   does), then ``pip install "<wheel>[app,demo]"``, then
   ``pip install --no-deps monailabel==0.8.5 pydicom-seg==0.4.1 liver-ct-segmentation-package==1.6.0``;
3. from a temporary folder, with no PYTHONPATH: ``medplib demo``, ``medplib serve`` (``/info/`` and one grounding),
   ``monailabel start_server --app <the installed app>``, ``medplib bundle export`` and the exported bundle through
   ``python -m monai.bundle run``; ``pip check`` (each remaining complaint named), ``import peft, transformers``, torch
   unchanged, no torchvision.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import pytest
import requests

from tests.support.paths import REPO

pytestmark = pytest.mark.slow

TORCH = "torch==2.13.0"
NO_DEPS = ("monailabel==0.8.5", "pydicom-seg==0.4.1", "liver-ct-segmentation-package==1.6.0")
# What `pip check` may say after the README's commands: the dependency trees the --no-deps command skips on purpose
# (README "Installation"), as "<package> <version> requires <requirement>" (MISSING) or "has <requirement>" (CONFLICT).
EXPECTED_PIP_CHECK = {
    ("monailabel", "sam2"),  # source-only; building it pulls a CUDA torch
    ("pydicom-seg", "jsonschema"),  # declares jsonschema<4, runs with 4
    ("liver-ct-segmentation-package", "torch"),  # declares torch==1.7.1: the package only ships the LiTS CT
    ("liver-ct-segmentation-package", "rich"),
    ("liver-ct-segmentation-package", "pytorch-lightning"),
    ("liver-ct-segmentation-package", "mlflow"),
    ("liver-ct-segmentation-package", "mrcfile"),
    ("liver-ct-segmentation-package", "captum"),
}
# Our own `pip check`, for pips that cannot run theirs (see _pip_check): every installed distribution's requirements
# (no extras, markers evaluated) against what is installed; prints "<dist> <req name>" per problem.
DEPENDENCY_CHECK = """
import importlib.metadata as md
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
installed = {canonicalize_name(d.metadata["Name"]): d.version for d in md.distributions()}
for dist in md.distributions():
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        have = installed.get(canonicalize_name(req.name))
        if have is None or (req.specifier and not req.specifier.contains(have, prereleases=True)):
            print(canonicalize_name(dist.metadata["Name"]), canonicalize_name(req.name))
"""


_ACTIVE: list[Path] = []  # the test venv, once made: commands then run as in an activated venv (README)


def _env() -> dict[str, str]:
    """The test run's environment without its PYTHONPATH / venv, with the test venv activated as the README does
    (the ``monailabel`` launcher is a shell script that runs the ``python`` found on PATH)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(
        PYTHONUNBUFFERED="1", MONAI_LABEL_TASKS_TRAIN="false", MONAI_LABEL_DATASTORE_AUTO_RELOAD="false"
    )
    if _ACTIVE:
        env.update(VIRTUAL_ENV=str(_ACTIVE[0]), PATH=os.pathsep.join([str(_ACTIVE[0] / "bin"), env["PATH"]]))
    return env


def _run(cmd: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, (
        f"{cmd} exited with {proc.returncode}\n{_tail(proc.stdout, 2000)}\n{_tail(proc.stderr, 4000)}"
    )
    return proc


def _tail(text: str, size: int) -> str:
    """The end of a command's output without pip's one-line notes on the machine's absent local index folders,
    which can fill a failure's whole excerpt and hide pip's error."""
    kept = [
        line for line in text.splitlines() if "is ignored: it is neither a file nor a directory" not in line
    ]
    return "\n".join(kept)[-size:]


class Venv:
    """A virtual environment made with the interpreter of the test run."""

    def __init__(self, root: Path) -> None:
        self.root = root
        base = getattr(sys, "_base_executable", sys.executable)
        _run([base, "-m", "venv", root], cwd=root.parent)
        _ACTIVE[:] = [root]

    def bin(self, name: str) -> Path:
        return self.root / "bin" / name

    def pip(self, *args: str, cwd: Path) -> subprocess.CompletedProcess:
        return _run(
            [self.bin("python"), "-m", "pip", "install", "--disable-pip-version-check", *args], cwd=cwd
        )

    def python(self, code: str, cwd: Path) -> str:
        return _run([self.bin("python"), "-c", code], cwd=cwd).stdout.strip()


STALE_MODULE = "_deleted_since_the_last_build.py"
# What the module's venv takes on disk (measured 3.6 GB: itk 1.5, torch 0.75) plus pip's unpacking room.
NEEDS_FREE_GB = 5


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("wheel_install")
    free_gb = shutil.disk_usage(root).free / 1e9
    if free_gb < NEEDS_FREE_GB:
        pytest.fail(
            f"{root} has {free_gb:.1f} GB free; installing the wheel into a fresh venv needs {NEEDS_FREE_GB}"
        )
    dist = root / "dist"
    # a module an earlier build of this clone left in build/ after it was deleted or renamed: not the wheel's
    stale = REPO / "build" / "lib" / "monai_medplib" / STALE_MODULE
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text("RENAMED = True\n")
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", ".", "-w", dist],
        REPO,
    )
    (wheel,) = dist.glob("monai_medplib-*.whl")
    venv = Venv(root / "venv")
    work = root / "work"  # outside the repository: nothing can be found beside the clone
    work.mkdir()
    index = os.environ.get("TORCH_INDEX_URL")
    venv.pip(*(["--index-url", index] if index else []), TORCH, cwd=work)
    torch_before = venv.python("import torch; print(torch.__version__)", work)
    venv.pip(f"{wheel}[app,demo]", cwd=work)
    venv.pip("--no-deps", *NO_DEPS, cwd=work)
    yield {"venv": venv, "work": work, "wheel": wheel, "torch": torch_before}
    shutil.rmtree(venv.root, ignore_errors=True)  # 3.6 GB that no later test reads


def test_the_wheel_carries_the_app_the_bundle_and_the_start_up_hook(installed):
    import zipfile

    names = zipfile.ZipFile(installed["wheel"]).namelist()
    assert "monai_medplib/_shipped/app/main.py" in names
    assert "monai_medplib/_shipped/bundle/configs/inference.json" in names
    assert "monai_medplib_pydicom_compat.pth" in names
    assert not [n for n in names if "/logs/" in n or "__pycache__" in n]


def test_the_wheel_ships_the_clones_modules_and_no_stale_one(installed):
    import zipfile

    names = zipfile.ZipFile(installed["wheel"]).namelist()
    shipped = {n for n in names if n.startswith("monai_medplib/") and "/_shipped/" not in n}
    tracked = subprocess.run(
        ["git", "ls-files", "monai_medplib"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    assert f"monai_medplib/{STALE_MODULE}" not in shipped
    assert {n for n in shipped if n.endswith(".py")} == {n for n in tracked if n.endswith(".py")}


def test_torch_unchanged_transformers_and_peft_import(installed):
    venv, work = installed["venv"], installed["work"]
    after = venv.python("import torch, transformers, peft; print(torch.__version__)", work)
    assert after == installed["torch"]
    assert (
        venv.python("import importlib.util as u; print(u.find_spec('torchvision') is None)", work) == "True"
    )


def _pip_check(venv: Venv, cwd: Path) -> set[tuple[str, str]]:
    """``pip check``'s complaints as (package, requirement) pairs.

    pip >= 24.2 stops ``pip check`` with InvalidTag on itk's wheel metadata ("Tag: itk-5.4.x-cp311-abi3-..." has
    four parts); when that is the failure, the same check runs with packaging (DEPENDENCY_CHECK) instead.
    """
    proc = subprocess.run(
        [venv.bin("python"), "-m", "pip", "check"], cwd=cwd, env=_env(), capture_output=True, text=True
    )
    if "InvalidTag" in proc.stderr and "itk" in proc.stderr:
        out = _run([venv.bin("python"), "-c", DEPENDENCY_CHECK], cwd=cwd).stdout
        return {tuple(line.split()) for line in out.splitlines() if line.strip()}
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    problems = set()
    for line in (
        proc.stdout.splitlines()
    ):  # "<dist> <ver> requires <req>, ..." / "<dist> <ver> has requirement <req>, ..."
        words = line.replace(",", " ").split()
        if len(words) > 3 and words[2] in ("requires", "has"):
            requirement = words[4] if words[2] == "has" else words[3]
            name = requirement.split("=")[0].split("<")[0].split(">")[0].lower().replace("_", "-")
            problems.add((words[0].lower().replace("_", "-"), name))
    return problems


def test_pip_check_names_only_what_the_no_deps_command_skips(installed):
    assert _pip_check(installed["venv"], installed["work"]) == EXPECTED_PIP_CHECK


def test_medplib_demo_outside_the_clone(installed):
    venv, work = installed["venv"], installed["work"]
    _run([venv.bin("medplib"), "demo", "--out", "demo"], cwd=work)
    report = json.loads((work / "demo" / "report.json").read_text())
    assert report["volumes"]["ct"]["targets"]["liver"]["dice_3d"] > 0.8
    for key in (
        "ct_image",
        "ct_dicom_series",
        "ct_label",
        "ct_overlay",
        "mr_image",
        "mr_label",
        "mr_overlay",
    ):
        assert (work / report["outputs"][key]).exists(), key
    seg = next((work / "demo").glob("*_seg.dcm"))
    dciodvfy = shutil.which("dciodvfy")  # tests/integration/test_dicom_conformance.py requires it in CI
    if dciodvfy:
        for path in [seg, *sorted((work / "demo" / "lits_117_dicom").glob("*.dcm"))[::16]]:
            check = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True)
            assert check.returncode == 0 and "Error" not in check.stderr, (path.name, check.stderr)


def test_exported_bundle_runs_with_python_m_monai_bundle(installed):
    venv, work = installed["venv"], installed["work"]
    if not (work / "demo" / "lits_117_ct.nii.gz").is_file():
        _run([venv.bin("medplib"), "demo", "--out", "demo"], cwd=work)
    _run([venv.bin("medplib"), "bundle", "export", "bundle"], cwd=work)
    bundle = work / "bundle"
    assert (bundle / "configs" / "inference.json").is_file() and (bundle / "LICENSE").is_file()
    prompt = {"image": str(work / "demo" / "lits_117_ct.nii.gz"), "text": "liver", "slices": [60, 64]}
    cmd = [venv.bin("python"), "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"]
    _run([*cmd, "--input_dict", repr(prompt)], cwd=bundle)
    answer = json.loads((bundle / "eval" / "lits_117_ct" / "lits_117_ct_answer.json").read_text())
    assert answer["grounding"]["slices"] == [60, 64]
    label = nib.load(bundle / "eval" / "lits_117_ct" / "lits_117_ct_seg.nii.gz")
    assert label.shape == (128, 128, 128) and int((label.get_fdata() > 0).sum()) > 500


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _server(cmd: list, cwd: Path, port: int, log: Path) -> Iterator[str]:
    """Start a server in its own process group, wait for GET /info/, stop the whole group afterwards."""
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(c) for c in cmd],
            cwd=cwd,
            env=_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
            try:
                if requests.get(url + "/info/", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(1)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def studies(installed) -> Path:
    venv, work = installed["venv"], installed["work"]
    if not (work / "demo" / "lits_117_ct.nii.gz").is_file():
        _run([venv.bin("medplib"), "demo", "--out", "demo"], cwd=work)
    folder = work / "studies"
    folder.mkdir(exist_ok=True)
    shutil.copy(work / "demo" / "lits_117_ct.nii.gz", folder / "ct1.nii.gz")
    return folder


def test_medplib_serve_finds_the_packaged_app_and_grounds(installed, studies):
    venv, work = installed["venv"], installed["work"]
    port = _free_port()
    cmd = [venv.bin("medplib"), "serve", "--studies", studies, "--port", port, "--device", "cpu"]
    with _server(cmd, work, port, work / "serve.log") as url:
        info = requests.get(url + "/info/", timeout=30).json()
        assert "medplib_grounding" in info["models"]
        reply = requests.post(
            url + "/infer/medplib_grounding",
            params={"image": "ct1", "output": "json"},
            files={"params": (None, json.dumps({"text": "liver", "slice": 64}))},
            timeout=300,
        )
        assert reply.status_code == 200, reply.text[:2000]
        assert reply.json()["medplib"]["targets"]["liver"]["voxels"] > 500


def test_plain_monailabel_start_server_with_the_installed_app(installed, studies):
    venv, work = installed["venv"], installed["work"]
    app = venv.python("from monai_medplib.adapters.monailabel.server import app_dir; print(app_dir())", work)
    assert Path(app).is_relative_to(venv.root) and (Path(app) / "main.py").is_file()
    port = _free_port()
    cmd = [venv.bin("monailabel"), "start_server", "--app", app, "--studies", studies, "--host", "127.0.0.1"]
    cmd += ["--port", port, "--conf", "model", "demo", "--conf", "device", "cpu"]
    with _server(cmd, work, port, work / "monailabel.log") as url:  # the .pth hook lets pydicom-seg import
        info = requests.get(url + "/info/", timeout=30).json()
        assert {"medplib_grounding", "medplib_vqa"} <= set(info["models"])
