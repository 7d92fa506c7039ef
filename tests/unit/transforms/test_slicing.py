"""Anatomical slicing: orientation conventions, exact inverse, Invertd, on the real LiTS CT and MNI152 MR."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd, Lambdad

from monai_medplib.transforms import (
    PLANES,
    ExtractSlice,
    ExtractSliced,
    ExtractSlices,
    slice_geometry,
    slices_to_volume,
)
from tests.support.realdata import VARIANTS, lits_variant


def _meta(array: np.ndarray, affine: np.ndarray) -> MetaTensor:
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(array))[None], affine=torch.from_numpy(affine))


@pytest.fixture(scope="module")
def variants():
    return {name: lits_variant(name) for name in VARIANTS}


def test_axes_follow_anatomy_for_hand_written_affines():
    # LPS voxel order: i -> Left, j -> Posterior, k -> Superior
    g = slice_geometry(np.diag([-1.0, -1.0, 1.0, 1.0]), (4, 5, 6), "axial")
    assert (g.slice_dim, g.row_dim, g.col_dim, g.row_flip, g.col_flip) == (2, 1, 0, False, False)
    # RAS voxel order: rows must still run anterior -> posterior, columns right -> left
    g = slice_geometry(np.eye(4), (4, 5, 6), "axial")
    assert (g.slice_dim, g.row_dim, g.col_dim, g.row_flip, g.col_flip) == (2, 1, 0, True, True)
    g = slice_geometry(np.eye(4), (4, 5, 6), "sagittal")  # rows S -> I (flip), columns A -> P (flip)
    assert (g.slice_dim, g.row_dim, g.col_dim, g.row_flip, g.col_flip) == (0, 2, 1, True, True)
    # slices stored first (z, x, y): axial cuts along voxel axis 0
    perm = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
    g = slice_geometry(perm, (6, 4, 5), "coronal")
    assert (g.slice_dim, g.row_dim, g.col_dim, g.row_flip, g.col_flip) == (2, 0, 1, True, True)


def test_liver_is_on_the_image_left_and_spine_at_the_bottom(variants):
    """Radiological display: patient right (the liver) on the image left, anterior up."""
    v = variants["lps"]
    label = ExtractSlice("axial")(_meta(v.label, v.affine))[0].numpy()
    rows, cols = np.nonzero(label == 1)
    assert cols.mean() < label.shape[1] * 0.5  # liver on the left half
    image = ExtractSlice("axial")(_meta(v.image, v.affine))[0].numpy()
    bone_rows, _ = np.nonzero(image > 300)  # vertebra is posterior = low on the image
    assert bone_rows.mean() > image.shape[0] * 0.55


@pytest.mark.parametrize("axis", sorted(PLANES))
def test_every_orientation_gives_the_same_slices(variants, axis):
    """Same anatomy stored in LPS, RAS, permuted+flipped order -> identical 2D slices at the same positions."""
    ref = _meta(variants["lps"].image, variants["lps"].affine)
    ref_slices = {tuple(np.round(s.meta["slice_origin"], 3)): s for s in ExtractSlices(axis)(ref)}
    for name in ("ras", "permuted_flipped"):
        v = variants[name]
        slices = ExtractSlices(axis)(_meta(v.image, v.affine))
        assert len(slices) == len(ref_slices)
        for s in slices[::7]:
            match = ref_slices[tuple(np.round(s.meta["slice_origin"], 3))]
            assert torch.equal(s.as_tensor(), match.as_tensor()), (name, axis, s.meta["slice_index"])
            np.testing.assert_allclose(s.affine.numpy(), match.affine.numpy(), atol=1e-9)
    # the mildly oblique volume keeps its grid: same slices, same indices
    tilted = variants["oblique"]
    s = ExtractSlice(axis, 40)(_meta(tilted.image, tilted.affine))
    assert torch.equal(s.as_tensor(), ExtractSlice(axis, 40)(ref).as_tensor())


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("axis", sorted(PLANES))
def test_round_trip_every_slice_voxel_for_voxel(variants, name, axis):
    v = variants[name]
    label = _meta(v.label, v.affine)
    slices = ExtractSlices(axis)(label)
    assert {s.meta["slice_index"] for s in slices} == set(range(len(slices)))
    volume = slices_to_volume(slices)
    assert torch.equal(volume.as_tensor(), label.as_tensor())
    np.testing.assert_array_equal(volume.affine.numpy(), v.affine)
    # every 9th slice through the per-slice inverse as Invertd would call it
    accumulated = torch.zeros_like(label.as_tensor())
    extractor = ExtractSlice(axis)
    for index in range(0, len(slices), 9):
        back = extractor.inverse(extractor(label, index=index))
        assert back.shape == label.shape and back.applied_operations == []
        accumulated += back.as_tensor()
    expected = torch.zeros_like(accumulated)
    geometry = slice_geometry(v.affine, v.label.shape, axis)
    for index in range(0, len(slices), 9):
        sel = [slice(None)] * 4
        sel[geometry.slice_dim + 1] = index
        expected[tuple(sel)] = label.as_tensor()[tuple(sel)]
    assert torch.equal(accumulated, expected)


@pytest.mark.parametrize("axis", sorted(PLANES))
def test_full_per_slice_inverse_round_trip(variants, axis):
    v = variants["permuted_flipped"]
    label = _meta(v.label, v.affine)
    extractor = ExtractSlice(axis)
    total = torch.zeros_like(label.as_tensor())
    n = slice_geometry(v.affine, v.label.shape, axis).num_slices
    for index in range(n):
        total += extractor.inverse(extractor(label, index=index)).as_tensor()
    assert torch.equal(total, label.as_tensor())


def test_invertd_puts_a_prediction_back(variants):
    v = variants["ras"]
    pre = Compose([ExtractSliced(keys="image", axis="coronal", index_key="slice")])
    data = pre({"image": _meta(v.image, v.affine), "slice": 50})
    assert data["image"].shape == (1, v.image.shape[2], v.image.shape[0])
    data["pred"] = (data["image"] > 0).to(torch.uint8)  # a "segmentation" made on the slice
    post = Compose(
        [
            Lambdad("pred", lambda x: x),
            Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False),
        ]
    )
    out = post(data)["pred"]
    assert out.shape == (1, *v.image.shape)
    np.testing.assert_array_equal(out.affine.numpy(), v.affine)
    geometry = slice_geometry(v.affine, v.image.shape, "coronal")
    expected = np.zeros(v.image.shape, dtype=np.uint8)
    sel = [slice(None)] * 3
    sel[geometry.slice_dim] = 50
    expected[tuple(sel)] = v.image[tuple(sel)] > 0
    np.testing.assert_array_equal(out[0].numpy(), expected)


def test_mni152_mr_round_trip_on_all_axes():
    from nilearn.datasets import load_mni152_template

    template = load_mni152_template(resolution=2)  # shipped inside nilearn: no download
    data = np.asarray(template.get_fdata(), dtype=np.float32)
    img = _meta(data, template.affine)
    shapes = {}
    for axis in PLANES:
        slices = ExtractSlices(axis)(img)
        shapes[axis] = (len(slices), tuple(slices[0].shape[1:]))
        assert torch.equal(slices_to_volume(slices).as_tensor(), img.as_tensor())
    # RAS voxel order 99 x 117 x 95: axial = 95 slices of 117 rows (A->P) x 99 columns (R->L)
    assert shapes == {"axial": (95, (117, 99)), "coronal": (117, (95, 99)), "sagittal": (99, (95, 117))}


def test_bad_input_is_named():
    two_d = MetaTensor(torch.zeros(1, 8, 8), affine=torch.eye(3))
    with pytest.raises(ValueError, match="2D image"):
        ExtractSlice("axial")(two_d)
    with pytest.raises(ValueError, match="4D"):
        ExtractSlice("axial")(torch.zeros(1, 4, 4, 4, 3))
    with pytest.raises(ValueError, match="unknown slice axis 'transverse'"):
        ExtractSlice("transverse")
    with pytest.raises(ValueError, match="slice index 9 is outside"):
        ExtractSlice("axial", 9)(MetaTensor(torch.zeros(1, 4, 4, 4)))
    with pytest.raises(ValueError, match="affine"):
        ExtractSlice("axial")(MetaTensor(torch.zeros(1, 4, 4, 4), affine=torch.zeros(4, 4)))


def test_plane_along_voxel_axis_follows_the_storage_order():
    """Slicer's slice index k runs along voxel axis 2: axial for axially stored, coronal for coronally stored."""
    from monai_medplib.transforms.slicing import plane_along_voxel_axis

    vol = torch.zeros(1, 4, 5, 6)
    axial = MetaTensor(vol, affine=torch.diag(torch.tensor([-1.0, -1.0, 2.0, 1.0])))
    # voxel axes (i, j, k) -> (x, z, y): k runs anterior-posterior, so slices along k are coronal
    coronal_affine = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1.0]])
    coronal = MetaTensor(vol, affine=coronal_affine)
    assert plane_along_voxel_axis(axial) == "axial"
    assert plane_along_voxel_axis(coronal) == "coronal"
    assert plane_along_voxel_axis(coronal, voxel_axis=1) == "axial"


