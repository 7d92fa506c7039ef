"""Image / mask processing against the tensors the release code stored in the public fixture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from monai_medplib.processing import (
    CLIP_PAD_FILL,
    binarize,
    box_region_mask,
    clip_pixels,
    load_rgb,
    point_region_mask,
    postprocess_mask_logits,
    preprocess_shape,
    region_grid,
    sam_pixels,
)


def _tensors(fixture: Path, case: str) -> dict[str, torch.Tensor]:
    return load_file(fixture / "expected" / f"{case}.safetensors")


@pytest.fixture(scope="module")
def expected(public_fixture: Path) -> dict:
    return json.loads((public_fixture / "expected" / "expected.json").read_text())


@pytest.mark.parametrize(("case", "image"), [("a_vqa", "image.png"), ("d_vqa_square", "image_square.png")])
def test_clip_pixels_match_release(public_fixture, case, image):
    rgb = load_rgb(public_fixture / "inputs" / image)
    got = clip_pixels(rgb)
    want = _tensors(public_fixture, case)["images_clip"][0]
    assert got.dtype == torch.float32 and got.shape == (3, 336, 336)
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    ("case", "image"), [("c_grounding", "image.png"), ("d_grounding_square", "image_square.png")]
)
def test_sam_pixels_and_mask_postprocess_match_release(public_fixture, expected, case, image):
    rgb = load_rgb(public_fixture / "inputs" / image)
    stored = _tensors(public_fixture, case)
    pixels, resize = sam_pixels(rgb)
    assert pixels.shape == (3, 256, 256)
    assert (pixels - stored["images_sam"][0]).abs().max().item() <= 1e-5
    assert list(resize) == expected["cases"][case]["resize"]

    logits = postprocess_mask_logits(stored["low_res_masks"], resize, rgb.shape[:2])
    assert logits.shape == (1, 1, *rgb.shape[:2])
    assert (logits[0] - stored["pred_mask_logits"]).abs().max().item() <= 1e-3
    assert torch.equal(binarize(logits)[0].to(torch.uint8), stored["pred_mask_binary"])


def test_region_grids_match_release(public_fixture):
    stored = _tensors(public_fixture, "b_region_vqa")
    mask = np.array(Image.open(public_fixture / "inputs" / "region_mask.png"))
    demo = region_grid(mask)
    assert demo.dtype == torch.uint8 and demo.shape == (24, 24)
    assert torch.equal(demo, stored["region_grid24"])
    dataset = region_grid(mask, keep_largest_component=True)
    assert torch.equal(dataset.float(), stored["region_grid24_dataset_path"])


def test_region_grid_two_blobs_and_sampling():
    mask = np.zeros((336, 336), dtype=np.uint8)
    mask[0:28, 0:28] = 1  # patches (0,0),(0,1),(1,0),(1,1): 4 cells
    mask[140:141, 140:141] = 1  # the top-left pixel of patch (10,10): 1 cell
    mask[200:210, 15:25] = 1  # inside patches but misses every top-left pixel: 0 cells
    grid = region_grid(mask)
    assert grid.sum() == 5 and grid[10, 10] == 1 and grid[:2, :2].all()
    largest = region_grid(mask, keep_largest_component=True)
    assert largest.sum() == 4 and largest[10, 10] == 0
    # Diagonal neighbours are one 8-connected component.
    diag = np.zeros((336, 336), dtype=np.uint8)
    diag[0, 0] = diag[14, 14] = diag[28, 28] = 1
    diag[280, 0] = 1
    assert region_grid(diag, keep_largest_component=True).sum() == 3


def test_region_grid_centre_padding():
    # 168x336 image -> resized to 168x336 -> 84 rows of padding on top: the mask starts at grid row 6.
    mask = np.ones((168, 336), dtype=np.uint8)
    grid = region_grid(mask)
    rows = torch.nonzero(grid.any(dim=1)).flatten()
    assert rows.min() == 6 and rows.max() == 17


def test_region_errors():
    with pytest.raises(ValueError, match="empty"):
        region_grid(np.zeros((20, 20)))
    thin = np.zeros((336, 336), dtype=np.uint8)
    thin[5:10, :] = 1
    with pytest.raises(ValueError, match="vanished"):
        region_grid(thin)
    with pytest.raises(ValueError, match="2D"):
        region_grid(np.ones((4, 4, 3)))


def test_point_and_box_masks():
    point = point_region_mask((100, 200, 3), [(50, 30)])
    rows, cols = np.nonzero(point)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (10, 50, 30, 70)
    assert point.sum() == 41 * 41
    corner = point_region_mask((100, 200), [(2, 95)])  # clipped at the left and bottom borders
    rows, cols = np.nonzero(corner)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (75, 99, 0, 22)
    median = point_region_mask((100, 200), [(10, 10), (60, 50), (80, 90), (190, 95)])
    rows, cols = np.nonzero(median)  # lower median: x=60, y=50
    assert (rows.min(), cols.min()) == (30, 40)

    box = box_region_mask((100, 200), (10, 20, 30, 25))
    rows, cols = np.nonzero(box)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (20, 25, 10, 30)
    assert box.sum() == 21 * 6
    with pytest.raises(ValueError, match="x=200"):
        point_region_mask((100, 200), [(200, 5)])
    with pytest.raises(ValueError, match=r"\(10, 20, 300, 25\)"):
        box_region_mask((100, 200), (10, 20, 300, 25))
    with pytest.raises(ValueError, match="at least one"):
        point_region_mask((100, 200), [])
    # a box passed as points was read as two points; (x, y, z) could not be reshaped
    with pytest.raises(ValueError, match=r"points must be \(x, y\) pairs, got \[\[10, 20, 80, 90\]\]"):
        point_region_mask((100, 200), [(10, 20, 80, 90)])
    with pytest.raises(ValueError, match="points must be"):
        point_region_mask((100, 200), [(5, 6, 7)])
    with pytest.raises(ValueError, match="four finite numbers"):
        box_region_mask((100, 200), (float("nan"), 0, 10, 10))


@pytest.mark.parametrize("shape", [(1, 1000), (1000, 1), (2, 2000)])
def test_an_image_too_elongated_to_resize_is_named(shape):
    """512:1 and flatter: the short side rounds to 0 pixels at SAM's 256 (the release's resize fails too)."""
    with pytest.raises(ValueError, match=f"an image of {shape[0]} x {shape[1]} pixels is too elongated"):
        sam_pixels(np.zeros((*shape, 3), np.uint8))
    assert sam_pixels(np.zeros((1, 500, 3), np.uint8))[1] == (1, 256)  # still 1 pixel high: kept


def test_crop_quirk_hand_computed():
    # 411x233 -> resize (256, 145): left = (64 - 145) // 2 = -41 -> columns 23..63 stretched to 233.
    assert preprocess_shape(411, 233, 256) == (256, 145)
    low = torch.arange(64, dtype=torch.float32).repeat(64, 1)[None, None]  # value = column index
    out = postprocess_mask_logits(low, (256, 145), (411, 233))
    assert out.shape == (1, 1, 411, 233)
    assert out[0, 0, 0, 0].item() == pytest.approx(23.0) and out[0, 0, 0, -1].item() == pytest.approx(63.0)
    # 300x420 -> resize (183, 256): rows 4..63, all columns.
    low_rows = low.transpose(2, 3)
    out = postprocess_mask_logits(low_rows, (183, 256), (300, 420))
    assert out[0, 0, 0, 0].item() == pytest.approx(4.0) and out[0, 0, -1, 0].item() == pytest.approx(63.0)
    assert binarize(torch.tensor([-2.19, -2.20])).tolist() == [True, False]  # logit(0.1) = -2.1972


def test_load_rgb_variants(public_fixture, tmp_path):
    rgb = load_rgb(public_fixture / "inputs" / "image.png")
    assert rgb.shape == (300, 420, 3) and rgb.dtype == np.uint8
    assert np.array_equal(load_rgb(Image.open(public_fixture / "inputs" / "image.png")), rgb)
    grey = load_rgb(public_fixture / "inputs" / "gt_mask.png")  # 8-bit grayscale PNG
    assert grey.shape == (300, 420, 3) and (grey[..., 0] == grey[..., 2]).all()
    assert np.array_equal(load_rgb(np.array([[0.0, 0.5, 1.0]])), np.array([[[0] * 3, [128] * 3, [255] * 3]]))
    assert load_rgb(np.array([[-5.0, 300.0]]))[0, :, 0].tolist() == [0, 255]  # outside [0,1]: clipped
    assert load_rgb(np.array([[7, 200]], dtype=np.int32))[0, :, 1].tolist() == [7, 200]
    sixteen = tmp_path / "s.png"
    Image.fromarray(np.array([[0, 65535]], dtype=np.uint16)).save(sixteen)
    assert load_rgb(sixteen)[0, :, 0].tolist() == [0, 255]
    # 300x420 -> 240x336 with 48 rows of centre padding: the corner pixel is the normalised pad colour.
    assert CLIP_PAD_FILL == (122, 116, 104)
    corner = clip_pixels(rgb)[:, 0, 0]
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    assert np.allclose(corner.numpy(), (np.array(CLIP_PAD_FILL) / 255 - mean) / std, atol=1e-6)
    assert torch.all(sam_pixels(rgb)[0][:, :36] == 0)  # SAM: 183x256 -> 36 zero rows on top


def test_a_photo_is_read_the_way_it_is_shown(tmp_path):
    """A JPEG stored 40 x 100 with EXIF orientation 6 (turned 90 degrees) shows as 100 x 40: cv2.imread, the
    release's reader, returns it so, and a mask must come back in that orientation too."""
    stored = np.zeros((40, 100, 3), np.uint8)
    stored[:, :10] = 255  # a bright band on the stored image's left edge
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    shown = load_rgb(tmp_path / "photo.jpg")
    assert shown.shape == (100, 40, 3)
    assert shown[:10].mean() > 200 and shown[-10:].mean() < 50  # orientation 6: the left edge is now the top


