"""The guarded local datastore (monai_medplib/adapters/monailabel/datastore.py) on real files: what it lists, what it
refuses to store, and saves that a failure half-way cannot corrupt."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException

from monai_medplib.adapters.monailabel.datastore import GuardedLocalDatastore, looks_like_mask
from monai_medplib.io.readers import VolumeLimits, VolumeTooLarge
from monai_medplib.user_input import UserInputError

SHAPE = (20, 16, 6)


def _save(path, array, affine=None):
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


@pytest.fixture
def store(tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    rng = np.random.default_rng(0)
    _save(studies / "ct1.nii.gz", rng.normal(0, 100, SHAPE).astype(np.int16))
    _save(studies / "ct1_seg.nii.gz", np.zeros(SHAPE, np.uint8))
    _save(studies / "segmentation-3.nii", np.zeros(SHAPE, np.uint8))
    (studies / "notes.txt").write_text("not a study")
    (studies / ".hidden.nii.gz").write_bytes(b"x")
    return GuardedLocalDatastore(str(studies), limits=VolumeLimits(max_voxels=10_000))


def test_masks_and_dot_files_are_not_studies(store, tmp_path):
    assert store.list_images() == ["ct1"]
    assert [
        looks_like_mask(n) for n in ("liver_seg.nii.gz", "case.seg.nrrd", "ct_mask.nrrd", "Label_1.nii")
    ] == [True] * 4
    assert [looks_like_mask(n) for n in ("ct1.nii.gz", "segmental_ct.nii.gz", "liver.nrrd")] == [False] * 3
    listed = GuardedLocalDatastore(str(tmp_path / "studies"), list_masks=True).list_images()
    assert sorted(listed) == ["ct1", "ct1_seg", "segmentation-3"]
    # a datastore JSON of an earlier start that listed the masks: they go at the next start
    assert GuardedLocalDatastore(str(tmp_path / "studies")).list_images() == ["ct1"]


def test_add_image_checks_names_and_content(store, tmp_path):
    good = _save(tmp_path / "scan.nii.gz", np.ones(SHAPE, np.int16))
    assert store.add_image("", str(good), {"who": "test"}) == "scan"
    assert sorted(store.list_images()) == ["ct1", "scan"]
    stored = tmp_path / "studies" / "scan.nii.gz"
    assert stored.read_bytes() == good.read_bytes()
    with pytest.raises(UserInputError, match="path separator"):
        store.add_image("../x", str(good), {})
    text = tmp_path / "notes.nii.gz"
    text.write_text("hello")
    with pytest.raises(UserInputError, match="'notes.nii.gz' is not a readable image"):
        store.add_image("notes", str(text), {})
    truncated = tmp_path / "cut.nii"
    truncated.write_bytes(_save(tmp_path / "whole.nii", np.ones(SHAPE, np.int16)).read_bytes()[:-200])
    with pytest.raises(UserInputError, match="truncated or corrupt"):
        store.add_image("cut", str(truncated), {})
    flat = _save(tmp_path / "flat.nii.gz", np.ones((20, 16, 1), np.int16))
    with pytest.raises(UserInputError, match="2D image"):
        store.add_image("flat", str(flat), {})
    big = _save(tmp_path / "big.nii.gz", np.zeros((30, 30, 30), np.uint8))
    with pytest.raises(VolumeTooLarge, match="max_voxels"):
        store.add_image("big", str(big), {})
    assert sorted(store.list_images()) == ["ct1", "scan"]
    assert sorted(p.name for p in (tmp_path / "studies").iterdir() if p.name.endswith(".nii.gz")) == [
        ".hidden.nii.gz",
        "ct1.nii.gz",
        "ct1_seg.nii.gz",
        "scan.nii.gz",
    ]


@pytest.mark.parametrize(
    "name, header",
    [
        (
            "leak.mha",
            b"ObjectType = Image\nNDims = 3\nDimSize = 8 8 4\nElementType = MET_UCHAR\nElementDataFile = {}\n",
        ),
        ("leak.nrrd", b"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 8 8 4\nencoding: raw\ndata file: {}\n\n"),
    ],
)
def test_a_header_that_reads_its_voxels_from_another_file_is_refused(store, tmp_path, name, header):
    """A client's MetaImage / NRRD header could name any file on the server as its voxel data."""
    secret = tmp_path / "other_patient.raw"
    secret.write_bytes(bytes(range(256)))  # 8 x 8 x 4 bytes: ITK would read it as the image
    upload = tmp_path / name
    upload.write_bytes(header.replace(b"{}", str(secret).encode()))
    with pytest.raises(UserInputError, match=f"{name}' keeps its voxels in another file"):
        store.add_image("leak", str(upload), {})
    with pytest.raises(UserInputError, match="keeps its voxels in another file"):
        store.save_label("ct1", str(upload), "final", {})
    assert store.list_images() == ["ct1"] and not (tmp_path / "studies" / name).exists()
    # the same header is read as a volume where no limits apply (a user's own files, through the CLI)
    from monai_medplib.io.readers import load_volume

    assert tuple(load_volume(upload).shape) == (1, 8, 8, 4)
    # a MetaImage with its data inside (ElementDataFile = LOCAL, as ITK writes .mha) is stored
    import itk

    local = tmp_path / "local.mha"
    itk.imwrite(itk.image_from_array(np.zeros((6, 16, 20), np.int16)), str(local))
    assert store.add_image("local", str(local), {}) == "local"


