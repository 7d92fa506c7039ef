"""The overlay montage shows the slices as the model saw them (monai_medplib/io/outputs.py)."""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor
from PIL import Image

from monai_medplib.io.outputs import save_overlay_montage
from monai_medplib.pipeline.volume import prepare_volume
from monai_medplib.transforms import ExtractSlice


def test_an_8_bit_volume_is_shown_with_the_values_the_model_got(tmp_path):
    """A uint8 volume reaches the model unchanged (no percentile stretch); the montage must show the same grey."""
    values = (100 + np.arange(8 * 8 * 4) % 50).astype(np.uint8).reshape(1, 8, 8, 4)
    image = MetaTensor(torch.from_numpy(values))
    label = MetaTensor(torch.zeros(1, 8, 8, 4, dtype=torch.uint8))
    label[0, 2:4, 2:4, 1] = 1
    path, shown = save_overlay_montage(image, label, tmp_path / "m.png", window=None, count=1)
    _, model_input = prepare_volume(image)
    expected = np.asarray(ExtractSlice("axial")(model_input, index=shown[0])[0])
    tile = np.asarray(Image.open(path).convert("RGB"))[:, :, 0]
    unlabelled = np.asarray(ExtractSlice("axial")(label, index=shown[0])[0]) == 0
    assert tile.shape == expected.shape
    np.testing.assert_array_equal(tile[unlabelled], expected[unlabelled])
    assert int(tile[unlabelled].min()) >= 100  # not stretched to 0..255
