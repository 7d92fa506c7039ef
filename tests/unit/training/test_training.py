"""Training pieces: demo split, schedule, LoRA targets / merge, MoE assembly, the [SEG] loss position, tokenizer."""

from __future__ import annotations

import json
import math

import pytest
import torch

from monai_medplib.data.demo_dataset import slab_split
from monai_medplib.modeling.medplib import MedPLIBForCausalLM
from monai_medplib.tokenization import IGNORE_INDEX, build_training_example
from monai_medplib.training.forward import compute_losses, expand_targets
from monai_medplib.training.loop import warmup_decay
from monai_medplib.training.lora import add_lora, lora_target_regex, merge_lora, set_trainable
from monai_medplib.training.losses import LossWeights, sigmoid_bce_loss
from monai_medplib.training.moe_assembly import assemble_moe
from monai_medplib.training.stages import STAGE2, STAGE4, get_stage
from tests.support.training_helpers import build_tiny_data, tiny_config


def test_slab_split_holds_out_a_central_block_with_gaps():
    split = slab_split(128, test_fraction=0.2, gap=3)
    assert split.test == tuple(range(51, 77))  # 26 slices = round(0.2 * 128), centred
    assert split.gap == (48, 49, 50, 77, 78, 79)
    assert len(split.train) == 128 - 26 - 6
    nearest = min(abs(t - s) for t in split.train for s in split.test)
    assert nearest == 4  # 3 unused slices between a training slice and the held-out block


def test_warmup_decay_schedule():
    assert warmup_decay(0.0, 0.1) == pytest.approx(1e-3)
    assert warmup_decay(0.05, 0.1) == pytest.approx(0.5)
    assert warmup_decay(0.1, 0.1) == pytest.approx(1.0)
    assert warmup_decay(0.55, 0.1) == pytest.approx(0.5)
    assert warmup_decay(1.0, 0.1) == 0.0


def test_lora_regex_hits_dense_and_every_expert_but_nothing_else():
    import re

    rx = re.compile(lora_target_regex(["q_proj", "gate_proj"]))
    assert rx.fullmatch("model.layers.3.self_attn.q_proj")
    assert rx.fullmatch("model.layers.0.mlp.gate_proj")
    assert rx.fullmatch("model.layers.1.mlp.deepspeed_moe.experts.deepspeed_experts.1.gate_proj")
    assert not rx.fullmatch("model.layers.1.mlp.up_proj")
    assert not rx.fullmatch("model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj")


def test_expand_targets_matches_the_embedding_layout():
    ids = [1, 5, -200, 6, 7, -300, 8]
    labels = [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 8]
    e_ids, e_labels = expand_targets(ids, labels, num_image_rows=3, with_regions=True)
    assert e_ids == [1, 5, -200, -200, -200, 6, 7, -300, 8]
    assert e_labels[-1] == 8 and e_labels.count(IGNORE_INDEX) == 8
    e_ids, _ = expand_targets(ids, labels, num_image_rows=3, with_regions=False)
    assert e_ids == [1, 5, -200, -200, -200, 6, 7, 8]  # release: -300 dropped without region masks


def test_lora_merge_restores_release_keys_and_function():
    torch.manual_seed(0)
    model = MedPLIBForCausalLM(tiny_config(300, moe=True)).eval()
    keys = set(model.state_dict())
    wrapped = add_lora(model, STAGE4.lora_targets, r=4, alpha=8)
    trainable = set_trainable(model, STAGE4.full_ft)
    assert any("experts.0.gate_proj.lora_A" in n for n in trainable)
    assert any("experts.1.down_proj.lora_B" in n for n in trainable)
    assert any(n.endswith("deepspeed_moe.gate.wg.weight") for n in trainable)
    assert not any("vision_tower" in n or n.startswith("model.layers.0.self_attn.k_proj") for n in trainable)
    model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
        x = torch.randn(2, 7, 32)
        before = model.llm_forward(x).logits
        merged = merge_lora(wrapped)
        after = merged.llm_forward(x).logits
    assert set(merged.state_dict()) == keys
    assert torch.allclose(before, after, atol=1e-5)
    assert not torch.equal(
        before, MedPLIBForCausalLM(tiny_config(300, moe=True)).eval().llm_forward(x).logits
    )


