"""MedPLIBConfig: presets, the release config.json reader and its error messages."""

from __future__ import annotations

import json
import shutil

import pytest

from monai_medplib.config import MedPLIBConfig


def test_fixture_config_is_read_from_json(public_fixture):
    cfg = MedPLIBConfig.from_pretrained(public_fixture / "model")
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (867, 64, 176)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 4, 4)
    assert cfg.rope_theta == 10000.0  # absent from the 4.31 config: RoPE default
    assert cfg.moe_layers_idx == [0, 1] and cfg.num_experts == 2 and cfg.eval_capacity_factor == 2.0
    # CLIP from model/vision_tower/config.json, SAM from oracle_sam_config
    assert cfg.clip["hidden_size"] == 32 and cfg.clip["num_hidden_layers"] == 3
    assert cfg.clip["hidden_act"] == "quick_gelu"
    assert cfg.sam.encoder_embed_dim == 64 and cfg.sam.encoder_depth == 2
    assert cfg.sam.encoder_global_attn_indexes == (1,)
    assert cfg.num_image_tokens == 576


def test_release_preset_matches_spec():
    cfg = MedPLIBConfig.release_7b_2e()
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (
        32267,
        4096,
        11008,
        32,
    )
    assert cfg.moe_layers_idx == list(range(32))
    assert cfg.clip["hidden_size"] == 1024 and cfg.clip["num_hidden_layers"] == 24
    assert cfg.sam.encoder_embed_dim == 768 and cfg.sam.encoder_global_attn_indexes == (2, 5, 8, 11)


def test_release_dict_round_trip():
    cfg = MedPLIBConfig.tiny()
    data = json.loads(json.dumps(cfg.to_release_dict()))
    assert data["model_type"] == "medplib_moe_llama" and data["moe"]["top_k_experts"] == 1
    assert data["moe"]["num_experts"] == [2, 2]
    assert MedPLIBConfig.from_dict(data, clip=data["clip_config"]) == MedPLIBConfig.from_dict(data)
    again = MedPLIBConfig.from_dict(data)
    assert again.sam == cfg.sam and again.clip == cfg.clip and again.hidden_size == cfg.hidden_size


def test_missing_fields_are_all_named(tmp_path, public_fixture):
    data = json.loads((public_fixture / "model" / "config.json").read_text())
    del data["hidden_size"], data["vocab_size"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="vocab_size, hidden_size"):
        MedPLIBConfig.from_pretrained(tmp_path)


def test_not_a_medplib_directory(tmp_path, public_fixture):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        MedPLIBConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        MedPLIBConfig.from_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ValueError, match="not a MedPLIB checkpoint"):
        MedPLIBConfig.from_pretrained(tmp_path)


def test_clip_falls_back_to_release_tower(tmp_path, public_fixture):
    shutil.copyfile(public_fixture / "model" / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match="mm_hidden_size 32 differs"):
        MedPLIBConfig.from_pretrained(tmp_path)  # no vision_tower/: release CLIP-L (1024) is assumed


def test_unsupported_moe_is_rejected():
    data = MedPLIBConfig.tiny().to_release_dict()
    data["moe"]["top_k_experts"] = 2
    with pytest.raises(ValueError, match="top_k_experts=2"):
        MedPLIBConfig.from_dict(data)
