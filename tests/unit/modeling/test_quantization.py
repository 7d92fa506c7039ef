"""Weight-only quantisation (modeling/quantization.py): which weights, row-block results equal torchao's whole-tensor
ones, int4 row padding and int8 fallback, byte counts, the checks that fail before loading, the int8 decode kernel."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from monai_medplib.checkpoint import build_empty_model
from monai_medplib.config import MedPLIBConfig
from monai_medplib.modeling import quantization as q


@pytest.fixture(scope="module")
def ao():
    return q.load_torchao()


def _weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return (torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02).bfloat16()


def test_the_quantised_keys_are_the_llm_linears_and_lm_head():
    config = MedPLIBConfig.tiny()
    keys = set(build_empty_model(config).state_dict())
    chosen = {k for k in keys if q.is_quantized_key(k)}
    layers, experts = config.num_hidden_layers, config.num_experts
    # hand-counted: 4 attention projections and 3 matrices per expert in every layer, plus lm_head
    assert len(chosen) == layers * (4 + 3 * experts) + 1
    assert "lm_head.weight" in chosen
    assert "model.layers.0.self_attn.q_proj.weight" in chosen
    assert "model.layers.1.mlp.deepspeed_moe.experts.deepspeed_experts.1.down_proj.weight" in chosen
    for kept in (
        "model.layers.0.mlp.deepspeed_moe.gate.wg.weight",  # the router stays fp32
        "model.embed_tokens.weight",
        "model.norm.weight",
        "model.layers.0.input_layernorm.weight",
        "model.mm_projector.0.weight",
        "model.region_fea_adapter.weight",
        "model.text_hidden_fcs.0.0.weight",
    ):
        assert kept in keys and kept not in chosen, kept
    assert not [k for k in chosen if k.startswith(("model.vision_tower.", "model.visual_model."))]


@pytest.mark.parametrize(
    ("value", "expected"), [(None, None), ("none", None), ("", None), ("INT8", "int8"), (" int4 ", "int4")]
)
def test_resolve_quantization(value, expected):
    assert q.resolve_quantization(value) == expected


def test_an_unknown_quantization_lists_the_modes():
    with pytest.raises(ValueError, match=r"'fp8'.*\['int8', 'int4'\]"):
        q.resolve_quantization("fp8")


def test_int8_in_row_blocks_equals_torchao_whole_tensor(ao, monkeypatch):
    monkeypatch.setattr(q, "ROW_BLOCK", 256)  # 1000 rows: three full blocks and a partial one
    weight = _weight(1000, 192)
    tensor, kind, note = q.quantize_weight(weight, "int8")
    whole = ao.Int8Tensor.from_hp(weight, ao.PerRow())
    assert (kind, note) == ("int8", "")
    assert torch.equal(tensor.qdata, whole.qdata) and torch.equal(tensor.scale, whole.scale)
    assert torch.equal(tensor.zero_point, whole.zero_point)
    x = torch.randn(3, 192).bfloat16()
    assert torch.equal(F.linear(x, tensor), F.linear(x, whole))
    assert tensor.dtype == torch.bfloat16 and tuple(tensor.shape) == (1000, 192)


def test_int4_in_row_blocks_pads_rows_and_equals_torchao(ao, monkeypatch):
    monkeypatch.setattr(q, "ROW_BLOCK", 256)
    weight = _weight(1000, 256)  # 1000 % 16 = 8: padded to 1008 rows
    tensor, kind, note = q.quantize_weight(weight, "int4")
    padded = ao.Int4OpaqueTensor.from_hp(torch.cat([weight, weight.new_zeros(8, 256)]), [1, 128])
    assert (kind, note) == ("int4", "") and tuple(tensor.shape) == (1000, 256)
    assert torch.equal(tensor.qdata, padded.qdata) and torch.equal(
        tensor.scale_and_zero, padded.scale_and_zero
    )
    x = torch.randn(5, 256).bfloat16()
    out = F.linear(x, tensor)
    assert out.shape == (5, 1000) and torch.equal(out, F.linear(x, padded)[:, :1000])
    # the error of 4-bit groups of 128 against the exact product: a few percent, not garbage
    exact = x.float() @ weight.float().T
    assert 0.01 < ((out.float() - exact).norm() / exact.norm()).item() < 0.15


def test_int4_takes_the_largest_group_that_divides_and_falls_back_to_int8():
    assert [q.int4_group_size(n) for n in (4096, 11008, 192, 96, 344)] == [128, 128, 64, 32, None]
    tensor, kind, note = q.quantize_weight(_weight(64, 344), "int4")
    assert kind == "int8" and "in_features 344" in note and "int8 instead" in note
    assert tensor.qdata.dtype == torch.int8


@pytest.mark.parametrize(
    ("shape", "mode"),
    [
        ((1000, 256), "int8"),
        ((1000, 256), "int4"),
        ((48, 192), "int4"),
        ((40, 344), "int4"),
        ((1160, 128), "int4"),
    ],
)
def test_planned_bytes_equal_the_quantised_bytes(shape, mode):
    tensor, _, _ = q.quantize_weight(_weight(*shape), mode)
    assert q.planned_bytes(shape, mode) == q.tensor_bytes(tensor)


def test_int8_is_half_and_int4_about_a_quarter_of_bf16():
    weight = _weight(2048, 1024)
    bf16 = q.tensor_bytes(weight)
    int8 = q.tensor_bytes(q.quantize_weight(weight, "int8")[0])
    int4 = q.tensor_bytes(q.quantize_weight(weight, "int4")[0])
    assert int8 == 2048 * 1024 + 2048 * 5  # one byte per value, fp32 scale + int8 zero per row
    assert int8 / bf16 < 0.51 and int4 / bf16 < 0.27


def test_quantize_model_quantises_a_shared_weight_once():
    shared = nn.Linear(128, 256, bias=False).to(torch.bfloat16)
    model = nn.Module()
    model.lm_head = shared
    model.model = nn.Module()
    model.model.layers = nn.ModuleList([nn.Module(), nn.Module()])
    for layer in model.model.layers:
        layer.self_attn = nn.Module()
        layer.self_attn.q_proj = nn.Linear(128, 128, bias=False).to(torch.bfloat16)
    model.model.layers[1].self_attn.q_proj.weight = model.model.layers[0].self_attn.q_proj.weight
    summary = q.quantize_model(model, "int8")
    first, second = (layer.self_attn.q_proj.weight for layer in model.model.layers)
    assert first is second and summary.kinds == {"int8": 2}  # the shared q_proj once, lm_head once
    assert "2 int8 weights" in summary.describe()


def test_missing_torchao_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # what an environment without torchao sees on import
    q.load_torchao.cache_clear()
    try:
        with pytest.raises(q.QuantizationUnavailableError, match=r"torchao 0\.18\.0.*monai-medplib\[quant\]"):
            q.check_quantization("int8", ["cpu"])
    finally:
        q.load_torchao.cache_clear()


def test_a_missing_kernel_is_named(monkeypatch):
    ops = dict(q.REQUIRED_OPS)
    ops[("int4", "cpu")] = ("_weight_int4pack_mm_for_cpu", "_no_such_int4_kernel")
    monkeypatch.setattr(q, "REQUIRED_OPS", ops)
    with pytest.raises(
        q.QuantizationUnavailableError, match=r"int4 on cpu needs .*aten\._no_such_int4_kernel"
    ):
        q.check_quantization("int4", ["cpu"])
    q.check_quantization("int8", ["cpu"])  # int8 needs nothing more
    q.check_quantization(None, ["cpu"])


def test_the_int8_decode_kernel_is_opt_in_and_close_to_torchao():
    linear = nn.Linear(256, 512, bias=False).to(torch.bfloat16)
    nn.init.normal_(linear.weight, std=0.02)
    linear.weight = nn.Parameter(q.quantize_weight(linear.weight.detach(), "int8")[0], requires_grad=False)
    few, many = torch.randn(1, 3, 256).bfloat16(), torch.randn(1, q.INT8_DECODE_MAX_ROWS + 1, 256).bfloat16()
    reference = linear(few), linear(many)
    assert q.use_int8_decode_kernel(linear) == 1
    fast = linear(few)
    assert fast.shape == (1, 3, 512) and fast.dtype == torch.bfloat16
    assert not torch.equal(fast, reference[0])  # another kernel really ran ...
    assert torch.allclose(fast.float(), reference[0].float(), atol=0.02, rtol=0.02)  # ... on the same weights
    assert torch.equal(linear(many), reference[1])  # long inputs keep torchao's path
    transposed = torch.randn(256, 3).bfloat16().t()  # rows not contiguous: the kernel needs a copy
    assert torch.equal(linear(transposed), linear(transposed.contiguous()))
    q.use_int8_decode_kernel(linear, enabled=False)
    assert torch.equal(linear(few), reference[0])
