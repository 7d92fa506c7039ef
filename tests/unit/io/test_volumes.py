"""Volume I/O on real data: LiTS CT as NIfTI / NRRD / DICOM series, pydicom's real DICOM, nibabel's 4D, DICOM-SEG."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

from monai_medplib import __version__
from monai_medplib.io import find_dicom_series, load_volume, save_nifti, write_dicom_seg, write_dicom_series
from monai_medplib.io.dicom_seg import check_seg_source
from monai_medplib.transforms import PLANES, ExtractSlices, SAMed2DNormalize
from monai_medplib.user_input import UserInputError
from tests.support.realdata import lits_variant

DICOMDIR_TESTS = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests"


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """LiTS in two orientations, each as NIfTI and as a DICOM series."""
    root = tmp_path_factory.mktemp("lits")
    out = {}
    for name in ("lps", "oblique", "permuted_flipped"):
        v = lits_variant(name)
        nifti = save_nifti(v.image, root / f"{name}.nii.gz", v.affine, dtype=np.float32)
        series = root / f"{name}_dcm"
        write_dicom_series(v.image, v.affine, series, series_description=f"LiTS 117 {name}")
        out[name] = (v, nifti, series)
    return out


@pytest.mark.parametrize("name", ["lps", "oblique", "permuted_flipped"])
def test_nifti_and_dicom_series_load_the_same_volume(written, name):
    v, nifti, series = written[name]
    from_nifti = load_volume(nifti)
    np.testing.assert_array_equal(from_nifti[0].numpy(), v.image)
    np.testing.assert_allclose(from_nifti.affine.numpy(), v.affine, atol=1e-5)
    for reader in ("ITKReader", "PydicomReader"):
        from_dicom = load_volume(series, reader=reader)
        assert from_dicom.shape == (1, *v.image.shape)
        # world position of every voxel agrees, whatever order the reader sorted the slices in
        grid = np.stack(
            np.meshgrid(*[np.arange(0, s, 37) for s in v.image.shape], indexing="ij"), -1
        ).reshape(-1, 3)
        world = (v.affine @ np.c_[grid, np.ones(len(grid))].T).T
        ijk = np.round((np.linalg.inv(from_dicom.affine.numpy()) @ world.T).T[:, :3]).astype(int)
        np.testing.assert_array_equal(from_dicom[0].numpy()[tuple(ijk.T)], v.image[tuple(grid.T)])


@pytest.mark.parametrize("axis", sorted(PLANES))
def test_same_8bit_slices_from_nifti_and_dicom(written, axis):
    _, nifti, series = written["permuted_flipped"]
    normalise = SAMed2DNormalize()
    by_position = {}
    for source in (nifti, series):
        slices = ExtractSlices(axis)(normalise(load_volume(source)))
        by_position[source] = {tuple(np.round(s.meta["slice_origin"], 2)): s.as_tensor() for s in slices}
    a, b = by_position.values()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert next(iter(a.values())).dtype == torch.uint8


def test_nrrd_and_label_nifti_keep_geometry(written, tmp_path):
    import nrrd

    v, _, _ = written["oblique"]
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ v.affine
    header = {
        "space": "left-posterior-superior",
        "space directions": lps[:3, :3].T,
        "space origin": lps[:3, 3],
    }
    header["encoding"] = "raw"
    nrrd.write(str(tmp_path / "ct.nrrd"), v.image, header)
    loaded = load_volume(tmp_path / "ct.nrrd")
    np.testing.assert_array_equal(loaded[0].numpy(), v.image)
    np.testing.assert_allclose(loaded.affine.numpy(), v.affine, atol=1e-5)
    label = loaded.clone()
    label[0] = torch.from_numpy(v.label.astype(np.float32))
    path = save_nifti(label, tmp_path / "label.nii.gz")
    back = nib.load(path)
    assert back.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(back.dataobj), v.label)
    np.testing.assert_allclose(back.affine, v.affine, atol=1e-5)


@pytest.mark.parametrize("name", ["lps", "permuted_flipped"])
def test_dicom_seg_frames_reference_the_right_slices(written, tmp_path, name):
    v, _, series = written[name]
    # the label's own affine places it; the reader may have sorted the series the other way round
    # (permuted_flipped: ITK reverses the written slice order), which the SEG writer must not care about
    affine = load_volume(series).affine.numpy() if name == "lps" else v.affine
    label = torch.from_numpy(v.label)
    seg_path = write_dicom_seg(label, series, tmp_path / "seg.dcm", {1: "liver", 2: "tumour"}, affine=affine)
    datasets = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p) for p in sorted(series.iterdir()))}
    slice_of = {uid: int(ds.InstanceNumber) - 1 for uid, ds in datasets.items()}

    raw = pydicom.dcmread(seg_path)
    assert raw.Modality == "SEG" and raw.SOPClassUID == pydicom.uid.SegmentationStorage
    assert [s.SegmentLabel for s in raw.SegmentSequence] == ["liver", "tumour"]
    algorithm = raw.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("MedPLIB", __version__)
    referenced = set()
    for frame in raw.PerFrameFunctionalGroupsSequence:
        uid = str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        position = [float(c) for c in frame.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(
            position, [float(c) for c in datasets[uid].ImagePositionPatient], atol=1e-4
        )
        referenced.add(uid)
    labelled = {k for k in range(v.label.shape[2]) if v.label[:, :, k].any()}
    assert {slice_of[uid] for uid in referenced} == labelled

    seg = hd.seg.segread(seg_path)
    uids = list(datasets)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=True, skip_overlap_checks=True
    )
    rebuilt = np.zeros_like(v.label)
    for n, uid in enumerate(uids):
        rebuilt[:, :, slice_of[uid]] = pixels[n].T  # rows = j, columns = i
    np.testing.assert_array_equal(rebuilt, v.label)


def test_real_pydicom_series_and_multiframe():
    series = load_volume(DICOMDIR_TESTS / "98892001" / "CT5N")
    assert series.shape == (1, 16, 16, 5)
    multiframe = load_volume(get_testdata_file("emri_small.dcm"))
    assert multiframe.shape == (1, 64, 64, 10)


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="2D image"):
        load_volume(get_testdata_file("CT_small.dcm"))
    from nibabel.testing import data_path

    with pytest.raises(ValueError, match="4D"):
        load_volume(Path(data_path) / "example4d.nii.gz")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not DICOM")
    with pytest.raises(FileNotFoundError, match="no DICOM image files"):
        load_volume(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="image not found"):
        load_volume(tmp_path / "missing.nii.gz")
    mixed = DICOMDIR_TESTS / "98892003" / "MR2"
    with pytest.raises(ValueError, match="mixes 3 DICOM series"):
        load_volume(mixed)
    # a 3-file series of this folder is a localizer: one axial, one coronal, one sagittal slice, not a volume
    picked = next(uid for uid, files in find_dicom_series(mixed).items() if len(files) == 3)
    with pytest.raises(UserInputError, match="'MR2' mixes slice orientations"):
        load_volume(mixed, series_uid=picked)
    both = tmp_path / "both"
    shutil.copytree(DICOMDIR_TESTS / "98892001" / "CT5N", both)
    shutil.copy(get_testdata_file("CT_small.dcm"), both / "other.dcm")
    with pytest.raises(ValueError, match="mixes 2 DICOM series"):
        load_volume(both)
    with pytest.raises(ValueError, match="NaN"):
        write_dicom_series(np.full((2, 2, 2), np.nan), np.eye(4), tmp_path / "nan")


@pytest.mark.parametrize("reader", ["ITKReader", "PydicomReader"])
def test_a_series_with_a_missing_repeated_or_truncated_slice_is_refused(tmp_path, reader):
    """Both readers load such a series and spread its slices evenly (ITK also drops a truncated file): every
    mask written back would land off its slice. Measured before the check: a 9-slice 2.5 mm series without its
    second slice loaded as 8 slices 2.857 mm apart."""
    rng = np.random.default_rng(0)
    volume = rng.integers(-500, 500, (12, 10, 9)).astype(np.float32)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    gap = write_dicom_series(volume, affine, tmp_path / "gap")
    gap[1].unlink()
    with pytest.raises(
        UserInputError, match=r"'gap' is not evenly spaced: the step after 'slice_0000.dcm' is 5 mm"
    ):
        load_volume(tmp_path / "gap", reader=reader)
    repeat = write_dicom_series(volume, affine, tmp_path / "repeat")
    again = pydicom.dcmread(repeat[3])
    again.SOPInstanceUID = again.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    again.save_as(tmp_path / "repeat" / "resent.dcm")
    with pytest.raises(UserInputError, match="'repeat' has two files at one slice position"):
        load_volume(tmp_path / "repeat", reader=reader)
    cut = write_dicom_series(volume, affine, tmp_path / "cut")
    cut[4].write_bytes(cut[4].read_bytes()[:-50])
    with pytest.raises((UserInputError, ValueError), match="truncated or corrupt|less than expected"):
        load_volume(tmp_path / "cut", reader=reader)
    whole = write_dicom_series(volume, affine, tmp_path / "whole")
    assert len(whole) == 9 and tuple(load_volume(tmp_path / "whole", reader=reader).shape) == (1, 12, 10, 9)
    pair = write_dicom_series(volume[:, :, :1], affine, tmp_path / "pair")  # one slice, sent twice
    again = pydicom.dcmread(pair[0])
    again.SOPInstanceUID = again.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    again.save_as(tmp_path / "pair" / "resent.dcm")
    with pytest.raises(UserInputError, match="'pair' has two files at one slice position"):
        load_volume(tmp_path / "pair", reader=reader)


@pytest.mark.parametrize("reader", ["ITKReader", "PydicomReader"])
def test_a_dicom_seg_beside_its_series_is_not_read_as_part_of_it(tmp_path, reader):
    """PACS exports (and a DICOM-SEG written into the series' folder) hold the segmentation beside its images: the
    folder still loads as the one image series."""
    rng = np.random.default_rng(1)
    volume = rng.integers(-500, 500, (12, 10, 6)).astype(np.float32)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    series = tmp_path / "series"
    write_dicom_series(volume, affine, series)
    before = load_volume(series, reader=reader)
    label = np.zeros(volume.shape, np.uint8)
    label[2:6, 3:7, 2] = 1
    write_dicom_seg(label, series, series / "seg.dcm", {1: "liver"}, affine=before.affine.numpy())
    assert list(find_dicom_series(series).values()) == [sorted(series.glob("slice_*.dcm"))]
    after = load_volume(series, reader=reader)
    assert torch.equal(after.as_tensor(), before.as_tensor()) and torch.equal(after.affine, before.affine)


def test_float_volume_that_needs_a_lossy_slope_round_trips_within_one_step(tmp_path):
    """-190.3..170.7 with fractional values has no exact int16 encoding: the slope keeps both ends in range."""
    rng = np.random.default_rng(0)
    volume = rng.uniform(-190.3, 170.7, size=(6, 5, 4)).astype(np.float32)
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    write_dicom_series(volume, affine, tmp_path / "series")
    loaded = load_volume(tmp_path / "series")
    step = (170.7 + 190.3) / 2 / 32766
    assert tuple(loaded.shape[-3:]) == volume.shape
    assert float(np.abs(np.asarray(loaded).reshape(volume.shape) - volume).max()) <= step


@pytest.mark.parametrize("low, high", [(0, 65535), (-32768, 32767), (-1024, 3071)])
def test_whole_number_volumes_spanning_up_to_65536_values_are_stored_exactly(tmp_path, low, high):
    """Any whole-number range of at most 65,536 values has an exact int16 encoding with slope 1."""
    values = np.linspace(low, high, 6 * 5 * 4).round().reshape(6, 5, 4)
    values[0, 0, :2] = low, high
    write_dicom_series(values, np.diag([0.8, 0.8, 2.0, 1.0]), tmp_path / "series")
    first = pydicom.dcmread(sorted((tmp_path / "series").glob("*.dcm"))[0])
    assert float(first.RescaleSlope) == 1.0
    loaded = np.asarray(load_volume(tmp_path / "series")).reshape(values.shape)
    np.testing.assert_array_equal(loaded, values)


def test_dicom_seg_segments_carry_a_display_colour(tmp_path):
    """OHIF warns and substitutes a colour when RecommendedDisplayCIELabValue is missing."""
    volume = np.zeros((8, 8, 3), dtype=np.float32)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    write_dicom_series(volume, affine, tmp_path / "ct")
    label = np.zeros((8, 8, 3), dtype=np.uint8)
    label[2:5, 2:5, 1], label[5:7, 5:7, 2] = 1, 2
    seg_path = write_dicom_seg(
        label, tmp_path / "ct", tmp_path / "seg.dcm", {1: "liver", 2: "tumour"}, affine
    )
    segments = pydicom.dcmread(seg_path).SegmentSequence
    colours = [tuple(s.RecommendedDisplayCIELabValue) for s in segments]
    assert len(colours) == 2 and colours[0] != colours[1]
    r, g, b = hd.color.CIELabColor.from_dicom_value(colours[0]).to_rgb()
    assert r > 2 * max(g, b)  # segment 1 is shown red


def _small_series(tmp_path, **kwargs):
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    files = write_dicom_series(np.zeros((8, 8, 3), dtype=np.float32), affine, tmp_path / "ct", **kwargs)
    label = np.zeros((8, 8, 3), dtype=np.uint8)
    label[2:5, 2:5, 1], label[5:7, 5:7, 2] = 1, 2
    return files, affine, label


def _dciodvfy_errors(path) -> list[str]:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in run.stderr.splitlines() if line.startswith("Error")]


def test_dicom_seg_of_an_anonymised_series_without_type_2_attributes(tmp_path):
    """Anonymised exports drop Type 2 attributes; highdicom copies them and failed with an AttributeError after
    the whole grounding had run. They are written empty (SliceThickness: the step between slices)."""
    files, affine, label = _small_series(tmp_path)
    dropped = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "StudyDate")
    datasets = [pydicom.dcmread(f) for f in files]
    for ds in datasets:
        for name in (*dropped, "AccessionNumber", "StudyTime", "SliceThickness"):
            if name in ds:
                delattr(ds, name)
    seg_path = write_dicom_seg(label, datasets, tmp_path / "seg.dcm", {1: "liver", 2: "tumour"}, affine)
    seg = pydicom.dcmread(seg_path)
    assert all(seg[name].value in ("", None) for name in dropped)
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SliceThickness) == 2.0  # the affine's slice step
    assert "PatientName" not in datasets[0]  # the caller's datasets are not changed
    assert hd.seg.segread(seg_path).number_of_segments == 2
    if shutil.which("dciodvfy"):
        assert _dciodvfy_errors(seg_path) == []


def test_dicom_seg_refuses_a_series_without_its_frame_of_reference_by_name(tmp_path):
    files, affine, label = _small_series(tmp_path)
    for f in files:
        ds = pydicom.dcmread(f)
        del ds.FrameOfReferenceUID
        ds.save_as(f)
    with pytest.raises(ValueError, match="no FrameOfReferenceUID"):
        check_seg_source(tmp_path / "ct")  # what ground-volume asks before the model runs
    with pytest.raises(ValueError, match="no FrameOfReferenceUID"):
        write_dicom_seg(label, tmp_path / "ct", tmp_path / "seg.dcm", {1: "a", 2: "b"}, affine)
    assert not (tmp_path / "seg.dcm").exists()


def test_dicom_seg_segment_labels_in_any_script_and_without_separators(tmp_path):
    """Non-ASCII segment names were written as undeclared Latin-1 or as '??'; a backslash split the label into two
    values and a newline is not allowed in LO."""
    _, affine, label = _small_series(tmp_path)
    label[1:3, 1:3, 0] = 3
    names = {1: "Leberläsion", 2: "肝臓", 3: "left kidney\\right\nkidney"}
    seg_path = write_dicom_seg(label, tmp_path / "ct", tmp_path / "seg.dcm", names, affine)
    seg = pydicom.dcmread(seg_path)
    assert seg.SpecificCharacterSet == "ISO_IR 192"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [
        "Leberläsion",
        "肝臓",
        "left kidney/right kidney",
    ]
    if shutil.which("dciodvfy"):
        assert _dciodvfy_errors(seg_path) == []


def test_series_and_seg_keep_non_ascii_patient_text(tmp_path):
    """A UTF-8 source's text is copied as it is into the SEG; the series writer declares UTF-8 when it needs it
    (it wrote '山田' as '??')."""
    _, affine, label = _small_series(tmp_path, patient_name="山田^太郎", series_description="Bauch – nativ")
    source = pydicom.dcmread(tmp_path / "ct" / "slice_0000.dcm")
    assert (source.SpecificCharacterSet, source.PatientName, source.SeriesDescription) == (
        "ISO_IR 192",
        "山田^太郎",
        "Bauch – nativ",
    )
    seg = pydicom.dcmread(
        write_dicom_seg(label, tmp_path / "ct", tmp_path / "seg.dcm", {1: "a", 2: "b"}, affine)
    )
    assert (seg.SpecificCharacterSet, seg.PatientName) == ("ISO_IR 192", "山田^太郎")
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID


@pytest.mark.parametrize(
    "dtype, slope, shape",
    [
        (
            np.int16,
            None,
            (70, 41, 37),
        ),  # a CT as stored: Fortran-order integers, last axis not a slab multiple
        (np.uint8, None, (33, 20, 16)),
        (np.int16, (0.5, -1024.0), (29, 31, 19)),  # scl_slope / scl_inter: nibabel scales to floats
        (np.float64, None, (17, 18, 40)),  # float64 -> float32 rounding
    ],
)
def test_nifti_volumes_load_exactly_as_monai_loads_them(tmp_path, dtype, slope, shape):
    """Our NIfTI loader copies to C order in slabs; values, dtype, layout and metadata equal stock MONAI's."""
    from monai.data import NibabelReader
    from monai.transforms import LoadImage

    rng = np.random.default_rng(len(shape) + shape[0])
    if np.issubdtype(dtype, np.integer):
        data = rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype)
    else:
        data = rng.normal(0, 1e3, shape).astype(dtype)
    image = nib.Nifti1Image(data, np.diag([0.7, 0.8, 2.5, 1.0]))
    if slope is not None:
        image.header.set_slope_inter(*slope)
    path = tmp_path / "volume.nii.gz"
    nib.save(image, str(path))

    ours = load_volume(path)
    stock = LoadImage(reader=NibabelReader(), image_only=True, ensure_channel_first=True, dtype=np.float32)(
        str(path)
    )
    assert ours.dtype == stock.dtype == torch.float32
    assert ours.is_contiguous() and stock.is_contiguous()
    assert torch.equal(ours.as_tensor(), stock.as_tensor())
    assert torch.equal(ours.affine, stock.affine)
    assert sorted(ours.meta) == sorted(stock.meta)
    # independent of MONAI: the file's voxels, scaled the NIfTI way, in the (1, X, Y, Z) layout
    expected = data.astype(np.float64) * (slope[0] if slope else 1.0) + (slope[1] if slope else 0.0)
    np.testing.assert_allclose(ours[0].numpy(), expected.astype(np.float32), rtol=1e-6)