def test_save_label_checks_against_its_image(store, tmp_path):
    label = _save(tmp_path / "l.nii.gz", (np.arange(np.prod(SHAPE)).reshape(SHAPE) % 3).astype(np.uint8))
    assert store.save_label("ct1", str(label), "final", {}) == "ct1"
    assert open(store.get_label_uri("ct1", "final"), "rb").read() == label.read_bytes()
    wrong = _save(tmp_path / "w.nii.gz", np.zeros((20, 16, 5), np.uint8))
    with pytest.raises(UserInputError, match="has size 20 x 16 x 5; its image has 20 x 16 x 6"):
        store.save_label("ct1", str(wrong), "final", {})
    half = _save(tmp_path / "h.nii.gz", np.full(SHAPE, 0.5, np.float32))
    with pytest.raises(UserInputError, match="whole numbers"):
        store.save_label("ct1", str(half), "final", {})
    with pytest.raises(ImageNotFoundException):
        store.save_label("nope", str(label), "final", {})
    with pytest.raises(UserInputError, match="label tag"):
        store.save_label("ct1", str(label), "../../x", {})
    with pytest.raises(LabelNotFoundException):
        store.remove_label("ct1", "original")
    assert open(store.get_label_uri("ct1", "final"), "rb").read() == label.read_bytes()


def test_replacing_an_image_that_its_labels_do_not_fit_is_refused_and_loses_nothing(store, tmp_path):
    label = _save(tmp_path / "l.nii.gz", np.ones(SHAPE, np.uint8))
    store.save_label("ct1", str(label), "final", {})
    stored = (tmp_path / "studies" / "ct1.nii.gz").read_bytes()
    bigger = _save(tmp_path / "ct1.nii.gz", np.zeros((24, 16, 6), np.int16))
    with pytest.raises(
        UserInputError,
        match="labels 'final' \\(20 x 16 x 6\\) that do not fit the new image \\(24 x 16 x 6\\)",
    ):
        store.add_image("ct1", str(bigger), {})
    assert (tmp_path / "studies" / "ct1.nii.gz").read_bytes() == stored
    assert open(store.get_label_uri("ct1", "final"), "rb").read() == label.read_bytes()
    # the same size (a re-upload of the volume, as Slicer does) replaces the image and keeps the labels
    same = _save(tmp_path / "same.nii.gz", np.full(SHAPE, 7, np.int16))
    assert store.add_image("ct1", str(same), {}) == "ct1"
    assert (tmp_path / "studies" / "ct1.nii.gz").read_bytes() == same.read_bytes()
    assert store.get_label_uri("ct1", "final")


