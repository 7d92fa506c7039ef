"""SAM-Med2D parity against the upstream tiny oracle, ViT-B build checks, and the point / box prompt paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from monai_medplib.config import SamMed2DConfig
from monai_medplib.modeling.sam_med2d import SamMed2D

PREFIX = "model.visual_model."
GROUNDING_CASES = ["c_grounding", "d_grounding_square"]


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def visual_state(public_fixture: Path) -> dict[str, torch.Tensor]:
    full = load_file(public_fixture / "model" / "model.safetensors")
    return {k[len(PREFIX) :]: v for k, v in full.items() if k.startswith(PREFIX)}


@pytest.fixture(scope="module")
def tiny_sam(public_fixture: Path, visual_state: dict[str, torch.Tensor]) -> SamMed2D:
    config_json = json.loads((public_fixture / "model" / "config.json").read_text())
    model = SamMed2D(SamMed2DConfig.from_dict(config_json["oracle_sam_config"])).eval()
    model.load_state_dict(visual_state, strict=True)
    return model


def test_config_from_oracle_keys(public_fixture: Path) -> None:
    raw = json.loads((public_fixture / "model" / "config.json").read_text())["oracle_sam_config"]
    cfg = SamMed2DConfig.from_dict(raw)
    assert (cfg.encoder_embed_dim, cfg.encoder_depth, cfg.encoder_num_heads) == (64, 2, 2)
    assert cfg.encoder_global_attn_indexes == (1,)
    assert cfg.adapter is True and cfg.image_size == 256 and cfg.embedding_grid == 16
    assert SamMed2DConfig.from_dict(cfg.to_dict()) == cfg
    assert SamMed2DConfig.vit_b().encoder_global_attn_indexes == (2, 5, 8, 11)
    with pytest.raises(ValueError, match="unknown SAM config key 'encoder_widht'"):
        SamMed2DConfig.from_dict({"encoder_widht": 3})
    with pytest.raises(ValueError, match="out of range"):
        SamMed2DConfig(encoder_depth=2, encoder_global_attn_indexes=(2,))


def test_state_dict_keys_and_shapes_match_fixture(
    tiny_sam: SamMed2D, visual_state: dict[str, torch.Tensor]
) -> None:
    ours = {k: tuple(v.shape) for k, v in tiny_sam.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in visual_state.items()}
    assert ours == theirs


@pytest.mark.parametrize("case", GROUNDING_CASES)
def test_grounding_path_matches_upstream(tiny_sam: SamMed2D, public_fixture: Path, case: str) -> None:
    expected = load_file(public_fixture / "expected" / f"{case}.safetensors")
    text = expected["seg_embedding_256"].reshape(1, 1, 256)
    with torch.no_grad():
        embeddings = tiny_sam.encode_image(expected["images_sam"])
        sparse, dense = tiny_sam.prompt_encoder(text_embeds=text)
        low_res, iou = tiny_sam.decode(embeddings, text_embeds=text)
        dense_pe = tiny_sam.prompt_encoder.get_dense_pe()

    assert max_abs(embeddings, expected["sam_image_embeddings"]) <= 1e-4
    # Text-only prompt: the sparse tokens are exactly the text embedding (no padding point).
    assert max_abs(sparse, expected["sam_sparse_embeddings"]) <= 1e-4
    assert dense.shape == (1, 256, 16, 16)
    assert torch.equal(dense[0, :, 7, 3], tiny_sam.prompt_encoder.no_mask_embed.weight[0])
    if "sam_dense_pe" in expected:
        assert max_abs(dense_pe, expected["sam_dense_pe"]) <= 1e-4
    assert low_res.shape == (1, 1, 64, 64)
    assert max_abs(low_res, expected["low_res_masks"]) <= 1e-3
    assert max_abs(iou, expected["iou_predictions"]) <= 1e-4


def test_vit_b_build_on_meta_device() -> None:
    with torch.device("meta"):
        model = SamMed2D(SamMed2DConfig.vit_b())

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    adapters = sum(p.numel() for name, p in model.named_parameters() if ".Adapter." in name)
    # Per block: channel 2*768*192 + spatial 768*768*(9+16) + LayerNorm 2*768 = 15,042,048; 12 blocks.
    assert adapters == 12 * (2 * 768 * 192 + 768 * 768 * 25 + 2 * 768)
    # Prompt encoder: 6 one-row 256-d tables + mask_downscaling (20 + 8 + 272 + 32 + 4352).
    assert count(model.prompt_encoder) == 6 * 256 + 4684
    assert 4.0e6 < count(model.prompt_encoder) + count(model.mask_decoder) < 4.2e6  # spec 2.9: ~4.1 M
    assert 270.5e6 < count(model) < 271.5e6  # spec 2.9: ~271 M

    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    enc = "image_encoder.blocks"
    for i in range(12):
        table = 31 if i in (2, 5, 8, 11) else 27
        assert shapes[f"{enc}.{i}.attn.rel_pos_h"] == (table, 64)
        assert shapes[f"{enc}.{i}.attn.rel_pos_w"] == (table, 64)
    assert shapes[f"{enc}.0.attn.qkv.weight"] == (2304, 768)
    assert shapes[f"{enc}.11.mlp.lin1.weight"] == (3072, 768)
    assert shapes[f"{enc}.4.Adapter.channel.0.weight"] == (192, 768)
    assert shapes[f"{enc}.4.Adapter.spatial.2.weight"] == (768, 768, 4, 4)
    assert shapes["image_encoder.pos_embed"] == (1, 16, 16, 768)
    assert shapes["image_encoder.neck.0.weight"] == (256, 768, 1, 1)
    assert shapes["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] == (2, 128)
    assert shapes["mask_decoder.transformer.layers.1.cross_attn_token_to_image.q_proj.weight"] == (128, 256)
    assert shapes["mask_decoder.output_upscaling.0.weight"] == (256, 64, 2, 2)
    assert shapes["mask_decoder.iou_prediction_head.layers.2.weight"] == (4, 256)
    assert not any("pixel_mean" in k or "pixel_std" in k for k in shapes)
    # Spec 2.8: ViT / neck norms use eps 1e-6, the adapter's plain LayerNorm 1e-5. The tiny oracle cannot tell
    # these apart (changing the adapter eps moves its embedding by only ~6e-6), so they are pinned here.
    block = model.image_encoder.blocks[0]
    assert (block.norm1.eps, block.norm2.eps, block.Adapter.norm.eps) == (1e-6, 1e-6, 1e-5)
    assert model.image_encoder.neck[1].eps == 1e-6 and model.image_encoder.neck[3].eps == 1e-6


@pytest.fixture(scope="module")
def grounding_inputs(tiny_sam: SamMed2D, public_fixture: Path) -> tuple[torch.Tensor, torch.Tensor]:
    expected = load_file(public_fixture / "expected" / "c_grounding.safetensors")
    return expected["sam_image_embeddings"], expected["seg_embedding_256"].reshape(1, 1, 256)


def test_points_get_padding_point_without_box(tiny_sam: SamMed2D, grounding_inputs) -> None:
    _, text = grounding_inputs
    pe = tiny_sam.prompt_encoder
    coords = torch.tensor([[[40.0, 200.0], [100.0, 12.0]]])
    labels = torch.tensor([[1, 0]])
    with torch.no_grad():
        sparse, _ = pe(points=(coords, labels), text_embeds=text)
        sparse_box, _ = pe(
            points=(coords, labels), boxes=torch.tensor([[10.0, 20.0, 90.0, 120.0]]), text_embeds=text
        )
    assert sparse.shape == (1, 1 + 2 + 1, 256)  # text, two clicks, one padding point
    assert torch.equal(sparse[0, 0], text[0, 0])
    assert torch.equal(sparse[0, -1], pe.not_a_point_embed.weight[0])  # padding: no positional encoding
    assert sparse_box.shape == (1, 1 + 2 + 2, 256)  # with a box: two corners, no padding point


def test_point_encoding_matches_dense_pe_at_cell_centres(tiny_sam: SamMed2D) -> None:
    # A click at pixel (16j + 7.5, 16i + 7.5) is shifted by +0.5 to 16(j + 0.5) / 256 = (j + 0.5) / 16, i.e. the
    # centre of embedding cell (i, j): its positional part must equal the fixture-verified dense PE there.
    pe = tiny_sam.prompt_encoder
    cells = [(0, 0), (3, 11), (15, 15), (8, 2)]
    coords = torch.tensor([[[16 * j + 7.5, 16 * i + 7.5] for i, j in cells]])
    with torch.no_grad():
        pos = pe.embed_points(coords, torch.ones(1, len(cells), dtype=torch.long), add_padding_point=False)
        neg = pe.embed_points(coords, torch.zeros(1, len(cells), dtype=torch.long), add_padding_point=False)
        dense_pe = pe.get_dense_pe()[0]
    for n, (i, j) in enumerate(cells):
        assert max_abs(pos[0, n] - pe.point_embeddings[1].weight[0], dense_pe[:, i, j]) <= 1e-5
        assert max_abs(neg[0, n] - pe.point_embeddings[0].weight[0], dense_pe[:, i, j]) <= 1e-5


def test_click_refinement_decode(tiny_sam: SamMed2D, grounding_inputs) -> None:
    embeddings, text = grounding_inputs
    click = (torch.tensor([[[180.0, 90.0]]]), torch.tensor([[1]]))
    with torch.no_grad():
        base, _ = tiny_sam.decode(embeddings, text_embeds=text)
        refined, iou = tiny_sam.decode(embeddings, text_embeds=text, points=click)
        # Prompt tokens form a set for the decoder: reordering them (points before text) changes nothing.
        sparse, dense = tiny_sam.prompt_encoder(points=click, text_embeds=text)
        reordered, _ = tiny_sam.mask_decoder(
            embeddings, tiny_sam.prompt_encoder.get_dense_pe(), sparse.flip(1), dense, multimask_output=False
        )
        multi, multi_iou = tiny_sam.decode(embeddings, text_embeds=text, points=click, multimask_output=True)
    assert refined.shape == (1, 1, 64, 64) and iou.shape == (1, 1)
    assert multi.shape == (1, 3, 64, 64) and multi_iou.shape == (1, 3)
    # The click reaches the mask: around the click (64-px frame: x=45, y=22) the logits move. With random
    # weights the direction is not certain, so only the change itself is asserted.
    assert (refined - base)[0, 0, 18:27, 41:50].abs().max() > 1e-2
    assert max_abs(reordered, refined) <= 1e-4


def test_batched_decode_equals_per_sample(tiny_sam: SamMed2D, grounding_inputs) -> None:
    embeddings, text = grounding_inputs
    texts = torch.cat([text, text.flip(-1)], dim=0)
    mask_input = torch.zeros(2, 1, 64, 64)
    mask_input[1, 0, 10:30, 20:40] = 5.0
    with torch.no_grad():
        batched, _ = tiny_sam.decode(embeddings, text_embeds=texts, mask_input=mask_input)
        singles = [
            tiny_sam.decode(embeddings, text_embeds=texts[b : b + 1], mask_input=mask_input[b : b + 1])[0]
            for b in range(2)
        ]
    assert batched.shape == (2, 1, 64, 64)
    assert max_abs(batched, torch.cat(singles)) <= 1e-4
    assert max_abs(batched[0], batched[1]) > 1e-2


def test_bad_prompts_raise(tiny_sam: SamMed2D, grounding_inputs) -> None:
    embeddings, text = grounding_inputs
    with pytest.raises(ValueError, match="at least one prompt"):
        tiny_sam.decode(embeddings)
    with pytest.raises(ValueError, match="labels must be -1, 0 or 1"):
        tiny_sam.decode(embeddings, text_embeds=text, points=(torch.zeros(1, 1, 2), torch.tensor([[2]])))
    with pytest.raises(ValueError, match="mask_input must be"):
        tiny_sam.decode(embeddings, text_embeds=text, mask_input=torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="image encoder expects"):
        tiny_sam.encode_image(torch.zeros(1, 3, 128, 128))
