"""SAM prompt encoder (text / points / boxes / mask) and two-way-transformer mask decoder.

Pure-torch re-implementation written from the MedPLIB spec (section 2.8) and SAM's published design.
Attribute names follow the release state dict (``model.visual_model.prompt_encoder.*`` / ``.mask_decoder.*``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from monai_medplib.modeling.sam_image_encoder import FeedForward, LayerNorm2d

PADDING_LABEL = -1  # point label that marks "no point" (gets not_a_point_embed, no positional encoding)
NEGATIVE_LABEL = 0
POSITIVE_LABEL = 1


class RandomFourierPositionEncoding(nn.Module):
    """Positional encoding of normalised (x, y) coordinates with a fixed random Gaussian projection.

    ``encode(c) = [sin(2*pi*(2c-1) @ G), cos(2*pi*(2c-1) @ G)]`` with ``G`` of shape ``[2, num_feats]``.
    """

    def __init__(self, num_feats: int = 128) -> None:
        super().__init__()
        # Persistent buffer: it is part of the checkpoint (``pe_layer.positional_encoding_gaussian_matrix``).
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_feats))

    def encode(self, unit_coords: torch.Tensor) -> torch.Tensor:
        """Encode coordinates in [0, 1] (last axis = (x, y)) to ``[..., 2*num_feats]``."""
        # Always fp32 (also in a bf16 model): sin/cos of ~2*pi*|G| arguments lose too much in half precision.
        projected = (2 * unit_coords.float() - 1) @ self.positional_encoding_gaussian_matrix.float()
        projected = 2 * math.pi * projected
        return torch.cat([torch.sin(projected), torch.cos(projected)], dim=-1)

    def grid(self, height: int, width: int) -> torch.Tensor:
        """Encoding of every cell centre ``((j+0.5)/W, (i+0.5)/H)`` of an ``H x W`` grid, ``[C, H, W]``."""
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
        xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
        coords = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # [H, W, 2] as (x, y)
        return self.encode(coords).permute(2, 0, 1)

    def encode_pixels(self, coords: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
        """Encode (x, y) coordinates given in pixels of an image of size ``image_hw`` = (H, W)."""
        scale = coords.new_tensor([image_hw[1], image_hw[0]])
        return self.encode(coords.float() / scale)


class SamPromptEncoder(nn.Module):
    """Turns prompts into sparse tokens ``[B, N, C]`` and a dense map ``[B, C, h, w]``.

    Prompt conventions (SAM): point / box coordinates are (x, y) pixels in the model-input frame
    (``input_image_size``); they are shifted by +0.5 to the pixel centre before encoding. Point labels:
    1 positive, 0 negative, -1 padding. When points are given without a box, one padding point is appended.
    MedPLIB adds ``text_embeds`` (the projected [SEG] state) as extra sparse tokens.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        image_embedding_size: tuple[int, int] = (16, 16),
        input_image_size: tuple[int, int] = (256, 256),
        mask_in_chans: int = 16,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = image_embedding_size
        self.input_image_size = input_image_size
        self.pe_layer = RandomFourierPositionEncoding(embed_dim // 2)
        # 0: negative point, 1: positive point, 2: box top-left, 3: box bottom-right.
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image-embedding grid, ``[1, C, h, w]`` (fp32)."""
        return self.pe_layer.grid(*self.image_embedding_size).unsqueeze(0)

    def embed_points(
        self, coords: torch.Tensor, labels: torch.Tensor, add_padding_point: bool
    ) -> torch.Tensor:
        """Point tokens ``[B, N(+1), C]`` from pixel coords ``[B, N, 2]`` and labels ``[B, N]``."""
        if coords.ndim != 3 or coords.shape[-1] != 2 or labels.shape != coords.shape[:2]:
            raise ValueError(
                f"points must be coords [B,N,2] and labels [B,N]; got {tuple(coords.shape)} and {tuple(labels.shape)}"
            )
        labels = labels.to(coords.device)
        known = (labels == PADDING_LABEL) | (labels == NEGATIVE_LABEL) | (labels == POSITIVE_LABEL)
        if not bool(known.all()):
            raise ValueError(f"point labels must be -1, 0 or 1; got {sorted(set(labels[~known].tolist()))}")
        coords = coords.float() + 0.5
        if add_padding_point:
            batch = coords.shape[0]
            coords = torch.cat([coords, coords.new_zeros(batch, 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((batch, 1), PADDING_LABEL)], dim=1)
        pe = self.pe_layer.encode_pixels(coords, self.input_image_size)
        label_tokens = {
            PADDING_LABEL: self.not_a_point_embed.weight[0],
            NEGATIVE_LABEL: self.point_embeddings[0].weight[0],
            POSITIVE_LABEL: self.point_embeddings[1].weight[0],
        }
        out = torch.zeros_like(pe)
        for label, token in label_tokens.items():
            is_label = (labels == label)[..., None]
            # Padding points carry no positional encoding, only the learned "not a point" token.
            base = torch.zeros_like(pe) if label == PADDING_LABEL else pe
            out = torch.where(is_label, base + token, out)
        return out

    def embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """Two corner tokens per box, ``[B, 2, C]``, from pixel boxes ``[B, 4]`` = (x0, y0, x1, y1)."""
        if boxes.shape[-1] != 4:
            raise ValueError(f"boxes must be [B,4] (x0,y0,x1,y1); got {tuple(boxes.shape)}")
        corners = (boxes.float() + 0.5).reshape(-1, 2, 2)
        pe = self.pe_layer.encode_pixels(corners, self.input_image_size)
        corner_tokens = torch.stack([self.point_embeddings[2].weight[0], self.point_embeddings[3].weight[0]])
        return pe + corner_tokens

    def embed_mask(self, masks: torch.Tensor) -> torch.Tensor:
        """Dense embedding ``[B, C, h, w]`` of low-resolution mask logits ``[B, 1, 4h, 4w]``."""
        if masks.ndim != 4 or masks.shape[1] != 1 or tuple(masks.shape[-2:]) != self.mask_input_size:
            raise ValueError(
                f"mask_input must be [B,1,{self.mask_input_size[0]},{self.mask_input_size[1]}]; got {tuple(masks.shape)}"
            )
        return self.mask_downscaling(masks)

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        text_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(sparse [B, N, C], dense [B, C, h, w])``.

        Sparse token order: text embeddings, then points (+ padding point), then box corners. The mask decoder
        treats prompt tokens as a set (no positional index), so the order does not change its output.
        """
        batch = self._batch_size(points, boxes, masks, text_embeds)
        ref = self.no_mask_embed.weight
        parts = []
        if text_embeds is not None:
            if text_embeds.ndim != 3 or text_embeds.shape[-1] != self.embed_dim:
                raise ValueError(
                    f"text_embeds must be [B,T,{self.embed_dim}]; got {tuple(text_embeds.shape)}"
                )
            parts.append(text_embeds.to(ref.dtype))
        if points is not None:
            parts.append(
                self.embed_points(points[0], points[1], add_padding_point=boxes is None).to(ref.dtype)
            )
        if boxes is not None:
            parts.append(self.embed_boxes(boxes).to(ref.dtype))
        sparse = torch.cat(parts, dim=1) if parts else ref.new_zeros(batch, 0, self.embed_dim)
        if masks is not None:
            dense = self.embed_mask(masks.to(ref.dtype))
        else:
            height, width = self.image_embedding_size
            dense = ref.reshape(1, -1, 1, 1).expand(batch, -1, height, width)
        return sparse, dense

    @staticmethod
    def _batch_size(points, boxes, masks, text_embeds) -> int:
        sizes = {
            name: value.shape[0]
            for name, value in (
                ("points", points[0] if points is not None else None),
                ("boxes", boxes),
                ("mask_input", masks),
                ("text_embeds", text_embeds),
            )
            if value is not None
        }
        if len(set(sizes.values())) > 1:
            raise ValueError(f"prompt batch sizes disagree: {sizes}")
        return next(iter(sizes.values()), 1)


class TokenAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections to ``dim // downsample_rate`` channels."""

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        inner = dim // downsample_rate
        if inner % num_heads:
            raise ValueError(f"attention width {inner} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        return x.reshape(batch, length, self.num_heads, width // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        weights = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        out = weights.softmax(dim=-1) @ v
        batch, heads, length, head_dim = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, heads * head_dim))