def test_ohif_binary_label_is_placed_on_the_image_grid(store, tmp_path):
    values = np.zeros(SHAPE, np.uint8)
    values[3:7, 2:5, 1] = 2
    raw = tmp_path / "label.bin"
    raw.write_bytes(values.tobytes(order="F"))
    store.save_label("ct1", str(raw), "final", {})
    saved = nib.load(store.get_label_uri("ct1", "final"))
    np.testing.assert_array_equal(np.asarray(saved.dataobj), values)
    raw.write_bytes(b"\1" * 10)
    with pytest.raises(UserInputError, match="one byte per voxel"):
        store.save_label("ct1", str(raw), "final", {})


def test_a_binary_label_named_like_its_image_does_not_overwrite_it(tmp_path):
    """An infer request uploads x.nii.gz and x.bin into one folder; the label's NIfTI must not replace the image."""
    from monai_medplib.adapters.monailabel.datastore import binary_label_to_nifti

    image = _save(tmp_path / "x.nii.gz", np.full(SHAPE, 99, np.int16))
    before = image.read_bytes()
    values = np.zeros(SHAPE, np.uint8)
    values[2:5, 3:9, 1:4] = 1
    raw = tmp_path / "x.bin"
    raw.write_bytes(values.tobytes(order="F"))
    out = binary_label_to_nifti(image, raw, tmp_path)
    assert image.read_bytes() == before and out != image
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), values)


def test_binary_label_checks_the_image_header_before_decoding_it(tmp_path):
    from monai_medplib.adapters.monailabel.datastore import binary_label_to_nifti

    big = _save(tmp_path / "big.nii.gz", np.zeros((30, 30, 30), np.uint8))
    raw = tmp_path / "x.bin"
    raw.write_bytes(b"\1")
    with pytest.raises(VolumeTooLarge, match="'big.nii.gz' has 30 x 30 x 30 = 27,000 voxels"):
        binary_label_to_nifti(big, raw, tmp_path, VolumeLimits(max_voxels=10_000))
    # a wrong byte count is refused from the header: this image's data is cut short and would fail to decode
    cut = tmp_path / "cut.nii"
    cut.write_bytes(_save(tmp_path / "whole.nii", np.ones(SHAPE, np.int16)).read_bytes()[:-200])
    with pytest.raises(
        UserInputError, match="has 1 bytes; a raw label of its image \\(20 x 16 x 6\\) has 1,920"
    ):
        binary_label_to_nifti(cut, raw, tmp_path)


def test_an_image_id_that_reads_like_a_mask_is_refused_not_hidden_later(store, tmp_path):
    good = _save(tmp_path / "scan.nii.gz", np.ones(SHAPE, np.int16))
    with pytest.raises(UserInputError, match="image id 'abdomen_label_study' reads like a mask file name"):
        store.add_image("abdomen_label_study", str(good), {})
    with pytest.raises(UserInputError, match="'liver_seg' reads like a mask"):
        store.add_image("", str(_save(tmp_path / "liver_seg.nii.gz", np.ones(SHAPE, np.int16))), {})
    assert store.list_images() == ["ct1"]
    assert not (tmp_path / "studies" / "abdomen_label_study.nii.gz").exists()
    # a server that lists masks stores it, and it stays listed after a restart
    listing = GuardedLocalDatastore(str(tmp_path / "studies"), list_masks=True)
    assert listing.add_image("abdomen_label_study", str(good), {}) == "abdomen_label_study"
    again = GuardedLocalDatastore(str(tmp_path / "studies"), list_masks=True)
    assert "abdomen_label_study" in again.list_images()


