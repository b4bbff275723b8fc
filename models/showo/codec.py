"""Show-o's image tokenizers: pixels [B, 3, H, W] in [-1, 1] <-> codes [B, (H/f)(W/f)] (raster order).

    MagvitV2       MAGVIT-v2 (`showlab/magvitv2`) at real size: a taming-style conv encoder
                   (ch 128, ch_mult 1,2,2,4,4, res blocks 4,3,4,3,4; /16), 13 channels, a
                   lookup-free quantiser (code = sum 2^(12-k) [z_k > 0], MSB first; 8192 codes,
                   entries +-1) and a conv decoder (ch_mult 1,1,2,2,4, res blocks 4,4,3,4,3).
                   Parameter names follow Show-o's `MAGViTv2` (encoder.*, decoder.*, quantize.*)
                   so its checkpoint loads with `load_state_dict` (FAMILY_FACTS.md B6).
    PatchCodebook  the tiny preset's stand-in: nearest of K fitted pixel-patch centroids
                   (`fit_codebook.py`, shipped as `codebook_tiny.pt`), so previews are viewable.

Both are frozen: Show-o's RecA run never trains them.
"""
from __future__ import annotations

import importlib.resources
import io
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from reca.models.layers import patchify, unpatchify
from reca.models.vae import Downsample, Upsample, _Level, _Mid, _norm


@dataclass(kw_only=True)
class CodecConfig:
    kind: str = "patch"  # "patch" (fitted pixel-patch codebook, tiny) | "magvit2"
    ch: int = 128
    enc_ch_mult: tuple[int, ...] = (1, 2, 2, 4, 4)
    enc_blocks: tuple[int, ...] = (4, 3, 4, 3, 4)
    dec_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    dec_blocks: tuple[int, ...] = (4, 4, 3, 4, 3)
    code_bits: int = 13  # LFQ: 2^13 = 8192 codes
    patch: int = 4  # "patch": pixels per code along a side
    codebook_file: str = ""  # "patch": a .pt [K, 3 p p]; empty = the shipped codebook_tiny.pt


class MagvitEncoder(nn.Module):
    """[B, 3, H, W] -> pre-quantisation z [B, bits, H/16, W/16] (`quant_conv` inside, as upstream)."""

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.enc_ch_mult]
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = cfg.ch
        for i, (cout, n) in enumerate(zip(widths, cfg.enc_blocks)):
            level = _Level(cin, cout, n, False)  # attn_resolutions [5] is never reached
            if i != len(widths) - 1:
                level.downsample = Downsample(cout)
            self.down.append(level)
            cin = cout
        self.mid = _Mid(cin)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, cfg.code_bits, 3, padding=1)
        self.quant_conv = nn.Conv2d(cfg.code_bits, cfg.code_bits, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level.blocks(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.quant_conv(self.conv_out(F.silu(self.norm_out(self.mid(h)))))


class MagvitDecoder(nn.Module):
    """Quantised z [B, bits, h, w] (+-1 entries) -> image [B, 3, 16 h, 16 w]."""

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.dec_ch_mult]
        cin = widths[-1]
        self.post_quant_conv = nn.Conv2d(cfg.code_bits, cfg.code_bits, 1)
        self.conv_in = nn.Conv2d(cfg.code_bits, cin, 3, padding=1)
        self.mid = _Mid(cin)
        levels: list[_Level] = []
        for i in reversed(range(len(widths))):
            level = _Level(cin, widths[i], cfg.dec_blocks[i], False)
            if i != 0:
                level.upsample = Upsample(widths[i])
            levels.insert(0, level)
            cin = widths[i]
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(self.post_quant_conv(z)))
        for level in reversed(self.up):
            h = level.blocks(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class LFQuantizer(nn.Module):
    """Lookup-free quantiser: sign of each of `bits` channels; buffers as upstream (`embedding`
    [2^bits, bits] of +-1, `power_vals` [bits])."""

    def __init__(self, bits: int):
        super().__init__()
        idx = torch.arange(2**bits)
        binary = (idx[:, None] >> torch.arange(bits - 1, -1, -1)) & 1
        self.register_buffer("embedding", binary.float() * 2 - 1)
        self.register_buffer("power_vals", 2 ** torch.arange(bits - 1, -1, -1))

    def codes(self, z: Tensor) -> Tensor:
        """[B, bits, h, w] -> [B, h w] int64, raster order."""
        return ((z > 0).long() * self.power_vals.view(1, -1, 1, 1)).sum(1).flatten(1)

    def entries(self, codes: Tensor, grid: int) -> Tensor:
        """[B, h w] -> [B, bits, h, w] of +-1."""
        return self.embedding[codes].view(codes.shape[0], grid, grid, -1).permute(0, 3, 1, 2)


class MagvitV2(nn.Module):
    def __init__(self, cfg: CodecConfig):
        super().__init__()
        self.downsample = 2 ** (len(cfg.enc_ch_mult) - 1)
        self.codebook_size = 2**cfg.code_bits
        self.encoder = MagvitEncoder(cfg)
        self.decoder = MagvitDecoder(cfg)
        self.quantize = LFQuantizer(cfg.code_bits)

    @torch.no_grad()
    def encode_codes(self, x: Tensor) -> Tensor:
        """[B, 3, H, W] in [-1, 1] -> codes [B, (H/16)(W/16)] (Show-o's `get_code`)."""
        return self.quantize.codes(self.encoder(x.to(self.encoder.conv_in.weight.dtype)))

    @torch.no_grad()
    def decode_codes(self, codes: Tensor) -> Tensor:
        grid = int(round(codes.shape[1] ** 0.5))
        z = self.quantize.entries(codes, grid).to(self.decoder.conv_in.weight.dtype)
        return self.decoder(z)


class PatchCodebook(nn.Module):
    """Each p x p pixel patch -> the nearest of K fitted centroids (squared distance)."""

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        if cfg.codebook_file:
            book = torch.load(cfg.codebook_file, map_location="cpu", weights_only=True)
        else:
            raw = (importlib.resources.files("reca.models.showo") / "codebook_tiny.pt").read_bytes()
            book = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        if book.shape[1] != 3 * cfg.patch**2:
            raise ValueError(f"codebook entries have {book.shape[1]} values, patch {cfg.patch} needs {3 * cfg.patch**2}")
        self.register_buffer("codebook", book.float())  # [K, 3 p p]
        self.downsample, self.codebook_size, self.patch = cfg.patch, book.shape[0], cfg.patch

    @torch.no_grad()
    def encode_codes(self, x: Tensor) -> Tensor:
        tokens = patchify(x.float(), self.patch)  # [B, T, 3 p p]
        book = self.codebook
        dist = (tokens**2).sum(-1, keepdim=True) - 2 * tokens @ book.T + (book**2).sum(-1)
        return dist.argmin(-1)

    @torch.no_grad()
    def decode_codes(self, codes: Tensor) -> Tensor:
        grid = int(round(codes.shape[1] ** 0.5))
        return unpatchify(self.codebook[codes], self.patch, 3, grid)


def build_image_codec(cfg: CodecConfig) -> nn.Module:
    if cfg.kind == "magvit2":
        return MagvitV2(cfg)
    if cfg.kind == "patch":
        return PatchCodebook(cfg)
    raise ValueError(f"unknown Show-o codec kind {cfg.kind!r} (choose 'patch' or 'magvit2')")
