"""Device maps (modeling/placement.py): units, the map's checks (before any weight is read), the "auto" split, and
a map that puts every unit on the CPU computing exactly what the unmapped model computes."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from monai_medplib.checkpoint import build_empty_model
from monai_medplib.config import MedPLIBConfig
from monai_medplib.modeling import placement
from monai_medplib.pipeline import MedPLIBPipeline
from monai_medplib.processing import load_pixels

ALL_CPU = {"vision": "cpu", "sam": "cpu", "seg_head": "cpu", "embed": "cpu", "layers": "cpu", "head": "cpu"}


def test_every_key_of_the_model_belongs_to_one_unit():
    config = MedPLIBConfig.tiny()
    model = build_empty_model(config)
    units = {placement.unit_of_key(k) for k in model.state_dict()}
    assert units == set(placement.unit_names(config.num_hidden_layers))
    assert placement.unit_of_key("model.layers.1.mlp.deepspeed_moe.gate.wg.weight") == "layers.1"
    assert placement.unit_of_key("model.mm_projector.2.bias") == "vision"
    assert placement.unit_of_key("lm_head.weight") == "head"
    with pytest.raises(KeyError, match="model.other.weight"):
        placement.unit_of_key("model.other.weight")


def test_a_map_expands_layer_ranges_and_names_every_unit():
    units = placement.resolve_device_map(
        {
            "vision": "cpu",
            "sam": "cpu",
            "seg_head": "cpu",
            "embed": "cpu",
            "layers.0-2": "cpu",
            "layers.3": "cpu",
            "head": "cpu",
        },
        num_layers=4,
    )
    assert list(units) == [
        "vision",
        "sam",
        "seg_head",
        "embed",
        "layers.0",
        "layers.1",
        "layers.2",
        "layers.3",
        "head",
    ]
    assert set(units.values()) == {torch.device("cpu")}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"layers": "cuda:3"}, r"device_map\['layers'\].*cuda:3"),
        ({"sam": "npu:0"}, r"device_map\['sam'\].*npu:0"),
        ({"layers": 3}, r"device_map\['layers'\].*cuda:3"),  # an int means a GPU index, as in accelerate
        ({"decoder": "cpu"}, r"unknown unit 'decoder'"),
        ({"layers.2-4": "cpu"}, r"'layers.2-4' is outside layers 0-3"),
    ],
)
def test_bad_maps_are_refused_naming_the_problem(change, message):
    with pytest.raises(ValueError, match=message):
        placement.resolve_device_map({**ALL_CPU, **change}, num_layers=4)


def test_units_placed_twice_or_not_at_all_are_refused():
    with pytest.raises(ValueError, match="'layers.1' is placed twice"):
        placement.resolve_device_map({**ALL_CPU, "layers.1": "cpu"}, num_layers=4)
    partial = {k: v for k, v in ALL_CPU.items() if k not in ("layers", "sam")}
    with pytest.raises(ValueError, match=r"no device for sam, layers\.0-1, layers\.3"):
        placement.resolve_device_map({**partial, "layers.2": "cpu"}, num_layers=4)


def test_auto_fills_gpus_in_data_flow_order_then_the_cpu():
    sizes = {
        "vision": 3,
        "sam": 1,
        "seg_head": 1,
        "embed": 2,
        "layers.0": 4,
        "layers.1": 4,
        "layers.2": 4,
        "head": 2,
    }
    budgets = {"cuda:0": 12, "cuda:1": 6}
    units = placement.auto_device_map(sizes, budgets)
    # cuda:0 takes vision..layers.0 (11 of 12); layers.1 does not fit in the 1 left, so cuda:1 takes it and
    # never goes back; layers.2 does not fit in cuda:1's 2 left: the CPU takes it and the head
    assert {u: str(d) for u, d in units.items()} == {
        "vision": "cuda:0",
        "sam": "cuda:0",
        "seg_head": "cuda:0",
        "embed": "cuda:0",
        "layers.0": "cuda:0",
        "layers.1": "cuda:1",
        "layers.2": "cpu",
        "head": "cpu",
    }
    assert set(placement.auto_device_map(sizes).values()) == {torch.device("cpu")}  # no GPU here


@pytest.fixture(scope="module")
def tiny_model(public_fixture):
    return public_fixture / "model"


def test_a_map_naming_a_missing_gpu_fails_before_any_weight_is_read(tmp_path, tiny_model):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "model.safetensors").write_bytes(b"not a safetensors file")  # reading it would fail differently
    with pytest.raises(
        ValueError, match=r"device_map\['head'\]: device 'cuda:3'.*(no CUDA device|does not exist)"
    ):
        MedPLIBPipeline.from_pretrained(model, device_map={**ALL_CPU, "head": "cuda:3"})
    with pytest.raises(ValueError, match=r"device \(.cpu.\) or device_map, not both"):
        MedPLIBPipeline.from_pretrained(model, device="cpu", device_map=ALL_CPU)
    with pytest.raises(ValueError, match="device_map must be None, 'auto' or a dict"):
        MedPLIBPipeline.from_pretrained(model, device_map="balanced")
    with pytest.raises(ValueError, match=r"device_map\['head'\]: None is not a device"):  # not "auto"
        MedPLIBPipeline.from_pretrained(model, device_map={**ALL_CPU, "head": None})


def test_an_all_cpu_map_computes_exactly_what_the_unmapped_model_computes(tiny_model, public_fixture):
    plain = MedPLIBPipeline.from_pretrained(tiny_model, device="cpu")
    mapped = MedPLIBPipeline.from_pretrained(tiny_model, device_map=ALL_CPU)
    hooked = [m for m in mapped.model.modules() if m._forward_pre_hooks]
    # vision 3 (tower, projector, adapter), SAM 3 (encoder, prompt encoder, decoder), seg head 1, embed 2, layers, head 2
    assert len(hooked) == 3 + 3 + 1 + 2 + plain.model.config.num_hidden_layers + 2
    assert not [m for m in plain.model.modules() if m._forward_pre_hooks]
    image = load_pixels(public_fixture / "inputs" / "image.png")
    question = "Is there a lesion in the liver?"
    a, b = (p.answer(image, question, max_new_tokens=8) for p in (plain, mapped))
    assert a == b
    feats = [p.encode_images([image]) for p in (plain, mapped)]
    outs = [
        p.prefill(f, [p.prompt_ids(question)], output_router_logits=True)
        for p, f in zip((plain, mapped), feats)
    ]
    assert torch.equal(outs[0].logits, outs[1].logits) and torch.equal(
        outs[0].hidden_states, outs[1].hidden_states
    )
    assert all(torch.equal(x, y) for x, y in zip(outs[0].router_logits, outs[1].router_logits))
    g = [p.ground(image, "Please segment the left kidney.", force_seg=True) for p in (plain, mapped)]
    assert g[0].has_seg and g[1].has_seg
    assert np.array_equal(g[0].logits, g[1].logits) and np.array_equal(g[0].mask, g[1].mask)
    assert torch.equal(g[0].seg_embedding, g[1].seg_embedding)


def test_auto_on_a_machine_without_gpu_puts_everything_on_the_cpu(tiny_model):
    pipe = MedPLIBPipeline.from_pretrained(tiny_model, device_map="auto")
    assert set(pipe.model.placement.values()) == {torch.device("cpu")}
    assert pipe.device == torch.device("cpu")
