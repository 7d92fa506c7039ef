"""MedPLIB: LLaMA with top-1 MoE MLPs, CLIP tower, region pooling, [SEG] head and SAM-Med2D (spec 2, 5).

``MedPLIBForCausalLM().state_dict()`` keys equal the release checkpoint keys (spec 6.3), except the
``rotary_emb.inv_freq`` buffers that transformers 4.31 saved (checkpoint.py writes them back on save).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel
from transformers.cache_utils import Cache, DynamicCache

from ..config import MedPLIBConfig
from ..special_tokens import IMAGE_TOKEN_INDEX, REGION_TOKEN_INDEX
from .generation import GenerationOutput, Generators, generate
from .moe import TopOneMoE
from .sam_med2d import SamMed2D
from .vision import CLIPVisionTower, build_projector, build_text_hidden_fcs, pool_region_features


def llama_config(config: MedPLIBConfig, attn_implementation: str = "sdpa") -> LlamaConfig:
    """The plain ``LlamaConfig`` of the language model part."""
    llama = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        hidden_act="silu",
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    )
    llama._attn_implementation = attn_implementation
    return llama


@dataclass
class LLMOutput:
    """Result of :meth:`MedPLIBForCausalLM.llm_forward`.

    Attributes:
        logits: fp32 ``[B, L, V]`` (or ``[B, 1, V]`` with ``last_logits_only``).
        hidden_states: final-RMSNorm last-layer states ``[B, L, H]`` (what the [SEG] head reads).
        past_key_values: the KV cache to continue decoding from.
        router_logits: per MoE layer fp32 ``[B, L, E]`` when requested, else None.
    """

    logits: torch.Tensor
    hidden_states: torch.Tensor
    past_key_values: Cache | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


class MedPLIBModel(LlamaModel):
    """``model.*`` of the release: LLaMA decoder (MoE MLPs) + vision tower, projectors, [SEG] head, SAM-Med2D."""

    def __init__(self, config: MedPLIBConfig, attn_implementation: str = "sdpa"):
        super().__init__(llama_config(config, attn_implementation))
        for idx in config.moe_layers_idx if config.moe_enable else []:
            self.layers[idx].mlp = TopOneMoE(
                config.hidden_size,
                config.intermediate_size,
                config.num_experts,
                capacity_factor=config.capacity_factor,
                eval_capacity_factor=config.eval_capacity_factor,
                min_capacity=config.min_capacity,
            )
        self.vision_tower = CLIPVisionTower(config.clip, config.mm_vision_select_layer, attn_implementation)
        self.mm_projector = build_projector(config.mm_hidden_size, config.hidden_size)
        self.region_fea_adapter = nn.Linear(config.mm_hidden_size, config.hidden_size)
        self.text_hidden_fcs = build_text_hidden_fcs(config.hidden_size, config.out_dim)
        self.visual_model = SamMed2D(config.sam)

    def moe_layers(self) -> list[TopOneMoE]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, TopOneMoE)]


class MedPLIBForCausalLM(nn.Module):
    """The released ``MedPLIBForCausalLM`` without DeepSpeed: ``.model`` (:class:`MedPLIBModel`) and ``.lm_head``.

    Inference primitives are batch-first. Typical VQA flow::

        feats = model.clip_features(images_clip)
        embeds, mask = model.build_inputs_embeds(ids, feats, region_grids, padding_side="left")
        out = model.greedy_generate(embeds, mask, max_new_tokens=64, eos_id=2)

    Args:
        config: the architecture.
        attn_implementation: ``"sdpa"`` (default) or ``"eager"`` for the LLaMA and CLIP attention.
    """

    def __init__(self, config: MedPLIBConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.config = config
        self.model = MedPLIBModel(config, attn_implementation)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # set by the loader: what was quantised (modeling.quantization.QuantizationSummary) and the device of
        # each unit (modeling.placement), None when the model was not loaded that way
        self.quantization = None
        self.placement = None

    @property
    def device(self) -> torch.device:
        """Where token ids go (the embeddings' device; the one device of an unmapped model)."""
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The LLM's dtype (a quantised LLM's compute dtype); CLIP and SAM may differ (``placement.unit_placement``)."""
        return self.lm_head.weight.dtype

    # ------------------------------------------------------------------ vision side
    def clip_features(self, images_clip: torch.Tensor) -> torch.Tensor:
        """``images_clip [B,3,336,336]`` -> raw CLIP patch features ``[B,576,mm_hidden]``."""
        if images_clip.dim() != 4 or images_clip.shape[1] != 3:
            raise ValueError(f"images_clip must be [B,3,H,W], got shape {tuple(images_clip.shape)}")
        return self.model.vision_tower(images_clip)

    def region_features(
        self,
        clip_feats: torch.Tensor,
        grids: Sequence[torch.Tensor],
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One image's ``clip_feats [576,C]`` and its region grids (24x24) -> region tokens ``[R,H]``."""
        feature_map = self.model.region_fea_adapter(clip_feats)
        pooled = pool_region_features(
            feature_map, list(grids), self.config.max_sample_point, generator, coord_dtype=clip_feats.dtype
        )
        return pooled.to(self.model.mm_projector[0].weight.dtype)

    def seg_embeddings(self, hidden: torch.Tensor) -> torch.Tensor:
        """[SEG] hidden states ``[N,H]`` -> SAM text prompts ``[N,out_dim]`` (``text_hidden_fcs``)."""
        return self.model.text_hidden_fcs[0](hidden)

    # ------------------------------------------------------------------ embeddings
    def build_inputs_embeds(
        self,
        input_ids: Sequence[Sequence[int]] | torch.Tensor,
        clip_feats: torch.Tensor | None,
        region_grids: Sequence[Sequence[torch.Tensor]] | None = None,
        padding_side: str = "right",
        generator: Generators = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Splice image rows and region tokens into the text embeddings (release ``prepare_inputs_labels_for_multimodal``).

        Per sample ``b``: ``-200`` becomes the ``576`` projected rows of ``clip_feats[b]``; the k-th ``-300`` becomes
        the k-th pooled region feature of ``region_grids[b]``, or is dropped when that sample has no grid
        (release eval behaviour). Sequences of different length are zero-padded on ``padding_side``.

        Returns:
            ``(inputs_embeds [B,L,H], attention_mask [B,L] long)``.
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        rows = [
            self._embed_one(
                b,
                ids,
                clip_feats,
                region_grids,
                generator[b] if isinstance(generator, Sequence) else generator,
            )
            for b, ids in enumerate(input_ids)
        ]
        if not rows:
            raise ValueError("input_ids is empty")
        length = max(r.shape[0] for r in rows)
        embeds = rows[0].new_zeros(len(rows), length, rows[0].shape[1])
        mask = torch.zeros(len(rows), length, dtype=torch.long, device=embeds.device)
        for b, r in enumerate(rows):
            span = slice(0, r.shape[0]) if padding_side == "right" else slice(length - r.shape[0], length)
            embeds[b, span] = r
            mask[b, span] = 1
        return embeds, mask

    def _embed_one(self, b, ids, clip_feats, region_grids, generator) -> torch.Tensor:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        embed = self.model.embed_tokens
        if ids.count(IMAGE_TOKEN_INDEX) > 1:
            raise ValueError(
                f"sample {b}: one <image> per sample is supported, found {ids.count(IMAGE_TOKEN_INDEX)}"
            )
        grids = list(region_grids[b]) if region_grids is not None and b < len(region_grids) else []
        n_regions = ids.count(REGION_TOKEN_INDEX)
        if grids and n_regions > len(grids):
            raise ValueError(
                f"sample {b}: {n_regions} region placeholders (-300) but only {len(grids)} region grids"
            )
        image_rows = regions = None
        if IMAGE_TOKEN_INDEX in ids:
            if clip_feats is None or b >= clip_feats.shape[0]:
                raise ValueError(f"sample {b} has an <image> placeholder (-200) but no CLIP features")
            image_rows = self.model.mm_projector(clip_feats[b])
        if grids and n_regions:
            regions = self.region_features(clip_feats[b], grids, generator)
        pieces, text, k = [], [], 0
        for tok in ids:
            if tok >= 0:
                text.append(tok)
                continue
            if tok not in (IMAGE_TOKEN_INDEX, REGION_TOKEN_INDEX):
                raise ValueError(f"sample {b}: unknown negative token id {tok}")
            if tok == REGION_TOKEN_INDEX and regions is None:
                continue  # release: without region masks the -300 is dropped, nothing inserted
            if text:
                pieces.append(embed(torch.tensor(text, device=self.device)))
                text = []
            if tok == IMAGE_TOKEN_INDEX:
                pieces.append(image_rows.to(embed.weight.device, embed.weight.dtype))
            else:
                pieces.append(regions[k : k + 1].to(embed.weight.device, embed.weight.dtype))
                k += 1
        if text:
            pieces.append(embed(torch.tensor(text, device=self.device)))
        return torch.cat(pieces)

    # ------------------------------------------------------------------ language model
    def llm_forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        output_router_logits: bool = False,
        position_ids: torch.Tensor | None = None,
        use_cache: bool = False,
        last_logits_only: bool = False,
    ) -> LLMOutput:
        """Decoder + final norm + ``lm_head`` on ``inputs_embeds [B,L,H]``.

        Position ids default to ``cumsum(attention_mask) - 1`` (0..L-1 without padding; continues after a cache).
        """
        if attention_mask is None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            attention_mask = torch.ones(
                inputs_embeds.shape[0],
                past + inputs_embeds.shape[1],
                dtype=torch.long,
                device=inputs_embeds.device,
            )
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -inputs_embeds.shape[1] :]
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.model.config)
        out = self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
        # on the input's device: with a device map the last layers and the head may live elsewhere
        hidden = out.last_hidden_state
        logits = self.lm_head(hidden[:, -1:] if last_logits_only else hidden).float().to(inputs_embeds.device)
        hidden = hidden.to(inputs_embeds.device)
        routers = None
        if output_router_logits:
            routers = tuple(moe.last_router_logits for moe in self.model.moe_layers())
        return LLMOutput(logits, hidden, out.past_key_values if use_cache else None, routers)

    def forward(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``[B,L,V]`` (fp32) of a full sequence (the training / teacher-forcing path)."""
        return self.llm_forward(inputs_embeds, attention_mask).logits

    @torch.no_grad()
    def greedy_generate(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 1024,
        eos_id: int | None = None,
        temperature: float = 0.0,
        generator: Generators = None,
        return_step_logits: bool = False,
    ) -> GenerationOutput:
        """KV-cache decoding (greedy, or sampling when ``temperature >= 1e-4`` as the demo worker does).

        Batches must be left-padded. The output keeps the final-norm hidden state of every processed position, so
        ``output.seg_hidden_states(seg_id)`` gives the [SEG] state of spec 5.4 (position ``L-1+j``).
        """
        eos = self.config.eos_token_id if eos_id is None else eos_id
        return generate(
            self,
            inputs_embeds,
            attention_mask,
            max_new_tokens,
            eos,
            temperature,
            generator,
            return_step_logits,
        )
