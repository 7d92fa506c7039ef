"""SAM-Med2D ("visual_model" of MedPLIB): encoder, prompt encoder and mask decoder (sizes: ``SamMed2DConfig``).

The state-dict keys of :class:`SamMed2D` equal the release keys below ``model.visual_model.`` (spec 6.3).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import SamMed2DConfig
from .sam_image_encoder import SamImageEncoder
from .sam_prompt_decoder import SamMaskDecoder, SamPromptEncoder


class SamMed2D(nn.Module):
    """SAM-Med2D with MedPLIB's text prompt: ``image_encoder``, ``prompt_encoder``, ``mask_decoder``.

    Args:
        config: model dimensions; defaults to :meth:`SamMed2DConfig.vit_b`.
    """

    def __init__(self, config: SamMed2DConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or SamMed2DConfig.vit_b()
        grid = config.embedding_grid
        self.image_encoder = SamImageEncoder(
            image_size=config.image_size,
            patch_size=config.patch_size,
            embed_dim=config.encoder_embed_dim,
            depth=config.encoder_depth,
            num_heads=config.encoder_num_heads,
            mlp_ratio=config.mlp_ratio,
            window_size=config.window_size,
            global_attn_indexes=config.encoder_global_attn_indexes,
            adapter=config.adapter,
            out_chans=config.prompt_embed_dim,
        )
        self.prompt_encoder = SamPromptEncoder(
            embed_dim=config.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(config.image_size, config.image_size),
            mask_in_chans=config.mask_in_chans,
        )
        self.mask_decoder = SamMaskDecoder(dim=config.prompt_embed_dim)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` normalised, centre-padded image -> ``[B, 256, S/16, S/16]`` embeddings."""
        return self.image_encoder(images)

    def decode(
        self,
        image_embeddings: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict low-resolution mask logits from image embeddings and prompts.

        MedPLIB grounding passes only ``text_embeds`` ``[B, 1, 256]`` (no padding point; dense = no-mask
        embedding). Click refinement adds ``points`` = (coords ``[B, N, 2]`` as (x, y) in the 256-px input frame,
        labels ``[B, N]`` with 1 positive / 0 negative / -1 padding); a padding point is appended when ``boxes``
        is None. ``boxes`` ``[B, 4]`` (x0, y0, x1, y1) in the same frame; ``mask_input`` ``[B, 1, 64, 64]`` logits.

        Returns:
            ``(low_res_logits [B, 1, 64, 64], iou_pred [B, 1])``; with ``multimask_output`` 3 masks / scores.
        """
        if text_embeds is None and points is None and boxes is None and mask_input is None:
            raise ValueError("decode needs at least one prompt: text_embeds, points, boxes or mask_input")
        if text_embeds is not None and text_embeds.ndim == 2:
            text_embeds = text_embeds.unsqueeze(1)
        sparse, dense = self.prompt_encoder(
            points=points, boxes=boxes, masks=mask_input, text_embeds=text_embeds
        )
        return self.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe().to(image_embeddings.dtype),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )

    def forward(self, images: torch.Tensor, text_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Grounding path in one call: encode ``images`` and decode with ``text_embeds`` only."""
        return self.decode(self.encode_image(images), text_embeds=text_embeds)
