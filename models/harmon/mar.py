"""MAR (masked autoregressive) encoder/decoder with fixed shapes, and its random masking.

Parameter names are MAR's (Harmon checkpoints: `mar.*`, timm ViT block names inside), so a
checkpoint loads by a prefix change. MAR gathers the unmasked tokens into a shorter tensor
before the encoder, a length that changes with the mask ratio every step. Here the gather goes
into a FIXED number of slots, `max_kept(T, ratio_min)` (T = 1024, ratio >= 0.7: 308 slots):
the kept tokens in raster order, then padding slots that are never keys (`kept_slots`). The
outputs at kept positions are MAR's exactly (attention is permutation-equivariant, keys are
masked); the encoder and the LLM pay for 308 instead of 1024 token slots (the padding is the
price of a shape that never changes: CUDA graphs, torch.compile, no host sync for the mask).
One ratio per batch (MAR's) keeps the kept count equal across a batch; E[kept] ~ 136 of 1024.
Shapes: B batch, T latent tokens (h w), K slots, nb buffer tokens, C latent channels, W width.
"""
from __future__ import annotations

from dataclasses import dataclass

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from reca.models.harmon.diffhead import DiffHeadShape, DiffLoss


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

    def __post_init__(self) -> None:
        # buffer_size >= 1: a fully masked image leaves only the buffers for the decoder to attend to
        for name in ("width", "encoder_depth", "decoder_depth", "num_heads", "buffer_size", "pos_grid", "num_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.num_heads:
            raise ValueError(f"num_heads {self.num_heads} must divide width {self.width}")
        if not (math.isfinite(self.mlp_ratio) and self.mlp_ratio > 0):
            raise ValueError(f"mlp_ratio must be finite and > 0, got {self.mlp_ratio}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


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
            x = block(x, mask)  # activation checkpointing is applied from outside (engine/compile.py)
        return x

    def encode(self, x: torch.Tensor, slots: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Latent tokens x [B, T, C] (square grid) -> encoder stream, buffers first:
        [B, nb + T, W] over every token (slots None), or [B, nb + K, W] over the K slots of
        `kept_slots` (idx [B, K], valid [B, K]): each kept token with its own position; padding
        slots carry zeros, are never attended to (the buffers always are, so no attention row is
        empty), and their outputs are meaningless."""
        b, t, c = x.shape
        side, nb = int(round(t**0.5)), self.buffer_size
        pos = self._pos(self.encoder_pos_embed_learned, side, nb)  # [1, nb + T, W]
        mask = None
        if slots is not None:
            idx, valid = slots
            x = x.gather(1, idx[..., None].expand(-1, -1, c)) * valid[..., None].to(x.dtype)
            tok_pos = pos[:, nb:].expand(b, -1, -1).gather(1, idx[..., None].expand(-1, -1, pos.shape[-1]))
            pos = torch.cat([pos[:, :nb].expand(b, -1, -1), tok_pos], dim=1)
            mask = torch.cat([valid.new_ones(b, nb), valid], dim=1)[:, None, None, :]
        h = self.z_proj(x)
        buffers = self.fake_latent.to(h.dtype).expand(b, nb, -1)
        h = self.z_proj_ln(torch.cat([buffers, h], dim=1) + pos)
        return self.encoder_norm(self._run(self.encoder_blocks, h, mask))

    def decode(self, x: torch.Tensor, slots: tuple[torch.Tensor, torch.Tensor], tokens: int) -> torch.Tensor:
        """Encoder stream over slots x [B, nb + K, W] (`kept_slots`: idx, valid [B, K]) ->
        per-token conditions z [B, T, W], T = `tokens`: the kept tokens scattered back to their
        positions, mask tokens everywhere else, full attention, buffers dropped, + diffusion
        positions (MAR's `forward_mae_decoder`)."""
        idx, valid = slots
        b, _, w = x.shape
        nb = self.buffer_size
        side = int(round(tokens**0.5))
        h = self.decoder_embed(x)
        fill = self.mask_token.to(h.dtype)
        slot_h = torch.where(valid[..., None], h[:, nb:], fill)  # padding slots write a mask token
        grid = fill.expand(b, tokens, w).scatter(1, idx[..., None].expand(-1, -1, w), slot_h)  # idx unique per row
        h = torch.cat([h[:, :nb], grid], dim=1) + self._pos(self.decoder_pos_embed_learned, side, nb)
        h = self.decoder_norm(self._run(self.decoder_blocks, h, None))
        return h[:, nb:] + _interpolate(self.diffusion_pos_embed_learned, self.shape.pos_grid, side)


# --- masking: on the device, from the run's generator, fixed shapes -------------------------------

def mask_ratio(generator: torch.Generator | None, device, low: float = 0.7, std: float = 0.25) -> torch.Tensor:
    """One ratio per batch [1] (float64) from normal(1, std) truncated to [low, 1] (MAR's scipy truncnorm),
    by inverting the normal CDF on the device: no host sync, no numpy. The CDF at the bounds is
    host arithmetic (a `torch.tensor` on the device would be a copy that CUDA-graph capture forbids)."""
    a = 0.5 * math.erfc((1.0 - low) / std / math.sqrt(2.0))  # Phi((low - 1) / std)
    b = 0.5  # Phi(0)
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


def max_kept(tokens: int, ratio_min: float) -> int:
    """Slots that hold every kept token of a training mask: ceil(T ratio) >= floor(T ratio_min)
    tokens are masked, so at most T - floor(T ratio_min) are kept (floor: never one slot short
    to float rounding)."""
    return max(1, min(tokens, tokens - math.floor(tokens * ratio_min)))


def kept_slots(keep: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """keep [B, T] bool -> (idx [B, K] long, valid [B, K] bool), K = `slots`: the positions of
    the kept tokens in raster order, then dropped positions as padding (valid False). On the
    device, no host sync; a row keeping more than K tokens would lose its last ones, so K comes
    from `max_kept` (or T)."""
    t = keep.shape[1]
    key = torch.arange(t, device=keep.device) + (~keep).long() * t  # kept first, each group in raster order
    idx = key.argsort(dim=1)[:, :slots]
    return idx, keep.gather(1, idx)


def expected_kept(tokens: int, ratio_min: float = 0.7, std: float = 0.25) -> float:
    """Mean kept count of `random_masking`: T - E[ceil(T ratio)] with ratio ~ normal(1, std)
    truncated to [ratio_min, 1] (the ceiling adds half a token on average). The useful tokens of
    the kept slots: what the model-FLOPs count (MFU) charges, padding aside."""
    def pdf(z):
        return math.exp(-z * z / 2) / math.sqrt(2 * math.pi)

    def cdf(z):
        return 0.5 * math.erfc(-z / math.sqrt(2))

    a = (ratio_min - 1.0) / std
    mean = 1.0 + std * (pdf(a) - pdf(0.0)) / (cdf(0.0) - cdf(a))
    return max(0.0, tokens * (1.0 - mean) - 0.5)
