"""Output file names from input names (monai_medplib/io/readers.py ``file_stem``) and the mode of atomically written
files (monai_medplib/io/atomic.py), on real files."""

from __future__ import annotations

import os
import stat
import sys

import pytest

from monai_medplib.io.atomic import atomic_write_text
from monai_medplib.io.readers import file_stem


@pytest.mark.parametrize(
    "name, stem",
    [
        ("ct.nii.gz", "ct"),
        ("case7.arterial.nii.gz", "case7.arterial"),
        ("case7.venous.nii.gz", "case7.venous"),
        ("scan.v2.NRRD", "scan.v2"),
        ("slice.0040.png", "slice.0040"),
        ("image.dcm", "image"),
        ("notes", "notes"),
    ],
)
def test_file_stem_drops_only_the_image_suffix(tmp_path, name, stem):
    assert file_stem(tmp_path / name) == stem


def test_a_dicom_folder_keeps_its_whole_name(tmp_path):
    folder = tmp_path / "1.2.840.113619.2.55.3"
    folder.mkdir()
    other = tmp_path / "1.2.840.113619.2.55.4"
    other.mkdir()
    assert file_stem(folder) == folder.name != file_stem(other)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the umask from /proc")
def test_atomic_writes_take_the_umask_without_changing_it(tmp_path, monkeypatch):
    """Setting the umask to read it would, for that instant, give every file another thread creates mode 0666."""
    calls = []
    real_umask = os.umask
    monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or real_umask(mask))
    old = real_umask(0o027)
    try:
        path = atomic_write_text(tmp_path / "report.json", "{}")
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    finally:
        real_umask(old)
    assert calls == []
