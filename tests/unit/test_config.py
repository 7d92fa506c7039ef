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


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("hidden_size", "128", "hidden_size must be a whole number >= 1, got '128'"),
        ("num_attention_heads", 0, "num_attention_heads must be a whole number >= 1, got 0"),
        ("num_hidden_layers", True, "num_hidden_layers must be a whole number >= 1, got True"),
        ("rope_theta", "x", "rope_theta must be a finite number > 0, got 'x'"),
        ("rms_norm_eps", float("nan"), "rms_norm_eps must be a finite number > 0, got nan"),
        ("moe", [1], "'moe' must be a JSON object or null, got \\[1\\]"),
    ],
)
def test_a_field_of_the_wrong_type_or_range_is_named(field, value, message):
    """A hand-edited config.json: each mistake names its field (not a TypeError / ZeroDivisionError in torch)."""
    data = MedPLIBConfig.tiny().to_release_dict()
    data[field] = value
    with pytest.raises(ValueError, match=message):
        MedPLIBConfig.from_dict(data)


def test_nested_sizes_are_checked():
    data = MedPLIBConfig.tiny().to_release_dict()
    bad_experts = json.loads(json.dumps(data))
    bad_experts["moe"]["num_experts"] = [0, 0]
    with pytest.raises(ValueError, match="num_experts must be a whole number >= 1, got 0"):
        MedPLIBConfig.from_dict(bad_experts)
    bad_patch = json.loads(json.dumps(data))
    bad_patch["clip_config"]["patch_size"] = 0
    with pytest.raises(ValueError, match="clip_config.patch_size must be a whole number >= 1, got 0"):
        MedPLIBConfig.from_dict(bad_patch)
    bad_sam = json.loads(json.dumps(data))
    bad_sam["sam_config"]["encoder_depth"] = "4"
    with pytest.raises(ValueError, match="sam_config.encoder_depth must be a whole number >= 1"):
        MedPLIBConfig.from_dict(bad_sam)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\udcff"])
def test_a_damaged_config_file_is_named(tmp_path, public_fixture, text):
    shutil.copytree(public_fixture / "model" / "vision_tower", tmp_path / "vision_tower")
    (tmp_path / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match=r"config\.json: (not valid JSON|expected a JSON object)"):
        MedPLIBConfig.from_pretrained(tmp_path)
