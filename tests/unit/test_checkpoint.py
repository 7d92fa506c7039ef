"""Checkpoint loading / saving: strictness, layouts (single, sharded, .bin, separate CLIP/SAM), dtypes, round trip."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from monai_medplib.checkpoint import CheckpointMismatchError, load_medplib, save_medplib

AUX_FILES = (
    "config.json",
    "tokenizer.model",
    "added_tokens.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


@pytest.fixture(scope="module")
def reference(public_fixture):
    """The fixture weights as stored (with the 4.31 RoPE buffers)."""
    return load_file(str(public_fixture / "model" / "model.safetensors"))


def _model_dir(tmp_path, public_fixture, name="ckpt"):
    out = tmp_path / name
    shutil.copytree(public_fixture / "model" / "vision_tower", out / "vision_tower")
    for f in AUX_FILES:
        shutil.copyfile(public_fixture / "model" / f, out / f)
    return out


def _same_weights(model, reference) -> None:
    state = model.state_dict()
    expected = {k: v for k, v in reference.items() if not k.endswith("rotary_emb.inv_freq")}
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def test_loads_fixture_strictly(public_fixture, reference):
    model, config, tokenizer = load_medplib(public_fixture / "model")
    _same_weights(model, reference)
    assert not model.training and config.vocab_size == 867 and len(tokenizer) == 867
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    # RoPE frequencies are recomputed (the stored 4.31 buffers are ignored) and equal them
    assert torch.equal(
        model.model.rotary_emb.inv_freq, reference["model.layers.0.self_attn.rotary_emb.inv_freq"]
    )


def test_every_bad_key_is_named_in_one_error(tmp_path, public_fixture, reference):
    out = _model_dir(tmp_path, public_fixture)
    state = dict(reference)
    del state["model.norm.weight"], state["model.layers.1.mlp.deepspeed_moe.gate.wg.weight"]
    state["model.extra_head.weight"] = torch.zeros(2)
    state["model.mm_projector.0.bias"] = torch.zeros(3)
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError) as err:
        load_medplib(out)
    msg = str(err.value)
    for name in (
        "model.norm.weight",
        "model.layers.1.mlp.deepspeed_moe.gate.wg.weight",
        "model.extra_head.weight",
    ):
        assert name in msg
    assert "model.mm_projector.0.bias: checkpoint (3,) vs model (64,)" in msg


def test_sharded_without_index_and_bin(tmp_path, public_fixture, reference):
    keys = sorted(reference)
    sharded = _model_dir(tmp_path, public_fixture, "sharded")
    for i, part in enumerate((keys[: len(keys) // 3], keys[len(keys) // 3 :])):
        save_file({k: reference[k] for k in part}, str(sharded / f"model-{i:05d}-of-00002.safetensors"))
    _same_weights(load_medplib(sharded)[0], reference)

    binary = _model_dir(tmp_path, public_fixture, "binary")
    torch.save({k: reference[k] for k in keys[:100]}, binary / "pytorch_model-00001-of-00002.bin")
    torch.save({k: reference[k] for k in keys[100:]}, binary / "pytorch_model-00002-of-00002.bin")
    _same_weights(load_medplib(binary)[0], reference)

    twice = _model_dir(tmp_path, public_fixture, "twice")
    save_file({k: reference[k] for k in keys[:10]}, str(twice / "a.safetensors"))
    save_file(dict(reference), str(twice / "b.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="stored twice"):
        load_medplib(twice)


def test_a_missing_shard_is_named_and_trainer_files_are_not_weights(tmp_path, public_fixture, reference):
    model, config, tokenizer = load_medplib(public_fixture / "model")
    out = save_medplib(model, config, public_fixture / "model", tmp_path / "sharded", max_shard_size="200KB")
    shards = sorted(
        set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())
    )
    (out / shards[1]).unlink()
    with pytest.raises(
        FileNotFoundError,
        match=f"1 of the {len(shards)} weight files that model.safetensors.index.json lists are missing: {shards[1]}",
    ):
        load_medplib(out)
    (out / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match="model.safetensors.index.json is not a shard index"):
        load_medplib(out)

    # a Trainer's output folder: its training_args.bin is a pickle of settings, not weights
    binary = _model_dir(tmp_path, public_fixture, "trainer")
    torch.save(dict(reference), binary / "pytorch_model.bin")
    (binary / "training_args.bin").write_bytes(b"\x80\x04not a state dict")
    _same_weights(load_medplib(binary)[0], reference)


def test_a_long_list_of_missing_keys_is_cut_short(tmp_path, public_fixture, reference):
    out = _model_dir(tmp_path, public_fixture)
    kept = sorted(reference)[:10]
    save_file({k: reference[k] for k in kept}, str(out / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError) as err:
        load_medplib(out)
    import re

    missing = int(re.search(r"(\d+) missing keys: ", str(err.value)).group(1))
    assert missing > 250 and str(err.value).endswith(f", ... and {missing - 20} more")
    assert len(str(err.value)) < 3000


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_keeps_router_fp32(public_fixture, reference, dtype):
    model, _, _ = load_medplib(public_fixture / "model", dtype=dtype)
    for name, param in model.named_parameters():
        want = torch.float32 if name.endswith("gate.wg.weight") else dtype
        assert param.dtype == want, name
    wg = "model.layers.0.mlp.deepspeed_moe.gate.wg.weight"
    assert torch.equal(model.state_dict()[wg], reference[wg])
    with pytest.raises(ValueError, match="not supported"):
        load_medplib(public_fixture / "model", dtype="float64")


def test_save_round_trip_is_bit_identical(tmp_path, public_fixture, reference):
    model, config, tokenizer = load_medplib(public_fixture / "model")
    out = save_medplib(model, config, public_fixture / "model", tmp_path / "saved", max_shard_size="200KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert set(index["weight_map"]) == set(reference)  # release key set incl. rotary_emb.inv_freq
    saved_cfg = json.loads((out / "config.json").read_text())
    assert saved_cfg["model_type"] == "medplib_moe_llama" and saved_cfg["moe"]["moe_layers_idx"] == [0, 1]
    assert saved_cfg["mm_vision_tower"] == "/home/researcher/models/clip_tiny"  # release fields kept
    for name in ("tokenizer.model", "added_tokens.json", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (public_fixture / "model" / name).read_bytes()
    again, config2, tok2 = load_medplib(out)
    _same_weights(again, reference)
    assert config2 == config and len(tok2) == len(tokenizer)

    single = save_medplib(again, config2, tok2, tmp_path / "single")  # tokenizer object, one file
    stored = load_file(str(single / "model.safetensors"))
    assert set(stored) == set(reference) and all(torch.equal(stored[k], reference[k]) for k in reference)


def test_bf16_save_round_trip(tmp_path, public_fixture):
    model, config, _ = load_medplib(public_fixture / "model", dtype="bfloat16")
    out = save_medplib(model, config, None, tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again, _, tokenizer = load_medplib(out, dtype="bfloat16")
    assert tokenizer is None
    a, b = model.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_separate_clip_and_sam_weights(tmp_path, public_fixture, reference):
    clip_prefix, sam_prefix = "model.vision_tower.vision_tower.", "model.visual_model."
    out = _model_dir(tmp_path, public_fixture)
    core = {k: v for k, v in reference.items() if not k.startswith((clip_prefix, sam_prefix))}
    save_file(core, str(out / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="missing keys"):
        load_medplib(out)
    clip = {k[len(clip_prefix) :]: v for k, v in reference.items() if k.startswith(clip_prefix)}
    clip["text_model.embeddings.token_embedding.weight"] = torch.zeros(
        4, 2
    )  # openai CLIPModel: text side ignored
    (tmp_path / "clip").mkdir()
    save_file(clip, str(tmp_path / "clip" / "model.safetensors"))
    sam = {k[len(sam_prefix) :]: v for k, v in reference.items() if k.startswith(sam_prefix)}
    torch.save({"model": sam, "epoch": 3}, tmp_path / "sam-med2d_b.pth")
    model, _, _ = load_medplib(out, clip_path=tmp_path / "clip", sam_path=tmp_path / "sam-med2d_b.pth")
    _same_weights(model, reference)


def test_separate_weights_do_not_override_the_checkpoint(tmp_path, public_fixture, reference):
    decoder = "model.visual_model.mask_decoder.iou_token.weight"
    sam = {
        k[len("model.visual_model.") :]: torch.zeros_like(v)
        for k, v in reference.items()
        if "visual_model" in k
    }
    torch.save({"model": sam}, tmp_path / "sam.pth")
    model, _, _ = load_medplib(public_fixture / "model", sam_path=tmp_path / "sam.pth")
    assert torch.equal(model.state_dict()[decoder], reference[decoder])


def test_missing_weights_are_reported(tmp_path, public_fixture):
    out = _model_dir(tmp_path, public_fixture)
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_medplib(out)


def test_saving_again_into_a_folder_replaces_its_weights(tmp_path, public_fixture, reference):
    """A sharded save then an unsharded one (and back) into one folder: the old files go, the folder loads; a model
    saved back into the folder it was loaded from (its tokenizer files copied onto themselves) too."""
    model, config, _ = load_medplib(public_fixture / "model")
    out = tmp_path / "saved"
    save_medplib(model, config, public_fixture / "model", out, max_shard_size="200KB")
    save_medplib(model, config, public_fixture / "model", out)
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    _same_weights(load_medplib(out)[0], reference)
    save_medplib(model, config, public_fixture / "model", out, max_shard_size="200KB")
    shards = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values()
    assert sorted(p.name for p in out.glob("model*.safetensors")) == sorted(set(shards))
    again, config2, _ = load_medplib(out)
    _same_weights(again, reference)
    save_medplib(again, config2, out, out)  # back into its own folder
    _same_weights(load_medplib(out)[0], reference)
    (out / "notes.safetensors").write_bytes(b"")  # not one of ours: kept
    save_medplib(again, config2, out, out, max_shard_size="200KB")
    assert (out / "notes.safetensors").exists()
    _same_weights(load_medplib(out)[0], reference)  # the index names the shards: the stray file is not read


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b[: len(b) // 2], "the file ends before its last tensor"),
        (lambda b: b"", "not a safetensors file, or a truncated one"),
        (lambda b: b[:4], "not a safetensors file, or a truncated one"),
        (lambda b: (2**40).to_bytes(8, "little") + b[8:], "not a safetensors file, or a truncated one"),
        (lambda b: b[:8] + b"#" + b[9:], "not a safetensors file, or a corrupt one"),
    ],
)
def test_a_damaged_weight_file_is_named(tmp_path, public_fixture, damage, message):
    out = _model_dir(tmp_path, public_fixture)
    (out / "model.safetensors").write_bytes(
        damage((public_fixture / "model" / "model.safetensors").read_bytes())
    )
    with pytest.raises(ValueError, match=f"model.safetensors: {message}"):
        load_medplib(out)
