"""SatMAE ViT with the ground-sample-distance position embedding (PSM_SPEC.md section 2).

Plain torch, timm key names (``patch_embed.proj``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,
mlp.fc1,mlp.fc2}``, ``fc_norm``). No class token, no learned position embedding: the
sin-cos embedding is built per image from ``res = zoom * gsd`` metres per patch step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """``[sin(pos*omega), cos(pos*omega)]`` with ``omega_i = 1/10000^(i/(dim/2))``; ``[M, dim]``."""
    omega = torch.arange(dim // 2, dtype=torch.float32, device=pos.device)
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega
    out = pos.reshape(-1, 1).float() * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def gsd_pos_embed(dim: int, grid_size: int, res: torch.Tensor) -> torch.Tensor:
    """Position embedding ``[n, grid_size**2, dim]`` for ``n`` resolutions (metres / step).

    Token ``t = i * grid_size + j`` (row i, column j); dims ``[0, dim/2)`` encode the column
    ``j * res``, dims ``[dim/2, dim)`` the row ``i * res``.
    """
    ar = torch.arange(grid_size, dtype=torch.float32, device=res.device)
    cols, rows = torch.meshgrid(ar, ar, indexing="xy")  # cols[i, j] = j, rows[i, j] = i
    res = res.to(torch.float32)
    n = res.shape[0]
    emb_c = sincos_1d(dim // 2, cols[None] * res[:, None, None])
    emb_r = sincos_1d(dim // 2, rows[None] * res[:, None, None])
    return torch.cat([emb_c, emb_r], dim=1).reshape(n, grid_size * grid_size, dim)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, D], row-major patches


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SatViT(nn.Module):
    """SatMAE ViT encoder: ``fc_norm(mean of patch tokens)`` -> ``[B, embed_dim]``."""

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0):
        super().__init__()
        self.img_size, self.embed_dim = img_size, embed_dim
        self.grid_size = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        hidden = int(embed_dim * mlp_ratio)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, hidden) for _ in range(depth))
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def forward(self, x: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
        """``x`` normalised images ``[B, 3, H, W]``; ``res`` metres per patch step ``[B]``."""
        x = self.patch_embed(x)
        pos = gsd_pos_embed(self.embed_dim, self.grid_size, res.to(x.device))
        x = x + pos.to(x.dtype)
        for blk in self.blocks:
            x = blk(x)
        return self.fc_norm(x.mean(dim=1))
