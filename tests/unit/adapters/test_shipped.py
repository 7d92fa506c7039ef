"""Finding the MONAI Label app and the bundle (monai_medplib/adapters/shipped.py), exporting the bundle, and the
writable copy of the app; the wheel itself is tested in tests/integration/test_wheel_install.py."""

from __future__ import annotations

import ast
import json

import pytest

from monai_medplib.adapters import shipped
from monai_medplib.adapters.monailabel import server
from monai_medplib.cli import main
from monai_medplib.commands.bundle import export_bundle
from tests.support.paths import REPO


def test_an_editable_install_finds_the_clone_s_folders():
    assert shipped.shipped_dir("app") == REPO / "apps" / "medplib"
    assert shipped.shipped_dir("bundle") == REPO / "bundle"
    with pytest.raises(ValueError, match="unknown shipped folder 'weights'"):
        shipped.shipped_dir("weights")


def test_the_wheel_s_copy_wins_and_a_missing_one_is_named(tmp_path, monkeypatch):
    package = tmp_path / "site-packages" / "monai_medplib"
    (package / shipped.SHIPPED_DIR / "bundle" / "configs").mkdir(parents=True)
    (package / shipped.SHIPPED_DIR / "bundle" / "configs" / "metadata.json").write_text("{}")
    monkeypatch.setattr(shipped, "_PACKAGE", package)
    assert shipped.shipped_dir("bundle") == package / shipped.SHIPPED_DIR / "bundle"
    with pytest.raises(FileNotFoundError, match="the MedPLIB app was not found"):
        shipped.shipped_dir("app")


def test_bundle_export_writes_a_copy_and_refuses_a_used_folder(tmp_path, capsys):
    target = export_bundle(tmp_path / "b")
    assert json.loads((target / "configs" / "metadata.json").read_text())["name"] == "MedPLIB"
    assert (target / "LICENSE").is_file() and (target / "large_files.yml").is_file()
    assert not (target / "eval").exists() and not (target / "models").exists()
    assert main(["bundle", "export", str(tmp_path / "b")]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err


def test_bundle_export_suggests_the_volume_medplib_demo_writes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bundle", "export", "b"]) == 0
    printed = capsys.readouterr().out
    prompt = ast.literal_eval(printed.split("--input_dict ")[1].strip().strip('"'))
    # README: `medplib demo` writes outputs/demo/lits_117_ct.nii.gz
    assert prompt == {
        "image": str(tmp_path / "outputs/demo/lits_117_ct.nii.gz"),
        "text": "Please segment the liver.",
    }
    assert (
        f"cd {tmp_path / 'b'} && python -m monai.bundle run --config_file configs/inference.json" in printed
    )


def test_a_read_only_app_is_copied_to_a_writable_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDPLIB_APP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(server.os, "access", lambda path, mode: False)  # as a system-wide install
    copy = server.app_dir()
    assert copy.parent == tmp_path / "cache" and (copy / "main.py").is_file()
    assert not (copy / "logs").exists()  # MONAI Label's run-time folders are not copied
    assert server.app_dir() == copy  # once


def test_a_package_installed_apart_that_is_missing_is_named_in_one_line(tmp_path):
    # the README's --no-deps command installs monailabel and the demo CT package; without it, one line, exit code 2
    import subprocess
    import sys

    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('liver_ct_segmentation_package', 'monailabel'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Hide())\n"
    )
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    for args, expected in (
        (
            ["demo", "--out", str(tmp_path / "demo")],
            "pip install --no-deps liver-ct-segmentation-package==1.6.0",
        ),
        (["serve", "--studies", str(tmp_path)], "No module named 'monailabel' (README 'Installation'"),
    ):
        run = subprocess.run(
            [sys.executable, "-m", "monai_medplib.cli", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
        assert expected in run.stderr
