"""MAR (masked autoregressive) encoder/decoder with fixed shapes, and its random masking.

Parameter names are MAR's (Harmon checkpoints: `mar.*`, timm ViT block names inside), so a
checkpoint loads by a prefix change. One difference from MAR's code, on purpose: MAR gathers
the unmasked tokens into a shorter tensor before the encoder (a shape that changes with the mask
ratio). Here the sequence stays [B, nb + T] and a dropped token is simply never a key (a key
padding mask) and carries zeros; the outputs at kept positions are those of MAR's gather
(attention is permutation-equivariant and the kept order is unchanged). It costs the encoder
(and the LLM) the FLOPs of the dropped tokens (mask ratio 0.7-1.0: up to ~3x on the encoder);
in exchange the step never changes shape (CUDA graphs, torch.compile, no host sync for the
mask). Shapes: B batch, T latent tokens (h w), nb buffer tokens, C latent channels, W width.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from reca.models.diffhead import DiffHeadShape, DiffLoss


@dataclass(kw_only=True)
class MARShape:
    width: int = 64  # MAR-base 768, MAR-huge 1280 (encoder and decoder)
    encoder_depth: int = 2  # base 12, huge 20
    decoder_depth: int = 2
    num_heads: int = 4  # base 12, huge 16
    mlp_ratio: float = 4.0
    buffer_size: int = 8  # MAR/Harmon: 64
    pos_grid: int = 8  # side of the stored position grid (MAR: 16, i.e. 256 px / 16); interpolated to the latent grid
    dropout: float = 0.0  # attention and projection dropout (MAR: 0.1)
    num_classes: int = 1000  # class_emb rows: present in checkpoints, unused by RecA


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, L, W], mask [B, 1, 1, L] bool (True = may be attended) or None."""
        b, n, w = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return F.dropout(self.proj(out.transpose(1, 2).reshape(b, n, w)), p, self.training)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(F.gelu(self.fc1(x)), self.dropout, self.training)
        return F.dropout(self.fc2(h), self.dropout, self.training)


