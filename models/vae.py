"""Latent codecs: the generation view ([-1, 1] pixels, [B, 3, H, W]) to generator latents and back.

Two implementations behind one small protocol (`LatentCodec`):

    PatchVAE(p)        pixel-space stand-in for the tiny preset: exact space-to-depth,
                       [B, 3, H, W] <-> [B, 3 p p, H/p, W/p]; no parameters
    AutoencoderKL(cfg) the latent-diffusion ("taming" / LDM) KL autoencoder with the
                       checkpoints' parameter names, so FLUX.1's `ae.safetensors` or
                       MAR/Harmon's KL-16 load with `load_state_dict` unchanged

Codecs are frozen by design: the families call `encode` / `decode` under `torch.no_grad()` and
switch their gradients off; nothing here enforces it, so a codec could still be fine-tuned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


@runtime_checkable
class LatentCodec(Protocol):
    """What a family needs from its VAE."""

    latent_channels: int  # C of the latents
    downsample: int  # pixels per latent along a side (f)

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """[B, 3, H, W] in [-1, 1] -> [B, C, H/f, W/f], already scaled/shifted for the generator."""
        ...

    def decode(self, z: Tensor) -> Tensor:
        """[B, C, H/f, W/f] -> [B, 3, H, W], roughly in [-1, 1] (not clamped)."""
        ...


def _check_divisible(x: Tensor, f: int) -> None:
    # A stride-2 stack silently floors odd sides; decode would then return a smaller image.
    if x.shape[-2] % f or x.shape[-1] % f:
        raise ValueError(f"image sides {tuple(x.shape[-2:])} must be divisible by the codec's factor {f}")


class PatchVAE(nn.Module):
    """Exactly invertible space-to-depth: [B, 3, H, W] <-> [B, 3 p p, H/p, W/p].

    Channel order is pixel_unshuffle's (colour outermost, then row, then column within a patch).
    """

    def __init__(self, patch: int):
        super().__init__()
        if patch < 1:
            raise ValueError(f"patch must be >= 1, got {patch}")
        self.patch = patch
        self.downsample = patch
        self.latent_channels = 3 * patch * patch

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """[B, 3, H, W] -> [B, 3 p p, H/p, W/p]; `generator` is unused (deterministic)."""
        _check_divisible(x, self.patch)
        return F.pixel_unshuffle(x, self.patch)

    def decode(self, z: Tensor) -> Tensor:
        """[B, 3 p p, h, w] -> [B, 3, h p, w p]; the exact inverse of `encode`."""
        return F.pixel_shuffle(z, self.patch)


# --- AutoencoderKL ---------------------------------------------------------------------------

@dataclass(kw_only=True)
class KLConfig:
    """Shape and latent normalisation of an LDM AutoencoderKL. The defaults are FLUX.1's `ae`.

    The image has 3 channels in and out; level i has `ch * ch_mult[i]` channels and the
    latent grid is 2 ** (len(ch_mult) - 1) times smaller than the image.
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16  # encoder output is 2 z (mean, logvar); decoder input is z
    embed_dim: int = 16  # latent channels after quant_conv; only used with use_quant_conv
    use_quant_conv: bool = False
    # Levels (0 = full resolution) with self-attention after each resnet block, besides the
    # mid-block attention every model has. LDM states these as resolutions at 256 px; MAR's
    # KL-16 encoder has attention at its 16 x 16 level (4), its decoder none.
    encoder_attn_levels: tuple[int, ...] = ()
    decoder_attn_levels: tuple[int, ...] = ()
    scale: float = 0.3611  # latents = scale * (z - shift)
    shift: float = 0.1159
    sample_posterior: bool = True  # True: z = mean + std * eps; False: z = mean (posterior mode)

    def __post_init__(self) -> None:
        for name in ("ch", "num_res_blocks", "z_channels", "embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ValueError(f"ch_mult must be one or more multipliers >= 1, got {self.ch_mult}")
        for name in ("encoder_attn_levels", "decoder_attn_levels"):
            if any(not 0 <= level < len(self.ch_mult) for level in getattr(self, name)):
                raise ValueError(f"{name} must name levels 0..{len(self.ch_mult) - 1}, got {getattr(self, name)}")
        if not (math.isfinite(self.scale) and self.scale != 0 and math.isfinite(self.shift)):
            raise ValueError(f"scale must be finite and non-zero, shift finite; got {self.scale}, {self.shift}")


def flux_vae_config() -> KLConfig:
    """FLUX.1 `ae` (as used by BAGEL): 16 channels, /8, sampled posterior; 83,819,683 parameters."""
    return KLConfig(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16, embed_dim=16,
                    use_quant_conv=False, scale=0.3611, shift=0.1159, sample_posterior=True)


def kl16_config() -> KLConfig:
    """MAR / Harmon KL-16: 16 channels, /16, quant convs, posterior mode; 66,456,019 parameters."""
    return KLConfig(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=16, embed_dim=16,
                    use_quant_conv=True, encoder_attn_levels=(4,), decoder_attn_levels=(),
                    scale=0.2325, shift=0.0, sample_posterior=False)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm1-swish-conv1-norm2-swish-conv2 plus a (1x1 `nin_shortcut` when widths differ) skip."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H W positions; q, k, v, proj_out are 1x1 convs."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2).unsqueeze(1) for m in (self.q, self.k, self.v))  # [B, 1, HW, C]
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(C), as in LDM
        return x + self.proj_out(out.squeeze(1).transpose(1, 2).reshape(b, c, hgt, wid))


