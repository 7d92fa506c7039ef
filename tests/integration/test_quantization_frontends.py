"""``quantization`` and ``device_map`` reach the model from every front end: ``medplib --quantization /
--device-map``, the bundle's ``quantization`` setting and the app's ``--conf quantization``; their mistakes end in
one line naming the option."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
from monai.bundle import ConfigWorkflow

from monai_medplib.cli import main
from monai_medplib.user_input import UserInputError
from tests.support.mlserver import APP_DIR
from tests.support.paths import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def image(public_fixture) -> Path:
    return public_fixture / "inputs" / "image.png"


def test_cli_quantization_and_device_map(image, public_fixture, capsys, caplog):
    model = str(public_fixture / "model")
    args = ["ask", str(image), "Is there a lesion?", "--model", model, "--max-new-tokens", "3"]
    with caplog.at_level(logging.WARNING, logger="monai_medplib.checkpoint"):
        assert main([*args, "--quantization", "int4", "--device-map", "auto"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() and "Traceback" not in out.err
    # the loader says which weights int4 left in int8 (the tiny model's intermediate size 176)
    assert "in_features 176 is not a multiple of 32: int8 instead" in caplog.text
    for extra, message in [
        (["--device-map", '{"layers": "cuda:3"}'], "--device-map layers: device 'cuda:3'"),
        (
            ["--device-map", '{"layers": "cpu"}'],
            "device_map places no device for vision, sam, seg_head, embed, head",
        ),
        (["--device-map", "{layers"], "--device-map must be auto or a JSON object"),
        (["--device-map", "auto", "--device", "cpu"], "give --device or --device-map, not both"),
    ]:
        assert main([*args, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit):  # argparse lists the modes
        main([*args, "--quantization", "int2"])
    assert "--quantization: invalid choice: 'int2'" in capsys.readouterr().err


def test_bundle_quantization_setting(tmp_path, image, public_fixture):
    workflow = ConfigWorkflow(
        workflow_type="infer",
        config_file=str(REPO / "bundle" / "configs" / "inference.json"),
        logging_file=False,
        bundle_root=str(REPO / "bundle"),
        ckpt_path=str(public_fixture / "model"),
        output_dir=str(tmp_path / "out"),
        max_new_tokens=3,
        quantization="int8",
        input_dict={"image": str(image), "question": "What is shown?"},
    )
    workflow.initialize()
    (result,) = workflow.run()[0]
    assert isinstance(result["vqa"]["answer"], str)
    pipeline = workflow.parser.get_parsed_content("network")
    assert pipeline.model.quantization.mode == "int8"
    assert workflow.parser.get_parsed_content("inferer").settings()["quantization"] == "int8"


def test_app_conf_quantization(public_fixture):
    sys.path.insert(0, str(APP_DIR))
    from lib.engine import MedPLIBEngine

    engine = MedPLIBEngine.from_conf(
        {"model": str(public_fixture / "model"), "device": "cpu", "quantization": "int8"}
    )
    assert engine.describe()["quantization"] == "int8"
    assert engine.pipeline.model.quantization.kinds == {"int8": 21}
    # what /info says the LLM computes in is what it computes in
    assert engine.describe()["llm_dtype"] == str(engine.pipeline.dtype).replace("torch.", "") == "bfloat16"
    assert engine.describe()["dtype"] == str(engine.pipeline.placement("vision")[1]).replace("torch.", "")
    assert MedPLIBEngine.from_conf({"model": "demo", "device": "cpu"}).describe()["quantization"] == "none"
    with pytest.raises(UserInputError, match=r"--conf quantization: quantization 'fp4' is not supported"):
        MedPLIBEngine.from_conf({"model": "demo", "device": "cpu", "quantization": "fp4"})