class TwoWayBlock(nn.Module):
    """Token self-attn, token->image cross-attn, token MLP, image->token cross-attn (post-norm each)."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int, first: bool) -> None:
        super().__init__()
        self.first = first  # the first block's self-attention sees no positional tokens and has no residual
        self.self_attn = TokenAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = TokenAttention(dim, num_heads, downsample_rate)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_dim, activation=nn.ReLU)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = TokenAttention(dim, num_heads, downsample_rate)

    def forward(
        self, tokens: torch.Tensor, image: torch.Tensor, token_pe: torch.Tensor, image_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.first:
            tokens = self.self_attn(tokens, tokens, tokens)
        else:
            q = tokens + token_pe
            tokens = tokens + self.self_attn(q, q, tokens)
        tokens = self.norm1(tokens)

        image_keys = image + image_pe
        tokens = self.norm2(tokens + self.cross_attn_token_to_image(tokens + token_pe, image_keys, image))
        tokens = self.norm3(tokens + self.mlp(tokens))
        image = self.norm4(image + self.cross_attn_image_to_token(image_keys, tokens + token_pe, tokens))
        return tokens, image


class TwoWayTransformer(nn.Module):
    """Stack of :class:`TwoWayBlock` plus a final token->image attention."""

    def __init__(
        self,
        depth: int = 2,
        dim: int = 256,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        downsample_rate: int = 2,
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayBlock(dim, num_heads, mlp_dim, downsample_rate, first=(i == 0)) for i in range(depth)
        )
        self.final_attn_token_to_image = TokenAttention(dim, num_heads, downsample_rate)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(
        self, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image / image_pe ``[B, C, h, w]``, tokens ``[B, T, C]`` -> (tokens ``[B, T, C]``, image ``[B, h*w, C]``)."""
        image = image.flatten(2).transpose(1, 2)
        image_pe = image_pe.flatten(2).transpose(1, 2)
        token_pe = tokens
        for layer in self.layers:
            tokens, image = layer(tokens, image, token_pe, image_pe)
        attended = self.final_attn_token_to_image(tokens + token_pe, image + image_pe, image)
        return self.norm_final_attn(tokens + attended), image


