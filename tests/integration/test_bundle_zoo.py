"""What MONAI model-zoo's CI checks on a bundle (``ci/verify_bundle.py -m min``, read in the model-zoo repository),
done here by our own code, offline, on ``bundle/``.

``verify(bundle, mode="min")`` runs, in order: the large-file download and the necessary / preferred files
(``verify_bundle_directory``), the version and changelog (``verify_version_changes``) and the metadata against the
schema its ``schema`` URL names (``verify_metadata_format``). The config keys of the zoo's CONTRIBUTING.md ("Preferred
Files and Keys", the former ``verify_bundle_keys``) are checked too, through MONAI's own bundle property tables.

Named exclusions (what cannot apply to a 24 GB VLM, each as the zoo itself excludes bundles in
``ci/bundle_custom_data.py``; also listed in bundle/docs/README.md):

* "download large files" (``exclude_download_large_file_list``, as maisi_ct_generative): the files are GBs and CI has
  no network. Instead, large_files.yml is read by MONAI's own ``download_large_files`` with the download stubbed.
* "preferred file models/model.pt" (``exclude_verify_preferred_files_list``, as maisi_ct_generative and
  pediatric_abdominal_ct_segmentation): the weights are a multi-file Hugging Face checkpoint loaded by ``network_def``,
  not one state dict. ``configs/inference.json``, the other preferred file, is checked.
* "version not yet in models/model_info.json": that file is the zoo's publishing registry.
* full mode only, not run by ``-m min``: ``verify_net_in_out`` (a prompt-driven text model has no fixed tensor in /
  out), TorchScript export (the model generates text), ``supported_apps`` properties (none declared).
* the legacy ``train#handlers`` key: a MedPLIB stage's loop has no ignite handlers (the zoo removed the key check from
  ``verify_bundle.py``; MONAI's TrainProperties, checked here, do not require it).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path

import numpy as np
from monai.bundle import ConfigParser, ConfigWorkflow, verify_metadata
from monai.bundle.properties import InferProperties, MetaProperties, TrainProperties
from packaging.requirements import Requirement
from PIL import Image

from tests.support.paths import REPO

BUNDLE = REPO / "bundle"
CONFIGS = BUNDLE / "configs"
# The schema the zoo's bundles of 2024-25 name, and the sha256 of the copy kept in bundle/schema (7340 bytes, from
# Project-MONAI/project-monai.github.io public/schema/, a verbatim copy of the MONAI-extra-test-data 0.8.1 asset).
SCHEMA_URL = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
)
SCHEMA = BUNDLE / "schema" / "meta_schema_20240725.json"
SCHEMA_SHA256 = "cd64aa8a5904426f6fc6855dabe46af8c742d5bad644b4e9cfb78ebad09ad678"
HASH_TYPES = ("md5", "sha1", "sha256", "sha512")


def _metadata() -> dict:
    return json.loads((CONFIGS / "metadata.json").read_text())


def _ids(config_file: Path) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(config_file))
    return parser


def test_necessary_and_preferred_files():
    # verify_bundle_directory: LICENSE by exactly that name (LICENSE.txt is refused by the code), metadata.json,
    # and configs/inference.{json,yaml,yml}; models/model.pt is a named exclusion (module docstring)
    assert (BUNDLE / "LICENSE").is_file()
    assert isinstance(_metadata(), dict)
    assert (CONFIGS / "inference.json").is_file()
    assert not (BUNDLE / "models" / "model.pt").exists()  # the exclusion is real: no stand-in file either
    # the zoo lints every .py of a bundle; ours has none (the code lives in monai_medplib)
    assert not list(BUNDLE.rglob("*.py"))


def test_large_files_are_what_monai_downloads(monkeypatch):
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "large_files.yml"))
    entries = parser.get()["large_files"]
    assert isinstance(entries, list) and entries
    paths = [e["path"] for e in entries]
    assert len(set(paths)) == len(paths)
    for entry in entries:
        assert not Path(entry["path"]).is_absolute() and ".." not in Path(entry["path"]).parts
        assert entry["url"].startswith("https://")
        if entry.get("hash_val"):
            assert entry["hash_type"] in HASH_TYPES
            assert (
                len(entry["hash_val"])
                == {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128}[entry["hash_type"]]
            )
    # MONAI's own reader, with the download stubbed (zoo: download_large_files -> download_url(**entry))
    import monai.bundle.scripts as scripts

    calls = []
    monkeypatch.setattr(scripts, "download_url", lambda **kwargs: calls.append(kwargs))
    scripts.download_large_files(bundle_path=str(BUNDLE))
    assert [Path(c["filepath"]) for c in calls] == [BUNDLE / p for p in paths]
    assert all(set(c) <= {"url", "filepath", "hash_val", "hash_type"} for c in calls)
    clip = next(c for c in calls if c["filepath"].endswith("clip-vit-large-patch14-336/pytorch_model.bin"))
    assert clip["hash_type"] == "sha256"  # download_url's default is md5: the type must be given


def test_version_and_changelog():
    meta = _metadata()
    assert meta["version"] in meta["changelog"]
    assert meta["name"]  # the zoo's former verify_bundle_keys: metadata "name"


def test_metadata_against_the_kept_copy_of_monai_s_published_schema():
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256
    meta = _metadata()
    assert meta["schema"] == SCHEMA_URL
    verify_metadata(
        meta_file=str(CONFIGS / "metadata.json"), filepath=str(SCHEMA)
    )  # file exists: no download
    for key, prop in MetaProperties.items():  # _meta_#version, monai_version, pytorch_version, numpy_version
        if prop["required"]:
            assert prop["id"].replace("_meta_::", "") in meta, key


def test_required_packages_are_pinned_to_what_is_installed():
    # the zoo pip-installs name==version of every entry, plus monai / torch / numpy at the metadata's versions
    meta = _metadata()
    for name, version in meta["required_packages_version"].items():
        requirement = Requirement(f"{name}=={version}")
        assert importlib.metadata.version(requirement.name) == version, name
    import monai
    import numpy
    import torch

    assert (monai.__version__, numpy.__version__) == (meta["monai_version"], meta["numpy_version"])
    assert torch.__version__.split("+")[0] == meta["pytorch_version"]


def _required_ids(properties: dict) -> list[str]:
    return [p["id"].replace("::", "#") for p in properties.values() if p["required"]]


def test_config_keys_of_the_train_and_inference_workflows():
    inference, train = _ids(CONFIGS / "inference.json"), _ids(CONFIGS / "train.json")
    for config, properties in ((inference, InferProperties), (train, TrainProperties)):
        missing = [i for i in _required_ids(properties) if i not in config]
        assert missing == [], missing
    # CONTRIBUTING.md "Preferred Files and Keys" (the former verify_bundle_keys)
    for key in ("bundle_root", "device", "network_def", "inferer"):
        assert key in inference, key
    for key in ("bundle_root", "device", "dataset_dir", "train#trainer#max_epochs", "train#dataset#data"):
        assert key in train, key


def test_inference_workflow_properties_through_monai(tmp_path):
    image = tmp_path / "slice.png"
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(image)
    workflow = ConfigWorkflow(
        workflow_type="infer",
        config_file=str(CONFIGS / "inference.json"),
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False,
        bundle_root=str(BUNDLE),
        output_dir=str(tmp_path / "out"),
        network_def=None,  # as the zoo's unit tests disable the checkpoint loader: properties, not weights
        input_dict={"image": str(image), "text": "liver"},
    )
    workflow.initialize()
    assert workflow.check_properties() == []