def test_load_rgb_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_rgb(tmp_path / "missing.png")
    with pytest.raises(TypeError, match="list"):
        load_rgb([[0, 1]])
    with pytest.raises(ValueError, match=r"\(3, 8, 8, 2\)"):
        load_rgb(np.zeros((3, 8, 8, 2)))
    with pytest.raises(ValueError, match=r"\(8, 8, 4\)"):
        load_rgb(np.zeros((8, 8, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="0..4000"):
        load_rgb(np.array([[0, 4000]], dtype=np.int16))
    with pytest.raises(ValueError, match="NaN"):
        load_rgb(np.array([[np.nan, 0.0]]))


def _exif_rotated_picture(path: Path, pixels: np.ndarray) -> None:
    """``pixels`` stored rotated, with EXIF Orientation 6 (turn 90 degrees clockwise to view), as phones write (a
    PNG's eXIf chunk: lossless, so pixels can be compared exactly)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.rot90(pixels, 1).copy()).save(path, exif=exif)


def test_region_masks_ignore_alpha_and_follow_exif(tmp_path: Path) -> None:
    """cv2.imread (the release's reader) drops an alpha band and turns a JPEG as its EXIF says: an opaque RGBA mask
    is its white square, not the whole image; the CLI reads masks and images the same way."""
    from monai_medplib.commands._inputs import read_picture
    from monai_medplib.processing import load_region_mask

    square = np.zeros((64, 64), np.uint8)
    square[10:30, 20:40] = 255
    rgba = np.dstack([square, square, square, np.full_like(square, 255)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.dstack([square, np.full_like(square, 255)]), "LA").save(tmp_path / "la.png")
    for name in ("rgba.png", "la.png"):
        assert load_region_mask(tmp_path / name).sum() == 400
        assert load_region_mask(read_picture(tmp_path / name, as_rgb=False)).sum() == 400
    assert load_region_mask(rgba).sum() == 400  # an RGBA array: the 4th channel is alpha

    tall = np.zeros((80, 40), np.uint8)
    tall[5:15, 5:35] = 255  # a bar near the top of an 80 x 40 (H x W) picture as viewed
    _exif_rotated_picture(tmp_path / "turned.png", tall)
    assert Image.open(tmp_path / "turned.png").size == (80, 40)  # stored 80 wide, 40 high
    viewed = load_region_mask(tmp_path / "turned.png")
    assert viewed.shape == (80, 40) and viewed[5:15, 5:35].all() and viewed.sum() == 300
    image = read_picture(tmp_path / "turned.png")
    assert image.shape == (80, 40, 3) and np.array_equal(image, load_rgb(tmp_path / "turned.png"))
