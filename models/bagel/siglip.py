"""BAGEL's SigLIP NaViT encoder at a fixed input size (the understanding view).

Names are BAGEL's `vit_model.vision_model.*` [R: FAMILY_FACTS A1]: the patch embedding is a
Linear(3 p p -> D) over pixels patchified in (h, w, p, q, c) order (BAGEL converts SigLIP's
Conv2d to it), the learned position embedding has `max_side`^2 rows indexed by
`row * max_side + col` (top-left sub-grid: interpolate_pos False), and the last layer of the
full encoder is never built (BAGEL uses the second-to-last layer, then post_layernorm).
Every understanding image of a run has the same size, so the varlen attention of BAGEL's
NaViT (one sequence per image) is a plain batched SDPA here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(kw_only=True)
class VitShape:
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2  # of the full encoder: the last one is never built
    num_heads: int = 2
    image_size: int = 32  # the understanding view's side, pixels (BAGEL RecA: 224)
    patch_size: int = 8
    max_side: int = 4  # patches per side of the position tables (BAGEL: 70)
    layer_norm_eps: float = 1e-6


def patchify_hwpqc(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), p p C], BAGEL's (h, w, p, q, c) order."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify_hwpqc(x: torch.Tensor, p: int, channels: int, grid: int) -> torch.Tensor:
    """Inverse of `patchify_hwpqc` for a square grid: [B, grid^2, p p C] -> [B, C, grid p, grid p]."""
    b = x.shape[0]
    x = x.reshape(b, grid, grid, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, grid * p, grid * p)


def grid_ids(side: int, max_side: int, device=None) -> torch.Tensor:
    """Row-major ids [side^2] of a side x side grid in a max_side x max_side table."""
    r = torch.arange(side, device=device)
    return (r[:, None] * max_side + r[None, :]).flatten()


class SiglipAttention(nn.Module):
    def __init__(self, v: VitShape):
        super().__init__()
        d, self.heads = v.hidden_size, v.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class SiglipMLP(nn.Module):
    def __init__(self, v: VitShape):
        super().__init__()
        self.fc1 = nn.Linear(v.hidden_size, v.intermediate_size)
        self.fc2 = nn.Linear(v.intermediate_size, v.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, v: VitShape):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)
        self.self_attn = SiglipAttention(v)
        self.layer_norm2 = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)
        self.mlp = SiglipMLP(v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEmbeddings(nn.Module):
    def __init__(self, v: VitShape):
        super().__init__()
        self.patch_size, self.max_side = v.patch_size, v.max_side
        self.patch_embedding = nn.Linear(3 * v.patch_size**2, v.hidden_size)
        self.position_embedding = nn.Embedding(v.max_side**2, v.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        side = pixels.shape[-1] // self.patch_size
        x = self.patch_embedding(patchify_hwpqc(pixels.to(self.patch_embedding.weight.dtype), self.patch_size))
        return x + self.position_embedding(grid_ids(side, self.max_side, pixels.device))


class SiglipEncoder(nn.Module):
    def __init__(self, v: VitShape):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(v) for _ in range(v.num_layers - 1))


class SiglipVisionTransformer(nn.Module):
    def __init__(self, v: VitShape):
        super().__init__()
        self.embeddings = SiglipEmbeddings(v)
        self.encoder = SiglipEncoder(v)
        self.post_layernorm = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)


class SiglipNaViT(nn.Module):
    """`vit_model`: pixels [B, 3, H, W] (normalised to [-1, 1]) -> features [B, (H/p)(W/p), Dv]."""

    def __init__(self, v: VitShape):
        super().__init__()
        if v.image_size % v.patch_size or v.image_size // v.patch_size > v.max_side:
            raise ValueError(f"vit image_size {v.image_size} must be a multiple of patch_size {v.patch_size} "
                             f"with at most max_side {v.max_side} patches a side")
        self.vision_model = SiglipVisionTransformer(v)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        vm = self.vision_model
        x = vm.embeddings(pixels)
        for layer in vm.encoder.layers:
            x = layer(x)
        return vm.post_layernorm(x)
