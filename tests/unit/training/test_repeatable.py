"""Same seed, same step counts, same weights: ``scripts/train_demo.py`` counts steps, not seconds, and relies on it."""

from __future__ import annotations

import torch

from monai_medplib.checkpoint import load_medplib, save_medplib
from monai_medplib.data.demo_slices import ct_volume_from_planes, iter_slices
from monai_medplib.modeling.medplib import MedPLIBForCausalLM
from monai_medplib.training.click_prompts import ClickTraining
from monai_medplib.training.distributed import init_distributed
from monai_medplib.training.loop import TrainConfig
from monai_medplib.training.run import StageRun, run_stage
from monai_medplib.training.tissue_contrast import TissueContrastConfig, train_tissue_contrast
from tests.support.training_helpers import build_tiny_data, synthetic_planes, tiny_config


def _weights(path) -> dict[str, torch.Tensor]:
    return load_medplib(path, dtype=torch.float32)[0].state_dict()


def _differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return sorted(k for k in a if not torch.equal(a[k], b[k]))


def test_a_stage_and_the_tissue_step_run_twice_end_bit_identical(tmp_path):
    data, tok_dir, tokenizer = build_tiny_data(tmp_path)
    torch.manual_seed(0)
    config = tiny_config(len(tokenizer))
    init = save_medplib(MedPLIBForCausalLM(config), config, tok_dir, tmp_path / "init")
    # the demo flags' random parts too: click chains, empty masks for absent answers, the null prompt
    cfg = TrainConfig(max_steps=3, batch_size=2, lr=1e-3, log_every=1, clicks=ClickTraining())
    outs = []
    for name in ("a", "b"):
        run = StageRun(
            "stage0", data, tmp_path / name, cfg, init=init, resume=False, absent_masks=True, null_prompt=True
        )
        run_stage(run, init_distributed("cpu"), log=lambda _: None)
        outs.append(_weights(tmp_path / name / "hf"))
    assert _differing(outs[0], outs[1]) == []
    assert _differing(_weights(init), outs[0])  # it trained

    slices = list(iter_slices([ct_volume_from_planes(synthetic_planes())], ("train",)))
    tissue = [
        train_tissue_contrast(
            init, tmp_path / f"tissue_{k}", slices, TissueContrastConfig(steps=4, batch_size=4)
        )
        for k in (0, 1)
    ]
    assert tissue[0]["steps"] == tissue[1]["steps"] == 4
    assert _differing(_weights(tmp_path / "tissue_0"), _weights(tmp_path / "tissue_1")) == []
    other = train_tissue_contrast(
        init, tmp_path / "seed_7", slices, TissueContrastConfig(steps=4, batch_size=4, seed=7)
    )
    assert other["steps"] == 4 and _differing(_weights(tmp_path / "tissue_0"), _weights(tmp_path / "seed_7"))
