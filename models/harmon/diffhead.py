"""MAR's diffusion head: a per-token AdaLN MLP that denoises one latent token given a condition z.

Names follow MAR's `SimpleMLPAdaLN` (Harmon checkpoints: `mar.diffloss.net.*`), so loading is a
prefix change. The loss is improved-diffusion's learned-sigma DDPM (1000 steps, cosine), computed
by the model's `KernelOps.ddpm_loss`; sampling is ancestral DDPM on a respaced schedule (MAR's
`create_diffusion(timestep_respacing=str(steps))`). Shapes: N tokens (B T times the diffusion
batch multiplier), C latent channels, W head width, Z condition width.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from reca.kernels import DDPMSchedule, cosine_schedule
from reca.models.layers import TimestepEmbedder


@dataclass(kw_only=True)
class DiffHeadShape:
    width: int = 256  # MAR-huge / Harmon-1.5B: 1536; Harmon-0.5B: 1024
    depth: int = 2  # residual blocks: 12 / 6
    batch_mul: int = 4  # each token is noised this many times per step, independent t and noise
    num_steps: int = 1000  # training diffusion steps (cosine schedule)
    sample_steps: int = 20  # respaced DDPM steps for previews (MAR samples with 100)
    freq_dim: int = 256

    def __post_init__(self) -> None:
        for name in ("width", "depth", "batch_mul", "num_steps", "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sample_steps > self.num_steps:  # respaced from the training steps: never more of them
            raise ValueError(f"sample_steps {self.sample_steps} must be <= num_steps {self.num_steps}")
        if self.freq_dim < 2 or self.freq_dim % 2:  # cos and sin halves of the timestep features
            raise ValueError(f"freq_dim must be even and >= 2, got {self.freq_dim}")


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class ResBlock(nn.Module):
    """x + gate * MLP(modulate(LN(x), shift, scale)); shift/scale/gate from the embedding y."""

    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class AdaLNMLP(nn.Module):
    """MAR's SimpleMLPAdaLN: (x_t [N, C], t [N], z [N, Z]) -> [N, 2C] (epsilon, variance interpolation)."""

    def __init__(self, channels: int, cond_dim: int, shape: DiffHeadShape):
        super().__init__()
        w = shape.width
        self.time_embed = TimestepEmbedder(w, shape.freq_dim, scale=1.0)  # integer DDPM steps
        self.cond_embed = nn.Linear(cond_dim, w)
        self.input_proj = nn.Linear(channels, w)
        self.res_blocks = nn.ModuleList(ResBlock(w) for _ in range(shape.depth))
        self.final_layer = FinalLayer(w, 2 * channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MAR's init: xavier linears, N(0, 0.02) timestep MLP, zero AdaLN and output layers."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for lin in (self.time_embed.mlp[0], self.time_embed.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        zero = [b.adaLN_modulation[-1] for b in self.res_blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                    self.final_layer.linear]
        for lin in zero:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = self.input_proj(x.to(self.input_proj.weight.dtype))
        y = self.time_embed(t) + self.cond_embed(z)
        for block in self.res_blocks:
            h = block(h, y)  # activation checkpointing is applied from outside (engine/compile.py)
        return self.final_layer(h, y)


def respaced_schedule(base: DDPMSchedule, steps: int) -> tuple[DDPMSchedule, torch.Tensor]:
    """improved-diffusion's `space_timesteps(T, str(steps))`: `steps` evenly spaced original steps
    and the schedule whose betas make the kept alpha-bars exact. Returns (tables [steps], the
    original step of each index [steps], what the head is told)."""
    n = base.num_steps
    steps = max(1, min(steps, n))
    stride = (n - 1) / max(steps - 1, 1)
    kept = sorted({round(i * stride) for i in range(steps)})
    ac = base.alphas_cumprod.double().cpu()[kept]
    prev = torch.cat([ac.new_ones(1), ac[:-1]])
    betas = 1.0 - ac / prev
    post_var = betas * (1.0 - prev) / (1.0 - ac)
    post_log = torch.log(torch.cat([post_var[1:2], post_var[1:]])) if len(kept) > 1 else torch.log(betas)
    coef1 = betas * prev.sqrt() / (1.0 - ac)
    tables = dict(
        betas=betas, log_betas=betas.log(), alphas_cumprod=ac, alphas_cumprod_prev=prev,
        sqrt_alphas_cumprod=ac.sqrt(), sqrt_one_minus_alphas_cumprod=(1.0 - ac).sqrt(),
        sqrt_recip_alphas_cumprod=(1.0 / ac).sqrt(), sqrt_recipm1_alphas_cumprod=(1.0 / ac - 1.0).sqrt(),
        posterior_variance=post_var, posterior_log_variance_clipped=post_log, posterior_mean_coef1=coef1,
        posterior_mean_coef2=(1.0 - prev) * (1.0 - betas).sqrt() / (1.0 - ac),
        mean_eps_coef=coef1 * (1.0 / ac - 1.0).sqrt(),
    )
    return DDPMSchedule(**{k: v.float() for k, v in tables.items()}), torch.tensor(kept)


class DiffLoss(nn.Module):
    """Holds the head as `net` (checkpoint names `diffloss.net.*`); loss and sampling around it."""

    def __init__(self, channels: int, cond_dim: int, shape: DiffHeadShape):
        super().__init__()
        self.shape = shape
        self.channels = channels
        self.net = AdaLNMLP(channels, cond_dim, shape)
        # Tables are built on first use, not here: a model built on the meta device (`reca info`)
        # must not create them there.
        self._on: dict[tuple, tuple[DDPMSchedule, torch.Tensor | None]] = {}

    def tables(self, device: torch.device, steps: int | None = None) -> tuple[DDPMSchedule, torch.Tensor | None]:
        """The training schedule (steps None) or a respaced one, on `device`, copied once and cached."""
        key = (str(device), steps)
        if key not in self._on:
            base = cosine_schedule(self.shape.num_steps, device="cpu")
            if steps is None:
                self._on[key] = (base.to(device=device), None)
            else:
                sched, kept = respaced_schedule(base, steps)
                self._on[key] = (sched.to(device=device), kept.to(device))
        return self._on[key]

    def loss(self, z: torch.Tensor, x0: torch.Tensor, mask: torch.Tensor, ops, generator=None):
        """z [B, T, Z] conditions, x0 [B, T, C] clean tokens, mask [B, T] bool (True = predicted)
        -> scalar: the DDPM loss averaged over the masked tokens, each repeated `batch_mul` times
        with its own t and noise (MAR's `forward_loss`). Fixed shapes: every token is run through
        the head; the mask selects the loss terms."""
        mul = self.shape.batch_mul
        z = z.flatten(0, 1).repeat(mul, 1)
        x0 = x0.flatten(0, 1).float().repeat(mul, 1)
        mask = mask.flatten().repeat(mul)
        sched, _ = self.tables(x0.device)
        t = torch.randint(0, sched.num_steps, (x0.shape[0],), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        x_t = sched.sqrt_alphas_cumprod[t, None] * x0 + sched.sqrt_one_minus_alphas_cumprod[t, None] * noise
        out = self.net(x_t, t, z)
        return ops.ddpm_loss(out, x0, noise, t, sched, mask)

    @torch.no_grad()
    def sample(self, z: torch.Tensor, steps: int, generator=None, temperature: float = 1.0,
               clip: float = 0.0) -> torch.Tensor:
        """Ancestral DDPM with learned variance: z [N, Z] -> tokens [N, C] (float32). `clip` > 0
        clamps each step's x0 prediction to [-clip, clip] (MAR: off). Why it exists: with the
        cosine schedule the first step divides by sqrt(alpha) ~ 0.03, so an under-trained head's
        epsilon error is amplified ~30x per early step and the chain diverges (seen on the tiny
        preset after 1,200 steps); a converged head predicts epsilon there almost exactly."""
        sched, kept = self.tables(z.device, steps)
        x = torch.randn(z.shape[0], self.channels, device=z.device, generator=generator)
        for i in reversed(range(sched.num_steps)):
            t = kept[i].expand(z.shape[0])
            eps, v = self.net(x, t, z).float().split(self.channels, dim=-1)
            frac = (v + 1) / 2
            log_var = frac * sched.log_betas[i] + (1 - frac) * sched.posterior_log_variance_clipped[i]
            x0 = sched.sqrt_recip_alphas_cumprod[i] * x - sched.sqrt_recipm1_alphas_cumprod[i] * eps
            if clip > 0:
                x0 = x0.clamp(-clip, clip)
            x = sched.posterior_mean_coef1[i] * x0 + sched.posterior_mean_coef2[i] * x
            if i > 0:
                noise = torch.randn(x.shape, device=x.device, generator=generator)
                x = x + (0.5 * log_var).exp() * noise * temperature
        return x
