"""Prompt mapping between IJK voxels / world points / ROIs / scribbles and slice pixels, on the LiTS label."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_medplib.transforms import (
    PLANES,
    ExtractSlice,
    MapPromptsToSliced,
    geometry_for,
    roi_to_slice_boxes,
    scribbles_to_slice_masks,
    slice_point_to_voxel,
    voxel_to_slice_point,
    voxel_to_world,
    world_to_slice_point,
)
from tests.support.realdata import VARIANTS, lits_variant


def _meta(array, affine):
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(array))[None], affine=torch.from_numpy(affine))


@pytest.fixture(scope="module")
def variants():
    return {name: lits_variant(name) for name in VARIANTS}


@pytest.mark.parametrize("axis", sorted(PLANES))
def test_voxel_and_world_points_land_on_the_same_pixel_in_every_orientation(variants, axis):
    native = variants["lps"]
    tumour_voxels = np.argwhere(native.label == 2)[::4000]
    expected = {}
    for name, v in variants.items():
        geometry = geometry_for(_meta(v.label, v.affine), axis)
        from_native = np.linalg.inv(v.to_native)
        for n, native_ijk in enumerate(tumour_voxels):
            ijk = np.round(from_native @ np.append(native_ijk, 1.0))[:3].astype(int)
            index, x, y = voxel_to_slice_point(geometry, ijk)
            plane = ExtractSlice(axis, index)(_meta(v.label, v.affine))[0]
            assert plane[y, x] == 2  # the clicked tumour voxel is at (x, y) of its slice
            assert slice_point_to_voxel(geometry, index, x, y) == tuple(ijk)
            world = voxel_to_world(v.affine, ijk, space="LPS")
            assert world_to_slice_point(geometry, v.affine, world, space="LPS") == (index, x, y)
            if name != "oblique":  # same anatomy -> same pixel (x, y) in every storage order
                assert expected.setdefault(n, (x, y)) == (x, y)


def test_out_of_volume_points_are_named(variants):
    v = variants["ras"]
    geometry = geometry_for(_meta(v.label, v.affine), "axial")
    with pytest.raises(ValueError, match=r"voxel point \(3.0, 200.0, 5.0\) is outside the volume"):
        voxel_to_slice_point(geometry, (3, 200, 5))
    with pytest.raises(ValueError, match=r"world point \(0.0, 0.0, 9999.0\) \(RAS\) is outside"):
        world_to_slice_point(geometry, v.affine, (0.0, 0.0, 9999.0))
    with pytest.raises(ValueError, match=r"slice point \(x=500, y=1\) is outside"):
        slice_point_to_voxel(geometry, 3, 500, 1)
    with pytest.raises(ValueError, match="does not overlap"):
        roi_to_slice_boxes(geometry, [300, 310, 0, 5, 0, 5])


@pytest.mark.parametrize("name", ["lps", "permuted_flipped"])
@pytest.mark.parametrize("axis", sorted(PLANES))
def test_roi_boxes_bound_the_roi_on_every_slice(variants, name, axis):
    v = variants[name]
    roi = [70, 20, 15, 60, 30, 44]  # i given high -> low, as Slicer may send it
    geometry = geometry_for(_meta(v.label, v.affine), axis)
    boxes = roi_to_slice_boxes(geometry, roi)
    mask = np.zeros(v.label.shape, dtype=np.uint8)
    mask[20:71, 15:61, 30:45] = 1
    assert sorted(boxes) == list(range(*{0: (20, 71), 1: (15, 61), 2: (30, 45)}[geometry.slice_dim]))
    for index in list(boxes)[::5]:
        plane = ExtractSlice(axis, index)(_meta(mask, v.affine))[0].numpy()
        ys, xs = np.nonzero(plane)
        assert boxes[index] == (xs.min(), ys.min(), xs.max(), ys.max())


def test_scribbles_become_slice_masks(variants):
    v = variants["permuted_flipped"]
    scribbles = np.zeros(v.label.shape, dtype=np.uint8)
    scribbles[v.label == 2] = 1  # tumour voxels as a (thick) scribble
    img = _meta(v.label, v.affine)
    geometry = geometry_for(img, "axial")
    masks = scribbles_to_slice_masks(geometry, scribbles)
    assert len(masks) == int(np.any(scribbles, axis=(1, 2)).sum())  # slices first in this storage order
    for index, mask in list(masks.items())[::6]:
        assert np.array_equal(mask, ExtractSlice("axial", index)(img)[0].numpy() == 2)


def test_map_prompts_dictionary_transform(variants):
    v = variants["lps"]
    ijk = tuple(int(c) for c in np.argwhere(v.label == 1)[0])
    out = MapPromptsToSliced(axis="axial")(
        {
            "image": _meta(v.image, v.affine),
            "points": [ijk],
            "roi": [ijk[0], ijk[0] + 5, ijk[1], ijk[1] + 5, ijk[2], ijk[2]],
        }
    )
    assert out["slice_index"] == ijk[2]
    x, y = out["points_2d"][0]
    assert out["box_2d"][0] <= x <= out["box_2d"][2] and out["box_2d"][1] <= y <= out["box_2d"][3]
    assert out["mask_2d"].shape == (v.label.shape[1], v.label.shape[0]) and not out["mask_2d"].any()
    with pytest.raises(ValueError, match="not on axial slice"):
        MapPromptsToSliced(axis="axial")(
            {"image": _meta(v.image, v.affine), "points": [ijk, (1, 1, ijk[2] + 1)]}
        )


@pytest.mark.parametrize("kind", ["array", "tensor"])
def test_map_prompts_takes_points_as_an_array_or_a_tensor(variants, kind):
    import torch

    v = variants["lps"]
    ijk = [int(c) for c in np.argwhere(v.label == 1)[0]]
    points = np.array([ijk]) if kind == "array" else torch.tensor([ijk])
    given = MapPromptsToSliced(axis="axial")({"image": _meta(v.image, v.affine), "points": points})
    listed = MapPromptsToSliced(axis="axial")({"image": _meta(v.image, v.affine), "points": [tuple(ijk)]})
    assert (
        given["points_2d"] == listed["points_2d"] and given["slice_index"] == listed["slice_index"] == ijk[2]
    )