def test_a_fixed_index_wins_over_the_index_key_and_fractions_are_refused():
    volume = MetaTensor(torch.arange(4 * 4 * 6, dtype=torch.float32).reshape(1, 4, 4, 6))
    fixed = ExtractSliced("image", "axial", index=1, index_key="k")({"image": volume, "k": 4})
    assert fixed["image"].meta["slice_index"] == 1  # "index: fixed slice index; None = d[index_key]"
    assert (
        ExtractSliced("image", "axial", index_key="k")({"image": volume, "k": 4})["image"].meta["slice_index"]
        == 4
    )
    for bad in (4.7, "3"):
        with pytest.raises(ValueError, match="slice index must be an integer"):
            ExtractSliced("image", "axial", index_key="k")({"image": volume, "k": bad})


def test_the_inverse_gives_back_the_input_s_own_affine_and_space():
    """An LPS MetaTensor comes back LPS, with its affine and its other meta (per slice and assembled)."""
    affine = torch.diag(torch.tensor([-0.8, -0.8, 2.5, 1.0], dtype=torch.float64))
    volume = MetaTensor(
        torch.rand(1, 6, 5, 4), affine=affine, meta={"space": "LPS", "filename_or_obj": "ct.nrrd"}
    )
    extractor = ExtractSlice("axial")
    back = extractor.inverse(extractor(volume, index=2))
    assert torch.equal(back.affine, affine) and back.meta["space"] == "LPS"
    assembled = slices_to_volume(ExtractSlices("axial")(volume))
    assert torch.equal(assembled.affine, affine) and assembled.meta["space"] == "LPS"
    assert assembled.meta["filename_or_obj"] == "ct.nrrd" and not any(
        k.startswith("slice_") for k in assembled.meta
    )
    assert torch.equal(assembled.as_tensor(), volume.as_tensor())
