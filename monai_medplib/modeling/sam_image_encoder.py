"""SAM-Med2D image encoder: a ViT with windowed/global attention, decomposed relative positions and adapters.

Pure-torch re-implementation written from the MedPLIB spec (section 2.8). Sub-module attribute names follow the
release state dict (``model.visual_model.image_encoder.*``) so checkpoints load with ``strict=True``.
Tensors inside the blocks are channels-last (``[B, H, W, C]``), as in the original design.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VIT_NORM_EPS = 1e-6  # every LayerNorm of the ViT and of the neck
ADAPTER_NORM_EPS = 1e-5  # release quirk: the adapter uses a plain nn.LayerNorm (torch default eps)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a ``[B, C, H, W]`` tensor (affine, per-channel weight and bias)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        var = (x - mean).pow(2).mean(dim=1, keepdim=True)
        normed = (x - mean) / torch.sqrt(var + self.eps)
        return normed * self.weight[:, None, None] + self.bias[:, None, None]


class FeedForward(nn.Module):
    """Two linear layers with an activation in between (keys ``lin1`` / ``lin2``)."""

    def __init__(self, dim: int, hidden_dim: int, activation: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden_dim)
        self.lin2 = nn.Linear(hidden_dim, dim)
        self.act = activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection; returns channels-last tokens ``[B, H/p, W/p, C]``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


def relative_position_table(table: torch.Tensor, q_len: int, k_len: int) -> torch.Tensor:
    """Gather the ``[q_len, k_len, C]`` embeddings of the offsets ``q - k`` from a learned table.

    The table holds one row per offset ``-(L-1) .. L-1`` (``2L-1`` rows). Query and key lengths are equal in
    every place this encoder uses it, so no resampling of the table is needed.
    """
    if q_len != k_len or table.shape[0] != 2 * q_len - 1:
        raise ValueError(
            f"relative-position table with {table.shape[0]} rows does not fit q_len={q_len}, k_len={k_len} "
            f"(expected {2 * q_len - 1} rows and q_len == k_len)"
        )
    offsets = (
        torch.arange(q_len, device=table.device)[:, None] - torch.arange(k_len, device=table.device)[None, :]
    )
    return table[offsets + (k_len - 1)]


class RelPosAttention(nn.Module):
    """Multi-head self-attention on a 2-D token grid with decomposed (row + column) relative positions."""

    def __init__(self, dim: int, num_heads: int, grid_size: tuple[int, int]) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid_size[0] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, dim = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).reshape(batch, height * width, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, batch * heads, height * width, dim // heads).unbind(0)

        logits = (q * self.scale) @ k.transpose(-2, -1)
        # Decomposed relative position: the bias added to logit (query (y,x), key (y',x')) is
        # <q_unscaled(y,x), Rh[y-y']> + <q_unscaled(y,x), Rw[x-x']>.
        rel_h = relative_position_table(self.rel_pos_h, height, height)
        rel_w = relative_position_table(self.rel_pos_w, width, width)
        q_grid = q.reshape(batch * heads, height, width, dim // heads)
        bias_h = torch.einsum("byxc,ykc->byxk", q_grid, rel_h)
        bias_w = torch.einsum("byxc,xkc->byxk", q_grid, rel_w)
        logits = logits.view(batch * heads, height, width, height, width)
        logits = logits + bias_h[:, :, :, :, None] + bias_w[:, :, :, None, :]
        logits = logits.view(batch * heads, height * width, height * width)

        out = logits.softmax(dim=-1) @ v
        out = out.view(batch, heads, height, width, dim // heads).permute(0, 2, 3, 1, 4)
        return self.proj(out.reshape(batch, height, width, dim))


def split_windows(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad a ``[B, H, W, C]`` grid to multiples of ``window`` and cut it into ``[B*n, window, window, C]``."""
    batch, height, width, chans = x.shape
    pad_h = (window - height % window) % window
    pad_w = (window - width % window) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    padded_h, padded_w = height + pad_h, width + pad_w
    x = x.view(batch, padded_h // window, window, padded_w // window, window, chans)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, chans)
    return windows, (padded_h, padded_w)


def merge_windows(
    windows: torch.Tensor, window: int, padded_hw: tuple[int, int], original_hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`split_windows`: reassemble the grid and drop the padding."""
    padded_h, padded_w = padded_hw
    n_h, n_w = padded_h // window, padded_w // window
    batch = windows.shape[0] // (n_h * n_w)
    x = windows.view(batch, n_h, n_w, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, padded_h, padded_w, -1)
    return x[:, : original_hw[0], : original_hw[1], :].contiguous()


class Adapter(nn.Module):
    """SAM-Med2D adapter: channel gate then a down/up spatial branch, residual, LayerNorm (eps 1e-5).

    Input and output are channels-last ``[B, H, W, C]``; the grid side must be even (stride-2 down/up).
    """

    def __init__(self, dim: int, reduction: float = 0.25) -> None:
        super().__init__()
        hidden = int(dim * reduction)
        self.norm = nn.LayerNorm(dim, eps=ADAPTER_NORM_EPS)
        self.channel = nn.Sequential(
            nn.Linear(dim, hidden, bias=False),
            nn.ReLU(),
            nn.Linear(hidden, dim, bias=False),
            nn.Sigmoid(),
        )
        self.spatial = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=3, stride=2, padding=1, bias=False),
            nn.ReLU(),
            nn.ConvTranspose2d(dim, dim, kernel_size=4, stride=2, padding=1, bias=False),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)
        gate = self.channel(x.mean(dim=(2, 3)))
        gated = x * gate[:, :, None, None]
        x = x + self.spatial(gated)
        return self.norm(x.permute(0, 2, 3, 1))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block; windowed when ``window_size > 0``, global otherwise; optional adapter."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        window_size: int,
        grid_size: tuple[int, int],
        adapter: bool,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        attn_grid = (window_size, window_size) if window_size > 0 else grid_size
        self.norm1 = nn.LayerNorm(dim, eps=VIT_NORM_EPS)
        self.attn = RelPosAttention(dim, num_heads, attn_grid)
        self.norm2 = nn.LayerNorm(dim, eps=VIT_NORM_EPS)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio))
        # Attribute name "Adapter" (capitalised) is the release state-dict key.
        self.Adapter = Adapter(dim) if adapter else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            height, width = x.shape[1], x.shape[2]
            windows, padded_hw = split_windows(x, self.window_size)
            x = merge_windows(self.attn(windows), self.window_size, padded_hw, (height, width))
        else:
            x = self.attn(x)
        x = shortcut + x
        normed = self.norm2(x)
        if self.Adapter is None:
            return x + self.mlp(normed)
        # SAM-Med2D: the adapter runs in parallel with the MLP on the same normalised input.
        return x + self.mlp(normed) + self.Adapter(normed)


class SamImageEncoder(nn.Module):
    """Adapter ViT of SAM-Med2D: ``[B, 3, S, S]`` normalised image -> ``[B, out_chans, S/p, S/p]`` embedding."""

    def __init__(
        self,
        image_size: int = 256,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        window_size: int = 14,
        global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11),
        adapter: bool = True,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}")
        grid = image_size // patch_size
        self.image_size = image_size
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            EncoderBlock(
                embed_dim,
                num_heads,
                mlp_ratio,
                window_size=0 if i in global_attn_indexes else window_size,
                grid_size=(grid, grid),
                adapter=adapter,
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans, eps=VIT_NORM_EPS),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans, eps=VIT_NORM_EPS),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if (
            images.ndim != 4
            or images.shape[1] != 3
            or images.shape[-2:] != (self.image_size, self.image_size)
        ):
            raise ValueError(
                f"image encoder expects [B,3,{self.image_size},{self.image_size}], got {tuple(images.shape)}"
            )
        x = self.patch_embed(images) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))
