"""CLIP vision tower, the ``mlp2x_gelu`` projector and region-feature pooling (spec 2.1-2.3, 5.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel


class _CLIPContainer(nn.Module):
    """Holds the HF model under ``vision_model`` so keys stay ``...vision_tower.vision_model.*``.

    transformers >= 5 dropped the ``vision_model`` level inside ``CLIPVisionModel``; the release (4.31) keys keep it.
    """

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.vision_model = CLIPVisionModel(config)


class CLIPVisionTower(nn.Module):
    """Frozen CLIP ViT; returns the patch tokens of hidden state ``select_layer`` (release: -2, CLS dropped).

    Only the layers needed for the selected hidden state are run: with ``select_layer=-2`` the last encoder layer
    and ``post_layernorm`` are unused (their weights still load).
    """

    def __init__(self, clip_kwargs: dict, select_layer: int = -2, attn_implementation: str = "sdpa"):
        super().__init__()
        config = CLIPVisionConfig(**clip_kwargs)
        config._attn_implementation = attn_implementation
        self.vision_tower = _CLIPContainer(config)
        n_layers = config.num_hidden_layers
        # hidden_states[k] = output after k encoder layers (index 0 = embeddings after pre_layrnorm)
        self.num_layers_run = select_layer if select_layer >= 0 else n_layers + 1 + select_layer
        if not 0 <= self.num_layers_run <= n_layers:
            raise ValueError(
                f"mm_vision_select_layer {select_layer} is out of range for {n_layers} CLIP layers"
            )

    @property
    def clip(self) -> CLIPVisionModel:
        return self.vision_tower.vision_model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images [B,3,336,336]`` -> patch features ``[B,576,C]`` in the tower dtype."""
        clip = self.clip
        dtype = clip.embeddings.patch_embedding.weight.dtype
        hidden = clip.pre_layrnorm(clip.embeddings(images.to(dtype)))
        for layer in clip.encoder.layers[: self.num_layers_run]:
            hidden = layer(hidden, None)
        return hidden[:, 1:]


def build_projector(mm_hidden_size: int, hidden_size: int) -> nn.Sequential:
    """``mlp2x_gelu``: Linear -> exact GELU -> Linear (keys ``mm_projector.0`` / ``.2``)."""
    return nn.Sequential(
        nn.Linear(mm_hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size)
    )


def build_text_hidden_fcs(hidden_size: int, out_dim: int) -> nn.ModuleList:
    """LISA-style [SEG] head: keys ``text_hidden_fcs.0.0`` (H->H), ReLU, ``text_hidden_fcs.0.2`` (H->out_dim)."""
    return nn.ModuleList(
        [
            nn.Sequential(
                nn.Linear(hidden_size, hidden_size),
                nn.ReLU(),
                nn.Linear(hidden_size, out_dim),
                nn.Dropout(0.0),
            )
        ]
    )


def region_sample_points(
    grid: torch.Tensor, max_points: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Normalised ``(row, col)`` positions ``nonzero(grid) / (h, w)`` of a region grid, at most ``max_points``.

    Release behaviour: a random subset (``randperm``) only when the region has more cells than ``max_points``.
    """
    if grid.dim() != 2:
        raise ValueError(f"region grid must be 2-D [h, w], got shape {tuple(grid.shape)}")
    size = torch.tensor(grid.shape, device=grid.device)
    pos = grid.nonzero() / size
    if pos.shape[0] > max_points:
        pos = pos[torch.randperm(pos.shape[0], generator=generator)[:max_points].to(pos.device)]
    return pos


def pool_region_features(
    feature_map: torch.Tensor,
    grids: list[torch.Tensor],
    max_points: int = 512,
    generator: torch.Generator | None = None,
    coord_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Mean of bilinearly sampled ``feature_map [N,C]`` (N = h*w patches) inside each region grid -> ``[R,C]``.

    Release quirks kept: ``grid_sample(align_corners=True)`` at ``nonzero/24`` (not cell centres: samples are shifted
    towards the top-left by up to one cell); coordinates flipped to (x, y); sampling in fp32 with coordinates first
    cast to the CLIP dtype (``coord_dtype``); an empty region gives zeros (``nan_to_num`` of an empty mean).
    """
    n, c = feature_map.shape
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"region feature map has {n} rows, not a square patch grid")
    spatial = feature_map.reshape(side, side, c).permute(2, 0, 1).unsqueeze(0).float()  # [1,C,h,w]
    pooled = []
    for grid in grids:
        pos = region_sample_points(grid, max_points, generator)
        if pos.shape[0] == 0:
            pooled.append(feature_map.new_zeros(c))
            continue
        xy = pos.flip(-1).to(coord_dtype or feature_map.dtype).float()
        sampled = F.grid_sample(spatial, (2.0 * xy - 1.0).view(1, -1, 1, 2), align_corners=True)  # [1,C,P,1]
        pooled.append(sampled[0, :, :, 0].to(feature_map.dtype).mean(dim=1))
    if not pooled:
        return feature_map.new_zeros(0, c)
    return torch.stack(pooled)