def test_assemble_moe_takes_each_part_from_its_stage():
    torch.manual_seed(0)
    vl = MedPLIBForCausalLM(tiny_config(300))
    gr = MedPLIBForCausalLM(tiny_config(300))
    moe = assemble_moe(vl, gr, seed=1)
    layer = moe.model.layers[1].mlp.deepspeed_moe
    assert torch.equal(
        layer.experts.deepspeed_experts[0].up_proj.weight, gr.model.layers[1].mlp.up_proj.weight
    )
    assert torch.equal(
        layer.experts.deepspeed_experts[1].up_proj.weight, vl.model.layers[1].mlp.up_proj.weight
    )
    assert torch.equal(moe.model.text_hidden_fcs[0][0].weight, gr.model.text_hidden_fcs[0][0].weight)
    mask_key = "iou_token.weight"
    assert torch.equal(
        moe.model.visual_model.mask_decoder.state_dict()[mask_key],
        gr.model.visual_model.mask_decoder.state_dict()[mask_key],
    )
    assert torch.equal(moe.model.region_fea_adapter.weight, vl.model.region_fea_adapter.weight)
    assert torch.equal(
        moe.model.layers[0].self_attn.q_proj.weight, vl.model.layers[0].self_attn.q_proj.weight
    )
    assert torch.equal(moe.lm_head.weight, vl.lm_head.weight)
    wg = layer.gate.wg.weight
    assert wg.shape == (2, 32) and wg.dtype == torch.float32
    assert float(wg.detach().abs().max()) <= 1 / math.sqrt(32)
    with pytest.raises(ValueError, match="dense"):
        assemble_moe(moe, gr)


def test_stage_lookup():
    assert get_stage("2") is STAGE2
    with pytest.raises(ValueError, match="unknown stage"):
        get_stage("5")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return build_tiny_data(tmp_path_factory.mktemp("tiny"))