class Block(nn.Module):
    """timm's pre-norm ViT block (LayerNorm eps 1e-6, exact GELU, no layer scale / drop path)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


def _interpolate(table: torch.Tensor, grid: int, side: int) -> torch.Tensor:
    """[1, grid^2, W] position table -> [1, side^2, W], bilinear (Harmon's `get_*_pos_embed`)."""
    if side == grid:
        return table
    img = table.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
    img = F.interpolate(img.float(), size=(side, side), mode="bilinear").to(table.dtype)
    return img.permute(0, 2, 3, 1).reshape(1, side * side, -1)


class MAR(nn.Module):
    """MAR's encoder, decoder and diffusion head (`diffloss`), without its class-conditional parts."""

    def __init__(self, shape: MARShape, channels: int, head: DiffHeadShape):
        super().__init__()
        w, nb, g = shape.width, shape.buffer_size, shape.pos_grid
        self.shape = shape
        self.buffer_size = nb
        self.z_proj = nn.Linear(channels, w)
        self.z_proj_ln = nn.LayerNorm(w, eps=1e-6)
        self.fake_latent = nn.Parameter(torch.zeros(1, w))  # what fills the buffers (Harmon's null class)
        self.class_emb = nn.Embedding(shape.num_classes, w)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, g * g + nb, w))
        self.encoder_blocks = nn.ModuleList(
            Block(w, shape.num_heads, shape.mlp_ratio, shape.dropout) for _ in range(shape.encoder_depth))
        self.encoder_norm = nn.LayerNorm(w, eps=1e-6)
        self.decoder_embed = nn.Linear(w, w)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, w))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, g * g + nb, w))
        self.decoder_blocks = nn.ModuleList(
            Block(w, shape.num_heads, shape.mlp_ratio, shape.dropout) for _ in range(shape.decoder_depth))
        self.decoder_norm = nn.LayerNorm(w, eps=1e-6)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, g * g, w))
        self.grad_checkpointing = False
        self.reset_parameters()
        self.diffloss = DiffLoss(channels, w, head)  # after MAR's init: the head keeps its own

    def reset_parameters(self) -> None:
        """MAR's init: N(0, 0.02) tokens and tables, xavier-uniform linears, unit LayerNorms."""
        for p in (self.fake_latent, self.class_emb.weight, self.mask_token, self.encoder_pos_embed_learned,
                  self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _pos(self, table: torch.Tensor, side: int, buffers: int) -> torch.Tensor:
        g = self.shape.pos_grid
        return torch.cat([table[:, :buffers], _interpolate(table[:, buffers:], g, side)], dim=1)

    def _run(self, blocks: nn.ModuleList, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for block in blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return x

    def encode(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Latent tokens x [B, T, C] (square grid), keep [B, T] bool (None = all) -> [B, nb + T, W],
        buffers first. Dropped tokens are zeroed and never attended to (the buffers always are,
        so no attention row is empty); their outputs are meaningless and must be discarded."""
        b, t, _ = x.shape
        side = int(round(t**0.5))
        if keep is not None:
            x = x * keep[..., None].to(x.dtype)
        h = self.z_proj(x)
        buffers = self.fake_latent.to(h.dtype).expand(b, self.buffer_size, -1)
        h = torch.cat([buffers, h], dim=1) + self._pos(self.encoder_pos_embed_learned, side, self.buffer_size)
        h = self.z_proj_ln(h)
        mask = None
        if keep is not None:
            ones = keep.new_ones(b, self.buffer_size)
            mask = torch.cat([ones, keep], dim=1)[:, None, None, :]
        return self.encoder_norm(self._run(self.encoder_blocks, h, mask))

    def decode(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Encoder stream x [B, nb + T, W], keep [B, T] bool -> per-token conditions z [B, T, W]:
        mask tokens where nothing was kept, full attention, buffers dropped, + diffusion positions."""
        b, n, _ = x.shape
        t = n - self.buffer_size
        side = int(round(t**0.5))
        h = self.decoder_embed(x)
        kept = torch.cat([keep.new_ones(b, self.buffer_size), keep], dim=1)[..., None]
        h = torch.where(kept, h, self.mask_token.to(h.dtype))
        h = h + self._pos(self.decoder_pos_embed_learned, side, self.buffer_size)
        h = self.decoder_norm(self._run(self.decoder_blocks, h, None))
        return h[:, self.buffer_size:] + _interpolate(self.diffusion_pos_embed_learned, self.shape.pos_grid, side)


# --- masking: on the device, from the run's generator, fixed shapes -------------------------------

def mask_ratio(generator: torch.Generator | None, device, low: float = 0.7, std: float = 0.25) -> torch.Tensor:
    """One ratio per batch [1] (float64) from normal(1, std) truncated to [low, 1] (MAR's scipy truncnorm),
    by inverting the normal CDF on the device: no host sync, no numpy."""
    a = torch.special.ndtr(torch.tensor((low - 1.0) / std, device=device, dtype=torch.float64))
    b = torch.special.ndtr(torch.zeros((), device=device, dtype=torch.float64))
    u = torch.rand(1, device=device, generator=generator, dtype=torch.float64)
    return (1.0 + std * torch.special.ndtri(a + u * (b - a))).clamp(low, 1.0)


def random_orders(batch: int, tokens: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """A uniformly random permutation of range(T) per sample [B, T] (MAR's `sample_orders`)."""
    return torch.rand(batch, tokens, device=device, generator=generator).argsort(dim=1)


def mask_by_order(orders: torch.Tensor, num_masked: torch.Tensor | int) -> torch.Tensor:
    """[B, T] bool, True for the first `num_masked` tokens of each order (MAR's `mask_by_order`)."""
    rank = orders.argsort(dim=1)  # rank[i] = position of token i in the order
    return rank < num_masked


def random_masking(batch: int, tokens: int, generator, device, low: float = 0.7, std: float = 0.25):
    """MAR's training mask: ceil(T ratio) tokens masked (True), in a random order per sample.
    Returns (mask [B, T] bool, orders [B, T], ratio [1])."""
    ratio = mask_ratio(generator, device, low, std)
    orders = random_orders(batch, tokens, generator, device)
    num = torch.ceil(tokens * ratio)  # MAR: int(np.ceil(seq_len * rate)), float64 as numpy
    return mask_by_order(orders, num), orders, ratio
