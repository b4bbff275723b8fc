"""Small shared parts of the families: position tables, timestep embedding, connector MLP, patchify."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(kw_only=True)
class Qwen2Shape:
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 344
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position: int = 32768

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "max_position"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads {self.num_heads} must divide hidden_size {self.hidden_size}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads {self.num_kv_heads} must divide num_heads {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:  # rotary embeddings rotate pairs of channels
            raise ValueError(f"head width hidden_size / num_heads = {self.hidden_size // self.num_heads} must be even")
        for name in ("rope_theta", "rms_norm_eps"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be finite and > 0, got {getattr(self, name)}")

    def hf_config(self, **extra):
        """The transformers `Qwen2Config` of this shape (SDPA attention unless `extra` says otherwise)."""
        from transformers import Qwen2Config

        kw = dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                  num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
                  num_key_value_heads=self.num_kv_heads, rope_theta=self.rope_theta, rms_norm_eps=self.rms_norm_eps,
                  max_position_embeddings=self.max_position, attn_implementation="sdpa")
        return Qwen2Config(**{**kw, **extra})


def sincos_2d(dim: int, grid: int, step: float = 1.0) -> torch.Tensor:
    """Fixed 2-D sine-cosine position table [grid * grid, dim] (half the channels per axis).

    Cell i sits at coordinate i * step: two grids over the same image (visual prompt, latent
    tokens) share one frame when `step` is each cell's size in a common unit."""
    if dim % 4:
        raise ValueError(f"sin-cos 2-D embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64) * step
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")

    def axis(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([axis(yy), axis(xx)], dim=1).float()


class TimestepEmbedder(nn.Module):
    """Timestep t [B] -> [B, D]: cos/sin features of `scale * t`, then an MLP (DiT / MAR style).

    scale 1000 for flow time t in [0, 1] (BAGEL); 1 for integer DDPM steps (MAR's head)."""

    def __init__(self, dim: int, freq_dim: int = 256, scale: float = 1000.0):
        super().__init__()
        self.freq_dim, self.scale = freq_dim, scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (t.float() * self.scale)[:, None] * freqs[None]
        feats = torch.cat([args.cos(), args.sin()], dim=-1)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


def has_dropout(module: nn.Module) -> bool:
    """Whether a block draws random numbers in training: an `nn.Dropout` with p > 0, or a
    transformers attention with a non-zero `attention_dropout` / `dropout` rate."""
    for m in module.modules():
        if isinstance(m, nn.Dropout) and m.p > 0:
            return True
        for name in ("attention_dropout", "dropout"):
            rate = getattr(m, name, 0.0)
            if isinstance(rate, float) and rate > 0:
                return True
    return False


def checkpoint_kwargs(module: nn.Module, device_type: str = "cuda", captured: bool = False) -> dict:
    """Non-reentrant checkpointing whose recomputation sees the forward's random draws.

    A block that draws no random numbers needs nothing. A block with dropout rewinds the
    generator for its recomputation (`preserve_rng_state`), except in a step captured as a CUDA
    graph (`captured`, on CUDA): there it saves every op ATen tags `nondeterministic_seeded`
    instead of recomputing it (selective checkpointing: a dropout's output and mask, an
    attention's output and philox seed), so the backward never replays the generator. Why: the
    rewind reads and resets the CUDA generator, and compiled blocks turn it into graph-safe
    generator states of their own, which a CUDA graph captured outside the compiler does not know
    (harmon-1.5b's fast step failed so on the H200, 2026-12-04: "Attempt to increase offset for a
    CUDA generator not in capture mode"). The price is those saved tensors, in such blocks only
    and only in a captured step: harmon-1.5b's 48 images a micro-batch need 144 GiB on one GPU
    with them, 88 GiB without (`reca bench memory`; README "Memory"). On the CPU, dropout is an
    in-place `bernoulli_` whose result is then scaled in place, which selective checkpointing
    cannot keep, and nothing is captured: the generator is always rewound there."""
    kwargs = {"use_reentrant": False, "preserve_rng_state": False}
    if not has_dropout(module):
        return kwargs
    if device_type != "cuda" or not captured:
        return {**kwargs, "preserve_rng_state": True}
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return {**kwargs, "context_fn": functools.partial(create_selective_checkpoint_contexts, _save_random_ops)}


def _save_random_ops(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    if torch.Tag.nondeterministic_seeded in op.tags:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def freeze_except(model: nn.Module, modules: tuple[str, ...], trainable: tuple[str, ...]) -> None:
    """`requires_grad` per named child: only those in `trainable` learn (the config's split)."""
    unknown = set(trainable) - set(modules)
    if unknown:
        raise ValueError(f"model.trainable names unknown modules {sorted(unknown)}; known: {', '.join(modules)}")
    for name in modules:
        getattr(model, name).requires_grad_(name in trainable)


class MLPConnector(nn.Module):
    """fc1 -> GELU(tanh) -> fc2: understanding features [.., Din] -> LLM width [.., D]."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def patchify(z: torch.Tensor, p: int) -> torch.Tensor:
    """Latents [B, C, H, W] -> tokens [B, (H/p)(W/p), C p p] in row-major patch order."""
    b, c, h, w = z.shape
    z = z.reshape(b, c, h // p, p, w // p, p)
    return z.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(x: torch.Tensor, p: int, channels: int, grid: int) -> torch.Tensor:
    """Inverse of `patchify` for a square grid: [B, grid^2, C p p] -> [B, C, grid p, grid p]."""
    b = x.shape[0]
    x = x.reshape(b, grid, grid, channels, p, p)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, channels, grid * p, grid * p)


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's `DropPath`): in train mode a residual branch is zeroed
    for a sample with probability `p` and scaled by 1 / (1 - p) otherwise; identity in eval mode
    or at p = 0. `p` is an attribute, not a parameter: a release's config may set it after build."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p <= 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"