class TokenMLP(nn.Module):
    """Linear layers (key ``layers.{i}``) with ReLU between them."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class SamMaskDecoder(nn.Module):
    """Predicts ``num_multimask + 1`` low-resolution masks (4x the embedding grid) and their IoU scores."""

    def __init__(self, dim: int = 256, num_multimask_outputs: int = 3) -> None:
        super().__init__()
        self.num_mask_tokens = num_multimask_outputs + 1
        self.transformer = TwoWayTransformer(depth=2, dim=dim, num_heads=8, mlp_dim=2048, downsample_rate=2)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            TokenMLP(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = TokenMLP(dim, dim, self.num_mask_tokens, 3)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(masks [B, M, 4h, 4w], iou [B, M])`` with M = 1 (token 0) or 3 (tokens 1-3)."""
        batch = sparse_prompt_embeddings.shape[0]
        if image_embeddings.shape[0] not in (1, batch):
            raise ValueError(
                f"image_embeddings batch {image_embeddings.shape[0]} does not match prompt batch {batch}"
            )
        learned = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([learned.unsqueeze(0).expand(batch, -1, -1), sparse_prompt_embeddings], dim=1)
        image = image_embeddings.expand(batch, -1, -1, -1) + dense_prompt_embeddings
        image_pe = image_pe.expand(batch, -1, -1, -1)
        _, chans, height, width = image.shape

        tokens, image = self.transformer(image, image_pe, tokens)
        iou_out = tokens[:, 0]
        mask_out = tokens[:, 1 : 1 + self.num_mask_tokens]

        upscaled = self.output_upscaling(image.transpose(1, 2).reshape(batch, chans, height, width))
        hyper = torch.stack(
            [mlp(mask_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        up_b, up_c, up_h, up_w = upscaled.shape
        masks = (hyper @ upscaled.reshape(up_b, up_c, up_h * up_w)).reshape(up_b, -1, up_h, up_w)
        iou = self.iou_prediction_head(iou_out)

        picked = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, picked], iou[:, picked]
