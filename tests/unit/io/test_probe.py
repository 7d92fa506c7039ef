"""Size limits from the header alone (monai_medplib/io/readers.py: probe_volume, VolumeLimits): real files of every
kind, a small gzip that expands to half a gigabyte, files that are not images."""

from __future__ import annotations

import gzip
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest
from pydicom.data import get_testdata_file

from monai_medplib.io import readers
from monai_medplib.io.readers import VolumeHeader, VolumeLimits, VolumeTooLarge, load_volume, probe_volume
from monai_medplib.user_input import UserInputError


def test_header_of_each_format(tmp_path):
    array = np.zeros((30, 20, 10), np.int16)
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(tmp_path / "v.nii.gz"))
    itk.imwrite(
        itk.image_from_array(np.ascontiguousarray(array.transpose(2, 1, 0))), str(tmp_path / "v.nrrd")
    )
    assert probe_volume(tmp_path / "v.nii.gz") == VolumeHeader((30, 20, 10))
    assert probe_volume(tmp_path / "v.nrrd") == VolumeHeader((30, 20, 10))
    ct = get_testdata_file("CT_small.dcm")  # 128 x 128, one frame
    assert probe_volume(ct) == VolumeHeader((128, 128, 1))
    assert probe_volume(get_testdata_file("emri_small.dcm")) == VolumeHeader((64, 64, 10))  # multi-frame
    from PIL import Image

    Image.new("RGB", (40, 30)).save(tmp_path / "p.png")
    assert probe_volume(tmp_path / "p.png") == VolumeHeader((40, 30), 3)


def test_a_small_file_that_expands_is_refused_without_decoding(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((512, 512, 1025), np.uint8), np.eye(4)), str(bomb))
    assert bomb.stat().st_size < 3 * 2**20
    header = probe_volume(bomb)
    assert header.voxels == 512 * 512 * 1025 > readers.DEFAULT_MAX_VOXELS
    monkeypatch.setattr(readers, "_loader", lambda *a: pytest.fail("the data was decoded"))
    with pytest.raises(VolumeTooLarge, match=r"'bomb.nii.gz' has 512 x 512 x 1025 = 268,697,600 voxels"):
        load_volume(bomb, limits=VolumeLimits())
    with pytest.raises(VolumeTooLarge, match="MiB once decoded; the limit is 100 MiB"):
        VolumeLimits(max_bytes=100 * 2**20).check(VolumeHeader((512, 512, 200)), "ct.nii.gz")


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("empty.nii.gz", b"", "empty file"),
        ("text.nii.gz", b"hello, not gzip" * 10, "not a readable image"),
        ("text.nii", b"hello" * 100, "not a readable image"),
        ("noise.nrrd", bytes(range(256)) * 8, "no reader recognises it"),
        ("noise.mha", b"ObjectType = Image\nNDims = x\n", "not a readable image"),
    ],
)
def test_files_that_are_not_images(tmp_path, name, content, words):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserInputError, match=words) as info:
        probe_volume(path)
    assert str(tmp_path) not in str(info.value)  # the file is named, not the server path


def test_truncated_gzip_probes_but_does_not_decode(tmp_path):
    whole = tmp_path / "whole.nii"
    noise = np.random.default_rng(0).integers(-1000, 1000, (40, 40, 20)).astype(np.int16)
    nib.save(nib.Nifti1Image(noise, np.eye(4)), str(whole))
    packed = gzip.compress(whole.read_bytes())
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(packed[: len(packed) // 2])
    assert probe_volume(cut) == VolumeHeader((40, 40, 20))
    with pytest.raises(Exception):  # noqa: B017 - every reader has its own error for missing data
        load_volume(cut, limits=VolumeLimits())


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        probe_volume(Path(tmp_path) / "nope.nii.gz")