def test_demo_tokenizer_and_dataset_layout(tiny_data):
    data, tok_dir, tok = tiny_data
    assert {p.name for p in tok_dir.iterdir()} >= {
        "tokenizer.model",
        "added_tokens.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    added = json.loads((tok_dir / "added_tokens.json").read_text())
    assert len(added) == 267 and min(added.values()) == len(tok) - 267
    assert tok.seg_id == added["<SEG>"]
    grounding = json.loads((data / "train" / "MeCoVQA-Grounding.json").read_text())
    assert grounding and all(
        e["conversations"][1]["value"].startswith("<SEG><mask>masks_merged/") for e in grounding
    )
    ids, labels = build_training_example(grounding[0]["conversations"], tok)
    assert [t for t in labels if t != IGNORE_INDEX] == [tok.seg_id, tok.eos_id]  # target "<SEG></s>"
    split = json.loads((data / "split.json").read_text())
    assert split["split"]["ct"]["axial"]["test"] == [4, 5]  # 10 slices: 2 held out, 1 gap slice each side


def _grounding_batch(tiny_data):
    """A seeded tiny model, a batch of the first two grounding conversations, and the tokenizer."""
    from monai_medplib.data.mecovqa import MeCoVQADataset, collate_mecovqa, read_mecovqa

    data, _, tok = tiny_data
    torch.manual_seed(0)
    model = MedPLIBForCausalLM(tiny_config(len(tok))).eval()
    records = read_mecovqa(data / "train" / "MeCoVQA-Grounding.json", data)[:2]
    return model, collate_mecovqa([MeCoVQADataset(records, tok)[i] for i in range(2)]), tok


def test_seg_loss_uses_the_state_before_seg(tiny_data):
    from monai_medplib.processing import postprocess_mask_logits

    model, batch, tok = _grounding_batch(tiny_data)
    weights = LossWeights(ce=0.0, dice=0.0, bce=1.0)
    with torch.no_grad():
        losses = compute_losses(model, batch, tok.seg_id, weights)
        # independent expectation: position of <SEG> in the ids, shifted by the 575 extra image rows, minus one
        feats = model.clip_features(batch["images_clip"])
        embeds, attn = model.build_inputs_embeds(batch["input_ids"], feats, None)
        hidden = model.llm_forward(embeds, attn).hidden_states
        expected = []
        for b, ids in enumerate(batch["input_ids"]):
            pos = ids.index(tok.seg_id) + 575 - 1
            prompt = model.seg_embeddings(hidden[b, pos][None])
            emb = model.model.visual_model.encode_image(batch["images_sam"][b : b + 1])
            low, _ = model.model.visual_model.decode(emb, text_embeds=prompt[:, None])
            pred = postprocess_mask_logits(low, batch["resizes"][b], batch["original_sizes"][b])[:, 0]
            expected.append(sigmoid_bce_loss(pred, batch["masks"][b]))
    assert float(losses["num_masks"]) == 2
    assert float(losses["loss"]) == pytest.approx(float(sum(expected) / 2), rel=1e-5)


def test_null_prompt_trains_the_all_zero_prompt_towards_an_empty_mask(tiny_data):
    from monai_medplib.processing import postprocess_mask_logits
    from monai_medplib.training.absent_masks import AbsentMasks

    model, batch, tok = _grounding_batch(tiny_data)
    weights = LossWeights(ce=0.0, dice=0.0, bce=1.0)
    no_absent_token = -7  # no label equals it: only the null-prompt decodes enter "absent"
    with torch.no_grad():
        plain = compute_losses(model, batch, tok.seg_id, weights, absent=AbsentMasks(no_absent_token))
        null = compute_losses(
            model,
            batch,
            tok.seg_id,
            weights,
            absent=AbsentMasks(no_absent_token, weight=2.0, null_prompt=True),
        )
        expected = []
        for b in range(2):  # independent expectation: decode a zero prompt, BCE against an empty mask
            emb = model.model.visual_model.encode_image(batch["images_sam"][b : b + 1])
            low, _ = model.model.visual_model.decode(emb, text_embeds=torch.zeros(1, 1, 256))
            pred = postprocess_mask_logits(low, batch["resizes"][b], batch["original_sizes"][b])[:, 0]
            expected.append(sigmoid_bce_loss(pred, torch.zeros_like(pred)))
    assert float(plain["absent"]) == 0.0
    assert float(null["absent"]) == pytest.approx(float(sum(expected) / 2), rel=1e-5)
    assert float(null["loss"]) == pytest.approx(float(plain["loss"]) + 2.0 * float(null["absent"]), rel=1e-5)


def test_absent_answers_are_decoded_towards_an_empty_mask(tiny_data, tmp_path):
    from monai_medplib.data.demo_prompts import absent_answer
    from monai_medplib.data.mecovqa import MeCoVQADataset, collate_mecovqa, read_mecovqa
    from monai_medplib.processing import postprocess_mask_logits
    from monai_medplib.training.absent_masks import absent_state_positions, for_tokenizer

    data, _, tok = tiny_data
    entries = json.loads((data / "train" / "MeCoVQA-Grounding.json").read_text())[:2]
    for entry in entries:  # the synthetic slices all show both targets: make the answers "absent" ones
        entry["conversations"][1]["value"] = absent_answer("liver")
    entries[0]["conversations"] += [  # two absent answers on one image: each counts once in the mean
        {"from": "human", "value": "Please segment the tumour."},
        {"from": "gpt", "value": absent_answer("tumour")},
    ]
    (tmp_path / "absent.json").write_text(json.dumps(entries))
    records = read_mecovqa(tmp_path / "absent.json", data)
    torch.manual_seed(0)
    model = MedPLIBForCausalLM(tiny_config(len(tok))).eval()
    batch = collate_mecovqa([MeCoVQADataset(records, tok)[i] for i in range(len(records))])
    absent = for_tokenizer(tok)
    weights = LossWeights(ce=0.0, dice=0.0, bce=1.0)
    with torch.no_grad():
        losses = compute_losses(model, batch, tok.seg_id, weights, absent=absent)
        # independent expectation: the state before each absent answer's first token, decoded, BCE vs empty
        feats = model.clip_features(batch["images_clip"])
        embeds, attn = model.build_inputs_embeds(batch["input_ids"], feats, None)
        hidden = model.llm_forward(embeds, attn).hidden_states[:, :-1]
        expected, count = 0.0, 0
        for b, labels in enumerate(batch["labels"]):
            full_labels = torch.tensor([IGNORE_INDEX] * 575 + list(labels))[None]  # the 575 extra image rows
            where = absent_state_positions(full_labels, absent.first_token_id)[0]
            states = hidden[b, : where.shape[0]][where]
            emb = model.model.visual_model.encode_image(batch["images_sam"][b : b + 1])
            for state in states:
                low, _ = model.model.visual_model.decode(
                    emb, text_embeds=model.seg_embeddings(state[None])[:, None]
                )
                pred = postprocess_mask_logits(low, batch["resizes"][b], batch["original_sizes"][b])[:, 0]
                expected += float(sigmoid_bce_loss(pred, torch.zeros_like(pred)))
                count += 1
    assert count == 3
    assert float(losses["absent"]) == pytest.approx(expected / count, rel=1e-4)