def test_a_failed_save_leaves_the_previous_label_and_nothing_else(store, tmp_path, monkeypatch):
    first = _save(tmp_path / "a.nii.gz", np.ones(SHAPE, np.uint8))
    store.save_label("ct1", str(first), "final", {})
    final = store.get_label_uri("ct1", "final")
    config = tmp_path / "studies" / "datastore_v2.json"
    config_before = config.read_text()
    second = _save(tmp_path / "b.nii.gz", np.full(SHAPE, 2, np.uint8))

    def crash(src, dst):
        raise OSError("disk full (simulated at the rename)")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        store.save_label("ct1", str(second), "final", {})
    monkeypatch.undo()
    assert open(final, "rb").read() == first.read_bytes()
    assert config.read_text() == config_before
    assert os.listdir(tmp_path / "studies" / "labels" / "final") == ["ct1.nii.gz"]
    assert os.listdir(tmp_path / "studies" / ".medplib" / "staging") == []
    assert json.loads(config_before)["objects"]["ct1"]["labels"]["final"]["ext"] == ".nii.gz"


def test_datastore_json_is_written_atomically(store, tmp_path):
    store.update_image_info("ct1", {"reviewed": True})
    config = tmp_path / "studies" / "datastore_v2.json"
    assert json.loads(config.read_text())["objects"]["ct1"]["image"]["info"]["reviewed"] is True
    assert [p.name for p in config.parent.iterdir() if p.name.startswith(".datastore_v2")] == []
    with pytest.raises(ImageNotFoundException):
        store.update_image_info("nope", {})


def test_dataset_archive_lands_in_staging(store, tmp_path):
    with pytest.raises(UserInputError, match="no image has a final label"):
        store.get_dataset_archive(None)
    store.save_label("ct1", str(_save(tmp_path / "l.nii.gz", np.ones(SHAPE, np.uint8))), "final", {})
    path = store.get_dataset_archive(None)
    assert os.path.dirname(os.path.dirname(path)) == str(tmp_path / "studies" / ".medplib" / "staging")


def test_dicomweb_labels_are_checked_against_the_cached_series_before_anything_is_written(tmp_path):
    """On a DICOMweb datastore a label is checked like on a local one (size, byte count), before MONAI Label's own
    save writes it to the cache or sends it to the PACS."""
    from monailabel.datastore.local import LocalDatastore

    from monai_medplib.adapters.monailabel.datastore import GuardedDICOMWebDatastore

    root, uid = tmp_path / "cache", "1.2.3.4"
    (root / uid).mkdir(parents=True)
    (root / uid / "x.dcm").write_bytes(b"x")  # a cached series folder: MONAI Label downloads nothing
    _save(root / f"{uid}.nii.gz", np.zeros(SHAPE, np.int16))  # the series as MONAI Label's cache converts it
    store = LocalDatastore(str(root), extensions=["*.nii.gz"], auto_reload=False)
    store.__class__ = GuardedDICOMWebDatastore
    store._client, store._fetch_by_frame, store._convert_to_nifti = None, False, True
    raw = tmp_path / "label.bin"
    raw.write_bytes(b"\0" * 10)
    with pytest.raises(UserInputError, match="has 10 bytes; a raw label of its image \\(20 x 16 x 6\\)"):
        store.save_label(uid, str(raw), "draft", {})
    wrong = _save(tmp_path / "w.nii.gz", np.zeros((20, 16, 5), np.uint8))
    with pytest.raises(UserInputError, match="has size 20 x 16 x 5; its image has 20 x 16 x 6"):
        store.save_label(uid, str(wrong), "draft", {})
    assert not (root / "labels" / "draft").exists() or not any((root / "labels" / "draft").iterdir())
    values = np.zeros(SHAPE, np.uint8)
    values[1:4, 2:6, 3] = 1
    raw.write_bytes(values.tobytes(order="F"))
    store.save_label(uid, str(raw), "draft", {})
    np.testing.assert_array_equal(np.asarray(nib.load(store.get_label_uri(uid, "draft")).dataobj), values)
