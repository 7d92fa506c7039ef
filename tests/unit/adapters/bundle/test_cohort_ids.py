"""Study ids of a cohort (monai_medplib/adapters/bundle/cohort.py): one output folder per study, whatever the
names in the studies folder; and a runner that cannot write its output folder refuses before any study runs."""

from __future__ import annotations

import errno
import tempfile
from pathlib import Path

import pytest

from monai_medplib.adapters.bundle.cohort import collect_studies


def _touch(folder: Path, *names: str) -> None:
    for name in names:
        if name.endswith("/"):
            (folder / name).mkdir()
        else:
            (folder / name).write_bytes(b"")


def test_ids_are_unique_when_a_suffix_name_is_already_a_study(tmp_path):
    # ct.png would be "ct_2" by count, the name of the DICOM folder next to it: both would write out/ct_2/
    _touch(tmp_path, "ct.nii.gz", "ct.png", "ct_2/", "good.png")
    studies = collect_studies(folder=tmp_path)
    ids = {Path(s["image"]).name: s["id"] for s in studies}
    assert ids == {"ct.nii.gz": "ct", "ct.png": "ct_3", "ct_2": "ct_2", "good.png": "good"}
    assert len(set(ids.values())) == len(studies)


def test_dots_in_names_are_kept(tmp_path):
    _touch(tmp_path, "case7.arterial.nii.gz", "case7.venous.nii.gz", "1.2.840.113619.2.55/")
    assert sorted(s["id"] for s in collect_studies(folder=tmp_path)) == [
        "1.2.840.113619.2.55",
        "case7.arterial",
        "case7.venous",
    ]


def test_runner_refuses_an_output_folder_it_cannot_write(tmp_path, monkeypatch):
    from monai_medplib.adapters.bundle.runner import BundlePromptRunner

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    BundlePromptRunner(pipeline=None, output_dir=tmp_path / "out")  # created, and writable
    assert (tmp_path / "out").is_dir() and not list((tmp_path / "out").iterdir())
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    with pytest.raises(ValueError, match="output_dir .*ro: cannot write there \\(Read-only file system\\)"):
        BundlePromptRunner(pipeline=None, output_dir=tmp_path / "ro")


def test_a_datalist_id_is_kept_as_given_and_given_twice_is_refused(tmp_path):
    import json

    _touch(tmp_path, "a.nii.gz", "b.nii.gz", "c.nii.gz")
    datalist = tmp_path / "dl.json"
    datalist.write_text(json.dumps([{"image": "a.nii.gz"}, {"image": "b.nii.gz", "id": "a"}, "c.nii.gz"]))
    ids = {Path(s["image"]).name: s["id"] for s in collect_studies(datalist=datalist)}
    assert ids == {
        "b.nii.gz": "a",
        "a.nii.gz": "a_2",
        "c.nii.gz": "c",
    }  # the given id wins, the derived name moves
    datalist.write_text(json.dumps([{"image": "a.nii.gz", "id": "x"}, {"image": "b.nii.gz", "id": "x"}]))
    with pytest.raises(ValueError, match=r"the id\(s\) \['x'\] are given to more than one study"):
        collect_studies(datalist=datalist)


@pytest.mark.parametrize("bad", [None, 7, ["c.nii.gz"], {"image": None}, {"image": ""}])
def test_a_datalist_entry_without_an_image_path_is_named(tmp_path, bad):
    import json

    datalist = tmp_path / "dl.json"
    datalist.write_text(json.dumps({"testing": ["a.nii.gz", bad]}))
    with pytest.raises(ValueError, match="entry 1 must be a path or a dict with an 'image' path"):
        collect_studies(datalist=datalist)


def test_an_output_folder_inside_the_studies_folder_is_not_a_study(tmp_path):
    _touch(tmp_path, "a.nii.gz", "results/", "b/")
    ids = sorted(s["id"] for s in collect_studies(folder=tmp_path, exclude=tmp_path / "results"))
    assert ids == ["a", "b"]


def test_each_nccl_rank_works_on_its_own_gpu(tmp_path, monkeypatch):
    """all_gather_object runs on the current CUDA device: without set_device every rank would use cuda:0."""
    import torch
    import torch.distributed as dist

    from monai_medplib.adapters.bundle.cohort import CohortReport, CohortRunner

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: any(c[0] == "init" for c in calls))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", str(d))))
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), [obj, obj]))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append(("destroy",)))

    class Pipeline:
        device = torch.device("cuda", 1)

    class Runner:
        pipeline, output_dir = Pipeline(), tmp_path

    cohort = CohortRunner(Runner(), [], distributed=True)
    monkeypatch.setattr(cohort, "_run_shard", lambda studies, world: CohortReport())
    cohort.run()
    assert calls == [("set_device", "cuda:1"), ("init", "nccl"), ("destroy",)]