def test_bytes_after_the_declared_voxels_are_never_inflated(tmp_path):
    """A small header followed by a huge compressed payload: only the declared voxels are expanded."""
    import gzip
    import tracemalloc

    data = np.arange(8 * 6 * 4, dtype=np.int16).reshape(8, 6, 4)
    plain = nib.Nifti1Image(data, np.eye(4)).to_bytes()
    path = tmp_path / "smuggled.nii.gz"
    trailer = 256 * 2**20  # 256 MiB of zeros after the voxels, about 0.25 MiB once compressed
    with gzip.open(path, "wb", compresslevel=1) as out:
        out.write(plain)
        block = bytes(2**20)
        for _ in range(trailer // len(block)):
            out.write(block)
    assert path.stat().st_size < 2 * 2**20
    tracemalloc.start()
    volume = load_volume(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_array_equal(volume[0].numpy(), data.astype(np.float32))
    assert peak < 16 * 2**20, f"reading a 192-voxel volume took {peak / 2**20:.0f} MiB"


def test_a_header_claiming_more_than_the_file_can_hold_is_refused_before_allocating(tmp_path):
    """A 4096^3 int16 header (128 GiB) over a few bytes of voxels: refused by name, nothing of that size allocated."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape((4096, 4096, 4096))
    header["vox_offset"] = 352
    raw = header.binaryblock + bytes(4) + bytes(64)  # vox_offset 352: the 348-byte header, 4 extension bytes
    path = tmp_path / "liar.nii.gz"
    import gzip

    path.write_bytes(gzip.compress(raw))
    with pytest.raises(OSError, match="liar.nii.gz: the header declares 137438953824 bytes"):
        load_volume(path)


def test_a_series_the_reader_takes_gets_its_dicom_seg_and_a_refused_seg_leaves_no_files(tmp_path):
    """The reader accepts slice positions a little off the regular grid (rounding, table jitter: here 0.1 mm of a
    1.5 mm step); the DICOM-SEG must take them too (it refused anything over 0.01 voxel, after the NIfTI label
    was already written). A label on another grid is still refused, and then no output is left behind."""
    from monai_medplib.io.outputs import write_label_volume

    volume = np.random.default_rng(2).integers(-500, 500, (12, 10, 7)).astype(np.float32)
    files = write_dicom_series(volume, np.diag([0.8, 0.8, 1.5, 1.0]), tmp_path / "jitter")
    moved = pydicom.dcmread(files[3])
    position = [float(v) for v in moved.ImagePositionPatient]
    moved.ImagePositionPatient = [position[0], position[1], position[2] + 0.1]
    moved.save_as(files[3])
    loaded = load_volume(tmp_path / "jitter")
    label = torch.zeros_like(loaded, dtype=torch.uint8)
    label[0, 2:6, 3:7, 3] = 1
    label = type(loaded)(label, affine=loaded.affine)
    paths = write_label_volume(
        label, {"liver": 1}, tmp_path / "out", "jitter", dicom_source=tmp_path / "jitter"
    )
    seg = pydicom.dcmread(paths["dicom_seg"])
    (frame,) = seg.PerFrameFunctionalGroupsSequence
    source = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
    assert source == moved.SOPInstanceUID and paths["nifti"].is_file()

    shifted = loaded.affine.clone()
    shifted[:3, 3] += shifted[:3, 2] * 0.5  # half a slice along k: another grid
    with pytest.raises(ValueError, match="does not lie on the label's voxel grid"):
        write_label_volume(
            type(loaded)(label, affine=shifted), {"liver": 1}, tmp_path / "refused", "x", tmp_path / "jitter"
        )
    refused = tmp_path / "refused"
    assert not refused.exists() or not any(refused.iterdir())
