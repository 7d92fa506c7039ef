"""The ``medplib`` console entry on 2D images: ask, ground (names, several texts, PNG outputs, the report), the
command registry, and what comes before the heavy imports."""

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

from monai_medplib import MedPLIBPipeline
from monai_medplib.cli import command_modules, main
from monai_medplib.io.outputs import LABEL_COLOURS


@pytest.fixture(scope="module")
def cases(public_fixture):
    return json.loads((public_fixture / "expected" / "expected.json").read_text())["cases"]


@pytest.fixture(scope="module")
def tiny(public_fixture):
    return MedPLIBPipeline.from_pretrained(public_fixture / "model")


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


def test_ground_writes_mask_overlay_and_report(public_fixture, cases, tmp_path, capsys):
    image = public_fixture / "inputs" / "image.png"
    mask_png, overlay_png = tmp_path / "out" / "mask.png", tmp_path / "out" / "overlay.png"
    argv = ["ground", str(image), cases["c_grounding"]["question"], "--model", str(public_fixture / "model")]
    argv += ["--force-seg", "--mask-out", str(mask_png), "--overlay-out", str(overlay_png), "--json"]
    argv += ["--out", str(tmp_path / "out")]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    target = report["targets"][cases["c_grounding"]["question"]]
    # the release decodes "<SEG>"; the report gives the model's words without MedPLIB tokens
    assert target["has_seg"] is True and target["answer"] == ""
    assert target["request"] == cases["c_grounding"]["question"]  # a sentence is sent as written
    mask = np.asarray(Image.open(mask_png))
    assert mask.shape == (300, 420) and set(np.unique(mask)) <= {0, 255}
    expected = load_file(str(public_fixture / "expected" / "c_grounding.safetensors"))
    logits = expected["pred_mask_logits"][0].numpy()
    differ = (mask > 0) != expected["pred_mask_binary"][0].numpy().astype(bool)
    assert not (differ & (np.abs(logits - np.log(0.1 / 0.9)) > 1e-3)).any()
    assert target["pixels"] == int((mask > 0).sum()) and target["found"] == bool(target["pixels"])
    overlay = np.asarray(Image.open(overlay_png).convert("RGB")).astype(int)
    original = np.asarray(Image.open(image).convert("RGB")).astype(int)
    assert overlay.shape[1] == 420 and overlay.shape[0] > 300  # the image, then the legend strip
    picture, legend = overlay[:300], overlay[300:]
    fg = mask > 0
    assert np.array_equal(picture[~fg], original[~fg])
    assert (picture[fg][:, 0] >= original[fg][:, 0]).all() and (picture[fg] != original[fg]).any()
    assert (legend == LABEL_COLOURS[0]).all(axis=-1).sum() >= 100  # the label's swatch
    saved = json.loads((tmp_path / "out" / "image_ground.json").read_text())
    assert saved == report


