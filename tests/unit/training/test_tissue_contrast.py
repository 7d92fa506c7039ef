"""The demo-only tissue-contrast step of the CLIP tower (training/tissue_contrast.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_medplib.checkpoint import load_medplib, save_medplib
from monai_medplib.data.demo_slices import ct_volume_from_planes, iter_slices
from monai_medplib.modeling.medplib import MedPLIBForCausalLM
from monai_medplib.training.lora import set_trainable
from monai_medplib.training.tissue_contrast import (
    TISSUE_CLASSES,
    TissueContrastConfig,
    patch_tissue_labels,
    train_tissue_contrast,
)
from tests.support.training_helpers import build_tiny_data, synthetic_planes, tiny_config


def test_patch_labels_take_each_patch_centre_and_shift_mr_classes():
    # 48 px -> 336 px is x7: a CLIP patch (14 px) covers 2x2 label pixels, its centre (7, 7) is pixel (1, 1).
    label = np.zeros((48, 48), dtype=np.uint8)
    label[1, 1] = 2  # centre of patch (0, 0)
    label[0, 2] = 1  # a corner of patch (0, 1), not its centre (1, 3)
    label[3, 5] = 1  # centre of patch (1, 2)
    ct = patch_tissue_labels(label, "CT").reshape(24, 24)
    assert ct[0, 0] == TISSUE_CLASSES.index("tumour")
    assert ct[0, 1] == TISSUE_CLASSES.index("background")
    assert ct[1, 2] == TISSUE_CLASSES.index("liver")
    assert int(ct.sum()) == 3
    mr = patch_tissue_labels(label, "MR").reshape(24, 24)
    assert mr[0, 0] == TISSUE_CLASSES.index("white matter")
    assert mr[1, 2] == TISSUE_CLASSES.index("grey matter")
    with pytest.raises(ValueError, match="square"):
        patch_tissue_labels(np.zeros((48, 40), dtype=np.uint8), "CT")


def test_only_the_tower_changes_and_tissue_loss_falls(tmp_path):
    _, tok_dir, tokenizer = build_tiny_data(tmp_path)
    torch.manual_seed(0)
    config = tiny_config(len(tokenizer))
    init = save_medplib(MedPLIBForCausalLM(config), config, tok_dir, tmp_path / "stage0")
    slices = list(iter_slices([ct_volume_from_planes(synthetic_planes())], ("train",)))
    cfg = TissueContrastConfig(steps=25, batch_size=4, lr=3e-3)
    summary = train_tissue_contrast(init, tmp_path / "tissue", slices, cfg, log=lambda _: None)
    assert summary["steps"] == 25
    assert summary["last_loss"] < summary["first_loss"]
    before = load_medplib(init, dtype=torch.float32)[0].state_dict()
    after = load_medplib(tmp_path / "tissue", dtype=torch.float32)[0].state_dict()
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(
        k.startswith(("model.vision_tower.", "model.region_fea_adapter.")) for k in changed
    ), sorted(changed)[:5]
    with pytest.raises(ValueError, match="at least one"):
        train_tissue_contrast(init, tmp_path / "none", [], cfg)


def test_stage0_continues_from_a_saved_dense_model_and_refuses_a_moe_one(tmp_path):
    from monai_medplib.training.distributed import init_distributed
    from monai_medplib.training.loop import TrainConfig
    from monai_medplib.training.run import StageRun, run_stage

    data, tok_dir, tokenizer = build_tiny_data(tmp_path)
    torch.manual_seed(0)
    config = tiny_config(len(tokenizer))
    init = save_medplib(MedPLIBForCausalLM(config), config, tok_dir, tmp_path / "stage0")
    train_cfg = TrainConfig(max_steps=2, batch_size=2, lr=1e-3, log_every=1)
    run = StageRun("stage0", data, tmp_path / "again", train_cfg, init=init, resume=False)
    summary = run_stage(run, init_distributed("cpu"), log=lambda _: None)
    assert summary["steps"] == 2
    before = load_medplib(init, dtype=torch.float32)[0].state_dict()
    after = load_medplib(tmp_path / "again" / "hf", dtype=torch.float32)[0].state_dict()
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("model.layers."))
    moe_config = tiny_config(len(tokenizer), moe=True)
    moe = save_medplib(MedPLIBForCausalLM(moe_config), moe_config, tok_dir, tmp_path / "moe")
    with pytest.raises(ValueError, match="MoE"):
        run_stage(
            StageRun("stage0", data, tmp_path / "x", train_cfg, init=moe, resume=False),
            init_distributed("cpu"),
        )


def test_stage0b_keeps_the_frozen_tower_and_region_adapter_and_trains_the_rest(tmp_path):
    """``--freeze`` (StageRun.freeze), as scripts/train_demo.py's stage0b uses it to keep the tissue features."""
    from monai_medplib.training.__main__ import build_parser
    from monai_medplib.training.distributed import init_distributed
    from monai_medplib.training.loop import TrainConfig
    from monai_medplib.training.run import StageRun, run_stage

    data, tok_dir, tokenizer = build_tiny_data(tmp_path)
    torch.manual_seed(0)
    config = tiny_config(len(tokenizer))
    init = save_medplib(MedPLIBForCausalLM(config), config, tok_dir, tmp_path / "stage0")
    argv = ["--stage", "0", "--data-root", "d", "--out", "o"]
    frozen = build_parser().parse_args(
        [*argv, "--freeze", r"^model\.vision_tower\.", r"^model\.region_fea_adapter\."]
    )
    train_cfg = TrainConfig(max_steps=2, batch_size=2, lr=1e-3, log_every=1)
    run = StageRun(
        "stage0", data, tmp_path / "b", train_cfg, init=init, resume=False, freeze=tuple(frozen.freeze)
    )
    summary = run_stage(run, init_distributed("cpu"), log=lambda _: None)
    before = load_medplib(init, dtype=torch.float32)[0].state_dict()
    after = load_medplib(tmp_path / "b" / "hf", dtype=torch.float32)[0].state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    kept = ("model.vision_tower.", "model.region_fea_adapter.")
    assert not {k for k in changed if k.startswith(kept)}
    assert any(k.startswith("model.layers.") for k in changed) and any(
        k.startswith("model.mm_projector.") for k in changed
    )
    everything = sum(p.numel() for p in load_medplib(init)[0].parameters())
    tower = sum(v.numel() for k, v in before.items() if k.startswith(kept))
    assert summary["trainable_parameters"] == everything - tower
    assert build_parser().parse_args(argv).freeze == []  # the stage's own set by default
    model = load_medplib(init)[0]
    flags = {k: v.requires_grad for k, v in model.named_parameters()}
    with pytest.raises(ValueError, match="is not a regular expression") as err:
        set_trainable(model, (r".",), (r"model\.(",))
    assert repr(r"model\.(") in str(err.value)  # names the pattern
    with pytest.raises(ValueError, match="match no parameter this stage trains") as err:
        set_trainable(
            model, (r"^lm_head\.",), (r"^model\.vision_tower",)
        )  # a typo or a part the stage leaves
    assert "vision_tower" in str(err.value)
    # a refused call changes nothing
    assert {k: v.requires_grad for k, v in model.named_parameters()} == flags
    with pytest.raises(ValueError, match=r"TissueContrastConfig.steps must be >= 1, got 0"):
        TissueContrastConfig(steps=0)