class Downsample(nn.Module):
    """[B, C, H, W] -> [B, C, H/2, W/2]: pad right/bottom by one, then a 3x3 stride-2 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric: what the checkpoints were trained with


class Upsample(nn.Module):
    """[B, C, H, W] -> [B, C, 2H, 2W]: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block.{j}`, optional `attn.{j}`, optional `downsample`/`upsample`."""

    def __init__(self, cin: int, cout: int, blocks: int, attn: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout) for j in range(blocks))
        self.attn = nn.ModuleList(AttnBlock(cout) for _ in range(blocks if attn else 0))

    def blocks(self, h: Tensor) -> Tensor:
        for j, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[j](h)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """[B, 3, H, W] -> moments [B, 2 z, H/f, W/f] (mean and logvar stacked on channels)."""

    def __init__(self, cfg: KLConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = cfg.ch
        for i, cout in enumerate(widths):
            level = _Level(cin, cout, cfg.num_res_blocks, i in cfg.encoder_attn_levels)
            if i != len(widths) - 1:
                level.downsample = Downsample(cout)
            self.down.append(level)
            cin = cout
        self.mid = _Mid(cin)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level.blocks(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """z [B, z, h, w] -> image [B, 3, h f, w f]. `up[i]` is level i (0 = full resolution), run last to first."""

    def __init__(self, cfg: KLConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        cin = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = _Mid(cin)
        levels: list[_Level] = []
        for i in reversed(range(len(widths))):
            level = _Level(cin, widths[i], cfg.num_res_blocks + 1, i in cfg.decoder_attn_levels)
            if i != 0:
                level.upsample = Upsample(widths[i])
            levels.insert(0, level)  # checkpoints index levels by resolution, not by run order
            cin = widths[i]
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level.blocks(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """LDM KL autoencoder as a `LatentCodec`; state-dict keys match the public checkpoints.

    encode: [B, 3, H, W] -> [B, C, H/f, W/f] = scale * (z - shift), with z the posterior sample
    (`sample_posterior`) or mean; decode undoes the scaling first. Frozen by design (see the
    module docstring): call it under `torch.no_grad()`.
    """

    def __init__(self, cfg: KLConfig):
        super().__init__()
        if any(c % 32 for c in [cfg.ch, *(cfg.ch * m for m in cfg.ch_mult)]):
            raise ValueError(f"GroupNorm(32) needs every width divisible by 32: ch={cfg.ch}, ch_mult={cfg.ch_mult}")
        self.cfg = cfg
        self.downsample = 2 ** (len(cfg.ch_mult) - 1)
        self.latent_channels = cfg.embed_dim if cfg.use_quant_conv else cfg.z_channels
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1) if cfg.use_quant_conv else None

    def moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """[B, 3, H, W] -> posterior (mean, logvar), each [B, C, H/f, W/f], unscaled."""
        _check_divisible(x, self.downsample)
        h = self.encoder(x.to(self.encoder.conv_in.weight.dtype))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # LDM's clamp; keeps exp() finite

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """[B, 3, H, W] in [-1, 1] -> latents [B, C, H/f, W/f]; noise (if sampled) from `generator`."""
        mean, logvar = self.moments(x)
        z = mean
        if self.cfg.sample_posterior:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * eps
        return self.cfg.scale * (z - self.cfg.shift)

    def decode(self, z: Tensor) -> Tensor:
        """Latents [B, C, h, w] -> images [B, 3, h f, w f], roughly in [-1, 1]."""
        z = (z / self.cfg.scale + self.cfg.shift).to(self.decoder.conv_in.weight.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


# --- choosing a codec from a family config -----------------------------------------------------

@dataclass(kw_only=True)
class VAEConfig:
    """Which codec a family uses.

    kind: "patch" -> PatchVAE(patch) (no weights; the tiny preset), or
          "kl"    -> AutoencoderKL(kl); `kl` None means FLUX.1's ae (`flux_vae_config()`), so
                     `--set model.vae.kind=kl` alone gives a loadable FLUX-shaped codec.
    """

    kind: Literal["patch", "kl"] = "patch"
    patch: int = 2
    kl: KLConfig | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("patch", "kl"):
            raise ValueError(f"unknown vae kind {self.kind!r}; known: patch, kl")
        if self.patch < 1:
            raise ValueError(f"patch must be >= 1, got {self.patch}")


def build_codec(cfg: VAEConfig) -> PatchVAE | AutoencoderKL:
    """The codec named by `cfg.kind`, built on the current default device (meta works)."""
    if cfg.kind == "patch":
        return PatchVAE(cfg.patch)
    if cfg.kind == "kl":
        return AutoencoderKL(cfg.kl if cfg.kl is not None else flux_vae_config())
    raise ValueError(f"unknown vae kind {cfg.kind!r}; known: patch, kl")


__all__ = [
    "LatentCodec", "PatchVAE", "KLConfig", "AutoencoderKL", "VAEConfig", "build_codec",
    "flux_vae_config", "kl16_config",
]
