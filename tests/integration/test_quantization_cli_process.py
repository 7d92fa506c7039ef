"""The ``medplib`` console entry really quantises (issue 17): ``ground`` and ``ask --quantization int8`` on the demo
model, each in a fresh process, load int8 weights into the LLM, write the mask and answer as the float32 model does
(the int8 fidelity gate: Dice >= 0.98, identical closed answers); a mode that does not exist and a device map naming
a GPU that is not there end in one error line with exit code 2 before any model is read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from monai_medplib.cli import main
from monai_medplib.data.demo_prompts import CLOSED_QUESTIONS
from monai_medplib.evaluation.acceptance import held_out_slices
from monai_medplib.evaluation.fidelity import middle_slices

pytestmark = pytest.mark.slow

# runs the real console entry; on the way it reports what the loader made of the LLM's first query projection
SPY = """
import sys
from monai_medplib.pipeline import MedPLIBPipeline

load = MedPLIBPipeline.from_pretrained.__func__


def spy(cls, *args, **kwargs):
    pipe = load(cls, *args, **kwargs)
    weight = pipe.model.model.layers[0].self_attn.q_proj.weight
    summary = pipe.model.quantization
    print("LOADED", type(weight).__name__, summary.mode if summary else None, file=sys.stderr)
    return pipe


MedPLIBPipeline.from_pretrained = classmethod(spy)
from monai_medplib.cli import main

sys.exit(main(sys.argv[1:]))
"""


def medplib(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SPY, *argv], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def loaded(stderr: str) -> list[str]:
    return next(line.split()[1:] for line in stderr.splitlines() if line.startswith("LOADED "))


@pytest.fixture(scope="module")
def liver_slice(tmp_path_factory) -> Path:
    """A held-out CT slice of the demo data that shows the liver, as a PNG."""
    demo_slice = next(s for s in middle_slices(held_out_slices()) if s.presence.get("liver"))
    path = tmp_path_factory.mktemp("quant-cli") / "slice.png"
    Image.fromarray(demo_slice.image).save(path)
    return path


def test_ground_and_ask_with_int8_in_a_fresh_process(liver_slice, capsys):
    folder = liver_slice.parent
    ground = ["ground", str(liver_slice), "liver", "--force-seg", "--json", "--out", str(folder)]
    done = medplib([*ground, "--quantization", "int8", "--mask-out", "int8.png"], folder)
    assert done.returncode == 0, done.stderr
    assert loaded(done.stderr) == ["Int8Tensor", "int8"]
    report = json.loads(done.stdout)
    assert report["outputs"]["mask"] == "int8.png" and report["targets"]["liver"]["has_seg"]
    # the float32 reference from the same entry point, in this process
    assert main([*ground, "--mask-out", str(folder / "fp32.png")]) == 0
    capsys.readouterr()
    int8, fp32 = (np.asarray(Image.open(folder / name)) for name in ("int8.png", "fp32.png"))
    assert int8.shape == fp32.shape == Image.open(liver_slice).size[::-1]
    assert set(np.unique(int8)) <= {0, 255} and fp32.any()
    a, b = int8 > 0, fp32 > 0
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.98
    assert report["targets"]["liver"]["pixels"] == int(a.sum())

    question = CLOSED_QUESTIONS["modality"]["held_out"][0]
    done = medplib(["ask", str(liver_slice), question, "--quantization", "int8"], folder)
    assert done.returncode == 0, done.stderr
    assert loaded(done.stderr) == ["Int8Tensor", "int8"]
    assert main(["ask", str(liver_slice), question]) == 0
    assert done.stdout.strip() == capsys.readouterr().out.strip() != ""


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--quantization", "int3"], "argument --quantization: invalid choice: 'int3'"),
        (["--device-map", '{"layers": "cuda:99"}'], "--device-map layers: device 'cuda:99'"),
        (["--device-map", '{"layers": null}'], "--device-map layers: None is not a device"),
    ],
)
def test_a_bad_mode_or_device_map_fails_before_loading(liver_slice, extra, message):
    # the model folder is empty: reading it would fail, naming the folder; the option is checked first
    (liver_slice.parent / "no-model").mkdir(exist_ok=True)
    done = medplib(["ground", liver_slice.name, "liver", "--model", "no-model", *extra], liver_slice.parent)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and message in errors[0], done.stderr
    assert "Traceback" not in done.stderr and "LOADED" not in done.stderr


def test_the_cli_takes_quantization_modes_as_the_api_bundle_and_app_do():
    """Any case, and "none": a script passing the same value to every front end gets the same model."""
    from monai_medplib.cli import build_parser
    from monai_medplib.devices import resolve_quantization

    for value in ("none", "NONE", "int8", "INT8", "Int4"):
        args = build_parser().parse_args(["ask", "x.png", "Q", "--quantization", value])
        assert resolve_quantization(args.quantization) == resolve_quantization(value)
