"""The streaming loader with quantisation: keys and shapes are checked from the headers before any tensor is read;
what is quantised and what is kept as released; checks that fail before loading."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from monai_medplib import checkpoint
from monai_medplib.checkpoint import CheckpointMismatchError, load_medplib
from monai_medplib.modeling import quantization as q


@pytest.fixture(scope="module")
def reference(public_fixture):
    return load_file(str(public_fixture / "model" / "model.safetensors"))


def _copy_model(tmp_path, public_fixture):
    out = tmp_path / "model"
    shutil.copytree(public_fixture / "model", out)
    return out


def test_a_mismatch_is_reported_from_the_headers_before_any_tensor_is_read(
    tmp_path, public_fixture, reference, monkeypatch
):
    out = _copy_model(tmp_path, public_fixture)
    state = dict(reference)
    state["model.norm.weight"] = torch.zeros(65)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    reads = []
    monkeypatch.setattr(checkpoint, "_read_exactly", lambda *args: reads.append(args))
    with pytest.raises(
        CheckpointMismatchError, match=r"model\.norm\.weight: checkpoint \(65,\) vs model \(64,\)"
    ):
        load_medplib(out, quantization="int8")
    assert not reads


def test_int8_quantises_the_llm_linears_and_keeps_the_rest_as_released(public_fixture, reference):
    model, _, _ = load_medplib(public_fixture / "model", quantization="int8", load_tokenizer=False)
    ao = q.load_torchao()
    assert model.quantization.mode == "int8" and model.quantization.kinds == {"int8": 21}
    assert not model.quantization.fallbacks
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        key = f"{name}.weight"
        stored = reference[key]
        if q.is_quantized_key(key):
            assert isinstance(module.weight, ao.Int8Tensor), key
            # within one int8 step of the row's scale of the bf16 weight
            restored = module.weight.dequantize(torch.float32)
            step = stored.abs().amax(dim=1, keepdim=True) / 127
            assert ((restored - stored.bfloat16().float()).abs() <= step * 0.51 + 1e-6).all(), key
        elif key.endswith("gate.wg.weight"):
            assert module.weight.dtype == torch.float32 and torch.equal(module.weight, stored), key
        elif name.startswith("model.layers."):
            raise AssertionError(f"{key} is an LLM linear left unquantised")
        else:  # CLIP, projector, region adapter, seg head, SAM: the user's dtype (fp32), unchanged
            assert type(module.weight) is nn.Parameter and torch.equal(module.weight, stored), key
    # the LLM computes in bf16, the vision side in the user's dtype
    assert model.dtype == torch.bfloat16 and model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(model.model.embed_tokens.weight, reference["model.embed_tokens.weight"].bfloat16())
    assert model.model.visual_model.mask_decoder.iou_token.weight.dtype == torch.float32
    assert not any(p.is_meta for p in model.parameters())


def test_int4_reports_the_weights_it_left_in_int8(public_fixture):
    model, config, _ = load_medplib(public_fixture / "model", quantization="int4", load_tokenizer=False)
    summary = model.quantization
    # tiny: hidden 64 (groups of 64 fit), intermediate 176 (no group size divides it: down_proj stays int8)
    layers, experts = config.num_hidden_layers, config.num_experts
    assert summary.kinds == {"int4": layers * (4 + 2 * experts), "int8": layers * experts + 1}
    assert sorted(summary.fallbacks) == sorted(
        f"model.layers.{i}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}.down_proj.weight"
        for i in range(layers)
        for e in range(experts)
    )
    assert "in_features 176" in summary.describe()
    assert "lm_head.weight" not in summary.fallbacks  # int8 by rule (LM_HEAD_MODE), not a fallback


def test_quantization_checks_run_before_loading(tmp_path, public_fixture, monkeypatch):
    out = _copy_model(tmp_path, public_fixture)
    (out / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="quantization 'int3' is not supported"):
        load_medplib(out, quantization="int3")
    ops = dict(q.REQUIRED_OPS)
    ops[("int4", "cpu")] = ("_missing_int4_kernel",)
    monkeypatch.setattr(q, "REQUIRED_OPS", ops)
    with pytest.raises(q.QuantizationUnavailableError, match=r"aten\._missing_int4_kernel"):
        load_medplib(out, quantization="int4")


def test_the_config_is_read_before_the_weights(tmp_path, public_fixture):
    out = _copy_model(tmp_path, public_fixture)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2  # layers.2 is outside the model
    with pytest.raises(ValueError, match="outside layers 0-1"):
        load_medplib(out, device_map={"layers.2": "cpu"})


def test_saving_a_model_quantised_while_loading_is_refused_before_anything_is_written(
    tmp_path, public_fixture
):
    model, config, _ = load_medplib(public_fixture / "model", quantization="int8", load_tokenizer=False)
    with pytest.raises(
        ValueError, match="cannot save a model quantised while loading \\(quantization='int8'\\)"
    ):
        checkpoint.save_medplib(model, config, str(public_fixture / "model"), tmp_path / "q")
    assert not (tmp_path / "q").exists()