def test_ground_default_output_names_and_not_found(public_fixture, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    image = public_fixture / "inputs" / "image_square.png"
    argv = ["ground", str(image), "Segment it.", "--model", str(public_fixture / "model")]
    assert main([*argv, "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    # no <SEG> from the random model: an empty mask, as the release, and the output says so
    assert "Segment it.: not found (no <SEG> in the answer)" in out
    assert not np.asarray(Image.open(tmp_path / "image_square_mask.png")).any()
    assert (tmp_path / "image_square_overlay.png").is_file()
    report = json.loads((tmp_path / "image_square_ground.json").read_text())
    assert report["targets"]["Segment it."]["found"] is False


def test_ground_names_and_several_texts(public_fixture, tiny, tmp_path, capsys):
    """Names become the trained requests; several texts share one label map by the volume rule (the most probable
    text where it passes 0.1), one 0/255 PNG per text and an overlay with a colour per text."""
    image = public_fixture / "inputs" / "image.png"
    argv = ["ground", str(image), "liver, left kidney", "spleen", "--model", str(public_fixture / "model")]
    assert main([*argv, "--force-seg", "--out", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    texts = ["liver", "left kidney", "spleen"]
    assert list(report["targets"]) == texts
    requests = [f"Please segment the {t}." for t in texts]
    assert [report["targets"][t]["request"] for t in texts] == requests
    probs = np.stack([r.probs for r in tiny.ground_batch([str(image)] * 3, requests, force_seg=True)])
    best = probs.argmax(axis=0)
    expected = np.where(probs.max(axis=0) > 0.1, best + 1, 0)
    for value, text in enumerate(texts, start=1):
        slug = text.replace(" ", "_")
        png = np.asarray(Image.open(tmp_path / f"image_{value}_{slug}_mask.png"))
        assert set(np.unique(png)) <= {0, 255}
        assert np.array_equal(png > 0, expected == value), text
        assert report["targets"][text]["pixels"] == int((expected == value).sum())
        assert report["targets"][text]["own_pixels"] == int((probs[value - 1] > 0.1).sum())
    overlay = np.asarray(Image.open(tmp_path / "image_overlay.png").convert("RGB"))
    legend = overlay[300:]
    for value in range(1, 4):
        assert (legend == LABEL_COLOURS[value - 1]).all(axis=-1).any()  # each text's swatch


def test_ask_and_ground_read_a_single_dicom_image(public_fixture, tmp_path, capsys):
    """A single-frame DICOM file is a 2D image, mapped to 8 bit by the SA-Med2D percentiles of its own pixels."""
    from monai_medplib.data.lits import load_lits_case
    from monai_medplib.io import write_dicom_series

    case = load_lits_case()
    write_dicom_series(case.image, case.affine, tmp_path / "series")
    one = sorted((tmp_path / "series").iterdir())[64]
    model = str(public_fixture / "model")
    assert main(["ask", str(one), "What is shown?", "--model", model, "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["ground", str(one), "liver", "--model", model, "--force-seg", "--out", str(tmp_path)]) == 0
    mask = np.asarray(Image.open(tmp_path / f"{one.name.split('.')[0]}_mask.png"))
    assert mask.shape == (128, 128)


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (its pixel data is empty)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def bad_files(public_fixture, tmp_path_factory):
    """Files a careless user passes: damaged volumes and images, a file where a folder belongs, a damaged model."""
    import shutil

    import nibabel as nib

    root = tmp_path_factory.mktemp("bad")
    ct = np.random.default_rng(0).normal(size=(16, 16, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(ct, np.eye(4)), root / "ct.nii.gz")
    (root / "truncated.nii.gz").write_bytes((root / "ct.nii.gz").read_bytes()[:300])
    (root / "empty.nii.gz").write_bytes(b"")
    (root / "text.nii.gz").write_text("not a volume\n")
    (root / "text.png").write_text("not an image\n")
    (root / "huge.png").write_bytes(_png_header(20000, 20000))
    png = (public_fixture / "inputs" / "image.png").read_bytes()
    (root / "truncated.png").write_bytes(png[: len(png) // 3])
    (root / "afile").write_text("x")
    (root / "image.png").write_bytes(png)
    from monai_medplib.io import write_dicom_series

    write_dicom_series(ct * 100, np.eye(4), root / "series")
    for name, damage in (("weights", "model.safetensors"), ("config", "config.json")):
        model = root / f"model_{name}"
        shutil.copytree(public_fixture / "model", model)
        target = next(model.rglob(damage))
        target.write_bytes(target.read_bytes()[:40])
    return root


BAD_INPUTS = [
    # (argv after the command word, what the one line must name)
    (["ask", "truncated.nii.gz", "Q"], "truncated.nii.gz: cannot be read as a volume"),
    (["ask", "empty.nii.gz", "Q"], "empty.nii.gz: cannot be read as a volume"),
    (["ground", "text.nii.gz", "liver"], "text.nii.gz: cannot be read as a volume"),
    (["ask", "text.png", "Q"], "text.png: not an image file"),
    (["ask", "huge.png", "Q"], "huge.png: too large"),
    (["ground", "truncated.png", "liver"], "truncated.png: cannot decode the image"),
    (["ground", "ct.nii.gz", "liver", "--out", "afile"], "--out afile: afile is a file"),
    (["ground", "ct.nii.gz", "liver", "--out", "afile/sub"], "afile is a file"),
    (["ask", "ct.nii.gz", "Q", "--slice", "99"], "--slice 99 is outside ct.nii.gz"),
    (["ask", "text.png", "Q", "--slice", "1"], "a 2D image has no slices"),
    (["ground-volume", "ct.nii.gz", "liver", "--slices", "5-2"], "runs backwards"),
    (["ground-volume", "ct.nii.gz", "liver", "--keyframes", "0"], "--keyframes must be >= 1, got 0"),
    (["ground-volume", "ct.nii.gz", "liver", "--keyframes", "-3"], "--keyframes must be >= 1, got -3"),
    (["ground-volume", "ct.nii.gz", "liver", "--keyframes", "abc"], "--keyframes must be a whole number"),
    (["slice", "text.png"], "a 2D image, not a volume"),
    (
        ["slice", "ct.nii.gz", "--index", "-1"],
        "--index -1 is outside ct.nii.gz: its axial plane has slices 0-7",
    ),
    (["ask", "ct.nii.gz", "Q", "--model", "model_weights"], "model.safetensors: not a safetensors file"),
    (["ask", "ct.nii.gz", "Q", "--model", "model_config"], "config.json: not valid JSON"),
    (["eval", "--out", "."], "--out . is a folder"),
    (["eval", "--out", "r.json", "--predictions", "./r.json"], "--predictions r.json is the --out file"),
    (["eval", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["ask", "ct.nii.gz", "Q", "--point", "1", "1", "--box", "0", "0", "2", "2"], "give one region prompt"),
    # an output that would replace the input, another output, or land inside an input series folder
    (["slice", "ct.nii.gz", "--out", "ct.nii.gz"], "--out ct.nii.gz: the slice is written as a PNG"),
    (["slice", "ct.nii.gz", "--out", "s.jpg"], "give a name ending in .png"),
    (["slice", "series", "--out", "series/s.png"], "--out series/s.png is inside the input folder series"),
    (["slice", "image.png", "--out", "image.png"], "--out image.png is the input image.png"),
    (
        ["ground", "image.png", "liver", "--mask-out", "image.png"],
        "--mask-out image.png is the input image.png",
    ),
    (["ground", "image.png", "liver", "--mask-out", "m.png", "--overlay-out", "m.png"], "is also --mask-out"),
    (["ground", "image.png", "liver", "--mask-out", "m.jpg"], "--mask-out m.jpg: written as a PNG"),
    (["ground-volume", "series", "liver", "--out", "series"], "--out series is the input series"),
    (["ground-volume", "series", "liver", "--out", "series/seg"], "is inside the input folder series"),
]


@pytest.mark.parametrize(
    ("argv", "names"), BAD_INPUTS, ids=[" ".join(a[:2]) + f" #{i}" for i, (a, _) in enumerate(BAD_INPUTS)]
)
def test_bad_input_is_one_line_and_exit_2(bad_files, argv, names, monkeypatch, capsys):
    monkeypatch.chdir(bad_files)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert names in err, err


def test_a_command_refused_after_its_checks_leaves_no_empty_output_folder(bad_files, tmp_path, capsys):
    """--out folders are created when the arguments are checked; a later refusal (here a damaged model) removes
    those it created while they are empty, and keeps a folder the user had and one that holds anything."""
    image, model = str(bad_files / "ct.nii.gz"), str(bad_files / "model_weights")
    new = tmp_path / "new" / "deeper"
    assert main(["ground", image, "liver", "--model", model, "--out", str(new)]) == 2
    assert "model.safetensors: not a safetensors file" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # "new" and "new/deeper" both went
    had = tmp_path / "had"
    had.mkdir()
    assert main(["ground", image, "liver", "--model", model, "--out", str(had / "sub")]) == 2
    assert list(tmp_path.iterdir()) == [had] and list(had.iterdir()) == []
    kept = tmp_path / "kept"
    (kept / "sub").mkdir(parents=True)
    (kept / "note.txt").write_text("the user's")
    assert main(["ground", image, "liver", "--model", model, "--out", str(kept / "sub" / "x")]) == 2
    assert (
        sorted(p.name for p in kept.iterdir()) == ["note.txt", "sub"] and list((kept / "sub").iterdir()) == []
    )


def test_an_output_folder_that_cannot_be_written_is_refused_before_the_model_loads(
    bad_files, monkeypatch, capsys
):
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.chdir(bad_files)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    monkeypatch.setattr(MedPLIBPipeline, "from_pretrained", no_model)
    assert main(["ground-volume", "ct.nii.gz", "liver", "--out", "ro"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "medplib ground-volume: error: --out ro: cannot write there (Read-only file system)"
    ]


@pytest.mark.parametrize("code", ["ENOSPC", "EROFS", "EDQUOT"])
def test_a_full_disk_or_read_only_mount_while_writing_is_one_line(
    bad_files, tmp_path, monkeypatch, capsys, code
):
    import errno

    def full(*args, **kwargs):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.chdir(bad_files)
    monkeypatch.setattr(os, "replace", full)  # every output is renamed into place (io/atomic.py)
    assert main(["slice", "ct.nii.gz", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and os.strerror(getattr(errno, code)) in err, err


def test_a_device_that_is_not_there_is_one_line(bad_files, monkeypatch, capsys):
    import torch

    monkeypatch.chdir(bad_files)
    device = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    assert main(["ask", "ct.nii.gz", "Q", "--device", device]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"device '{device}'" in err


def test_errors_come_before_the_heavy_imports(tmp_path):
    """A wrong path, a file where a folder is needed, a missing model: one line, exit 2, and torch never loaded."""
    (tmp_path / "afile").write_text("x")
    code = (
        "import sys\nfrom monai_medplib.cli import main\n"
        "codes = [main(a) for a in ("
        "['ask', 'nope.png', 'What?'], ['ground', 'nope.nii.gz', 'liver'], ['ground-volume', 'nope', 'liver'],"
        "['slice', 'nope'], ['ground', 'afile', 'liver', '--out', 'afile'], ['ask', 'afile', 'Q', '--model', 'x'],"
        "['verify-parity', 'nope'], ['train', '--stage', '3', '--data-root', 'nope', '--out', 'o'])]\n"
        "print(codes, 'torch' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[2,", "2,", "2,", "2,", "2,", "2,", "2,", "2]", "False"]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 8 and all(line.startswith("medplib ") and ": error: " in line for line in lines)
    assert "nope.png: no such file or folder" in lines[0]
    assert "--out afile: afile is a file" in lines[4]
    assert "--model x: not found" in lines[5]


def test_registry_and_console_entry():
    names = [module.NAME for module in command_modules()]
    assert {"ask", "ground", "ground-volume", "slice", "demo-data", "verify-parity"} <= set(names)
    for module in command_modules():
        assert callable(module.run) and callable(module.add_arguments) and module.HELP
    exe = Path(sys.executable).with_name("medplib")
    cmd = [str(exe), "--help"] if exe.exists() else [sys.executable, "-m", "monai_medplib.cli", "--help"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert done.returncode == 0
    for name in ("ask", "ground", "slice", "verify-parity"):
        assert name in done.stdout


def test_eval_progress_is_one_bar(capsys):
    """The evaluation's progress lines (one per batch and step) drive one bar that is redrawn in place."""
    from monai_medplib.commands.eval import ProgressBar

    bar = ProgressBar()
    lines = [f"vqa: {n}/234" for n in range(8, 234, 8)] + ["vqa: 234/234"]
    lines += [f"grounding {n}/156" for n in range(8, 157, 8)] + ["closed VQA 234", "clicks 50/156"]
    for line in lines:
        bar(line)
        if line.startswith("grounding 8/"):
            assert (bar.bar.total, bar.bar.n) == (156, 8)  # a new step restarts the bar with its total
    assert (bar.bar.n, bar.bar.total) == (50, 156)
    bar.close()
    err = capsys.readouterr().err
    assert len(lines) > 50 and err.count("\n") == 1 and "vqa: 100%" in err


def test_a_series_the_reader_takes_prints_no_itk_warning(tmp_path, capfd):
    """A slice 0.1 mm off its place (within the reader's tolerance) made ITK print "Non uniform sampling" lines
    to the terminal around the command's own output."""
    import pydicom

    from monai_medplib.io import write_dicom_series

    volume = np.random.default_rng(3).integers(-500, 500, (12, 10, 7)).astype(np.float32)
    files = write_dicom_series(volume, np.diag([0.8, 0.8, 1.5, 1.0]), tmp_path / "jitter")
    moved = pydicom.dcmread(files[3])
    x, y, z = (float(v) for v in moved.ImagePositionPatient)
    moved.ImagePositionPatient = [x, y, z + 0.1]
    moved.save_as(files[3])
    assert main(["slice", str(tmp_path / "jitter"), "--out", str(tmp_path / "s.png")]) == 0
    out, err = capfd.readouterr()
    assert err == "" and "axial slice 3 of 7" in out
