"""The ``medplib`` console entry: ask, ground (PNG outputs), error handling, the command registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from monai_medplib.cli import command_modules, main


@pytest.fixture(scope="module")
def cases(public_fixture):
    return json.loads((public_fixture / "expected" / "expected.json").read_text())["cases"]


def test_ask_prints_the_release_answer(public_fixture, cases, capsys):
    image = public_fixture / "inputs" / "image.png"
    model = str(public_fixture / "model")
    argv = ["ask", str(image), cases["a_vqa"]["question"], "--model", model, "--max-new-tokens", "12"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == cases["a_vqa"]["greedy"]["text"]


def test_ask_about_a_region(public_fixture, cases, capsys):
    inputs = public_fixture / "inputs"
    question = "What is the abnormality in <region>?"
    argv = ["ask", str(inputs / "image.png"), question, "--model", str(public_fixture / "model")]
    argv += ["--region-mask", str(inputs / "region_mask.png"), "--max-new-tokens", "12"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == cases["b_region_vqa"]["greedy"]["text"]
    assert main([*argv, "--official-eval-region"]) == 0
    assert capsys.readouterr().out.strip() == cases["b_region_vqa"]["evalpath_greedy"]["text"]


def test_ground_writes_mask_and_overlay(public_fixture, cases, tmp_path, capsys):
    image = public_fixture / "inputs" / "image.png"
    mask_png, overlay_png = tmp_path / "out" / "mask.png", tmp_path / "out" / "overlay.png"
    argv = ["ground", str(image), cases["c_grounding"]["question"], "--model", str(public_fixture / "model")]
    argv += ["--force-seg", "--mask-out", str(mask_png), "--overlay-out", str(overlay_png), "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["answer"] == "<SEG>" and summary["has_seg"] is True
    mask = np.asarray(Image.open(mask_png))
    assert mask.shape == (300, 420) and set(np.unique(mask)) <= {0, 255}
    expected = load_file(str(public_fixture / "expected" / "c_grounding.safetensors"))
    logits = expected["pred_mask_logits"][0].numpy()
    differ = (mask > 0) != expected["pred_mask_binary"][0].numpy().astype(bool)
    assert not (differ & (np.abs(logits - np.log(0.1 / 0.9)) > 1e-3)).any()
    assert summary["foreground_pixels"] == int((mask > 0).sum())
    overlay = np.asarray(Image.open(overlay_png).convert("RGB")).astype(int)
    original = np.asarray(Image.open(image).convert("RGB")).astype(int)
    fg = mask > 0
    assert np.array_equal(overlay[~fg], original[~fg])
    assert (overlay[fg][:, 0] >= original[fg][:, 0]).all() and (overlay[fg] != original[fg]).any()


def test_ground_default_output_names(public_fixture, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    image = public_fixture / "inputs" / "image_square.png"
    argv = ["ground", str(image), "Segment it.", "--model", str(public_fixture / "model")]
    assert main([*argv, "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "has_seg: False" in out  # no <SEG> from the random model: empty mask, as the release
    assert not np.asarray(Image.open(tmp_path / "image_square_mask.png")).any()
    assert (tmp_path / "image_square_overlay.png").is_file()


def test_user_errors_exit_2(public_fixture, tmp_path, capsys):
    image = str(public_fixture / "inputs" / "image.png")
    assert main(["ask", image, "What?", "--model", str(tmp_path)]) == 2
    assert "not a MedPLIB checkpoint" in capsys.readouterr().err
    model = str(public_fixture / "model")
    assert main(["ask", image, "What?", "--model", model, "--point", "900", "5"]) == 2
    assert "outside" in capsys.readouterr().err
    assert (
        main(["ask", image, "What?", "--model", model, "--point", "9", "5", "--box", "0", "0", "9", "9"]) == 2
    )
    assert "one region prompt" in capsys.readouterr().err


def test_registry_and_console_entry():
    names = [module.NAME for module in command_modules()]
    assert {"ask", "ground", "verify-parity"} <= set(names)
    for module in command_modules():
        assert callable(module.run) and callable(module.add_arguments) and module.HELP
    exe = Path(sys.executable).with_name("medplib")
    cmd = [str(exe), "--help"] if exe.exists() else [sys.executable, "-m", "monai_medplib.cli", "--help"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert done.returncode == 0
    for name in ("ask", "ground", "verify-parity"):
        assert name in done.stdout
