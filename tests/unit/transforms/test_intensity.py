"""Intensity transforms against hand-computed values and the real LiTS CT."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from monai_medplib.data.lits import load_lits_case
from monai_medplib.transforms import (
    CT_WINDOWS,
    CTWindow,
    CTWindowd,
    GreyToRGB,
    GreyToRGBd,
    Passthrough8Bit,
    SAMed2DNormalize,
    SAMed2DNormalized,
    window_bounds,
)


def test_samed2d_on_real_ct_matches_numpy_percentiles():
    ct = load_lits_case().image
    out = SAMed2DNormalize()(MetaTensor(torch.from_numpy(ct)[None], affine=torch.eye(4) * 2))
    low, high = np.percentile(ct, [0.5, 99.5])
    expected = np.round(np.clip((ct.astype(np.float64) - low) / (high - low), 0, 1) * 255).astype(np.uint8)
    assert out.dtype == torch.uint8 and isinstance(out, MetaTensor)
    diff = np.abs(out[0].numpy().astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # float32 vs float64 rounding ties only
    assert (out == 0).float().mean().item() >= 0.0049 and (
        out == 255
    ).float().mean().item() >= 0.0049  # clipped tails
    assert torch.equal(out.affine, torch.eye(4, dtype=torch.float64) * 2)


def _monai_samed2d(values: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    """The normalisation as first written: numpy's nanpercentile and MONAI's ScaleIntensityRange on MetaTensors."""
    from monai.transforms import ScaleIntensityRange

    low, high = (float(v) for v in np.nanpercentile(values.numpy(), [lower, upper]))
    if high <= low:
        return torch.zeros_like(values, dtype=torch.uint8)
    scaled = ScaleIntensityRange(low, high, 0.0, 255.0, clip=True, dtype=torch.float32)(MetaTensor(values))
    return torch.nan_to_num(torch.round(scaled.as_tensor()), nan=0.0).to(torch.uint8)


def _random_values(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "hu":
        return rng.integers(-1024, 3072, n)
    if kind == "narrow":
        return np.round(rng.normal(40, rng.uniform(0.3, 30), n))
    if kind == "two levels":
        return rng.integers(0, 2, n) * int(rng.integers(1, 4000)) - 1000
    if kind == "constant":
        return np.full(n, float(rng.integers(-50, 50)))
    if kind == "float":
        return rng.normal(0, 100, n)
    return np.where(rng.random(n) < 0.1, np.nan, rng.normal(0, 100, n))


@pytest.mark.parametrize("kind", ["hu", "narrow", "two levels", "constant", "float", "float with nan"])
def test_samed2d_fast_paths_are_bit_identical_to_numpy_and_monai(kind):
    # integer-valued volumes take the histogram + lookup-table path, others the in-place float path: both must give
    # exactly what nanpercentile + ScaleIntensityRange give, for random sizes, ranges, ties and percentiles
    rng = np.random.default_rng(
        ["hu", "narrow", "two levels", "constant", "float", "float with nan"].index(kind)
    )
    for _ in range(25):
        n = int(rng.integers(1, 3000))
        values = _random_values(kind, n, rng)
        if kind == "float with nan" and np.isnan(values).all():
            continue
        volume = torch.from_numpy(values.astype(np.float32)).reshape(1, -1, 1, 1)
        lower, upper = (
            (float(rng.uniform(0, 5)), float(rng.uniform(95, 100))) if rng.random() < 0.5 else (0.5, 99.5)
        )
        out = SAMed2DNormalize(lower, upper)(MetaTensor(volume))
        assert torch.equal(out.as_tensor(), _monai_samed2d(volume, lower, upper)), (n, lower, upper)


def test_ct_window_presets_by_hand():
    assert CT_WINDOWS["liver"] == (150.0, 30.0) and window_bounds("lung") == (-1350.0, 150.0)
    hu = torch.tensor([[[-1000.0, -45.0, 30.0, 105.0, 2000.0]]])
    assert CTWindow("liver")(hu).flatten().tolist() == [0, 0, 128, 255, 255]  # 127.5 rounds to even 128
    # W400 L40 -> [-160, 240]: (-45+160)/400*255 = 73.3, 190/400*255 = 121.1, 265/400*255 = 168.9
    assert CTWindow(window=400, level=40)(hu).flatten().tolist() == [0, 73, 121, 169, 255]
    with pytest.raises(ValueError, match="unknown CT window preset 'heart'"):
        CTWindow("heart")
    with pytest.raises(ValueError, match="width must be positive"):
        CTWindow(window=0, level=40)


def test_nan_and_constant_volumes_have_defined_results():
    vol = torch.arange(1000, dtype=torch.float32).reshape(1, 10, 10, 10)
    vol[0, 0, 0, :3] = float("nan")
    out = SAMed2DNormalize()(vol)
    assert out[0, 0, 0, :3].tolist() == [0, 0, 0] and out.max() == 255
    assert SAMed2DNormalize()(torch.full((1, 4, 4, 4), 7.0)).eq(0).all()
    with pytest.raises(ValueError, match="all NaN"):
        SAMed2DNormalize()(torch.full((1, 2, 2, 2), float("nan")))


def test_passthrough_and_grey_to_rgb():
    grey = torch.tensor([[[0, 17], [200, 255]]], dtype=torch.float32)
    kept = Passthrough8Bit()(grey)
    assert kept.dtype == torch.uint8 and kept.flatten().tolist() == [0, 17, 200, 255]
    with pytest.raises(ValueError, match="not integers in 0-255"):
        Passthrough8Bit()(torch.tensor([[[-1000.0, 400.0]]]))
    rgb = GreyToRGB()(kept)
    assert rgb.shape == (3, 2, 2) and all(torch.equal(rgb[c], kept[0]) for c in range(3))
    assert GreyToRGB()(rgb).shape == (3, 2, 2)
    with pytest.raises(ValueError, match="1 \\(or 3\\) channels"):
        GreyToRGB()(torch.zeros(2, 4, 4))


def test_dictionary_versions_compose():
    ct = torch.from_numpy(load_lits_case().image[:32, :32, :32])[None]
    out = Compose([SAMed2DNormalized("a"), CTWindowd("b", preset="abdomen"), GreyToRGBd(["a", "b"])])(
        {"a": ct, "b": ct.clone()}
    )
    assert out["a"].shape == (3, 32, 32, 32) and out["b"].dtype == torch.uint8
    assert torch.equal(out["b"][0], CTWindow("abdomen")(ct)[0])


def test_infinite_voxels_do_not_blank_the_image():
    """Percentiles of the finite voxels; -inf / +inf clip to 0 / 255 (as 1 % of NaN voxels leave the rest)."""
    values = torch.linspace(0, 100, 1000).reshape(1, 10, 10, 10)
    with_inf, with_nan = values.clone(), values.clone()
    with_inf.view(-1)[:10], with_inf.view(-1)[-1] = float("-inf"), float("inf")
    with_nan.view(-1)[:10], with_nan.view(-1)[-1] = float("nan"), float("nan")
    out_inf, out_nan = SAMed2DNormalize()(with_inf), SAMed2DNormalize()(with_nan)
    assert torch.equal(out_inf.view(-1)[10:-1], out_nan.view(-1)[10:-1])  # the finite voxels alike
    assert len(out_inf.unique()) > 200 and out_inf.view(-1)[0] == 0 and out_inf.view(-1)[-1] == 255
    with pytest.raises(ValueError, match="all NaN / infinite"):
        SAMed2DNormalize()(torch.full((1, 2, 2, 2), float("inf")))


def test_a_boolean_mask_passes_as_0_and_1():
    assert Passthrough8Bit()(torch.tensor([[[True, False]]])).tolist() == [[[1, 0]]]


def test_transform_submodules_load_on_first_access():
    import subprocess
    import sys

    code = "import monai_medplib.transforms as T; print(T.prompts.__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "monai_medplib.transforms.prompts", done.stderr
