"""DDPM noise-schedule tables (the MAR diffusion head: 1000 steps, cosine schedule, learned sigma).

Pure torch, no triton: both `ddpm_loss_ref` and the Triton `ddpm_loss` read these tables.
Formulas follow improved-diffusion's `gaussian_diffusion.py` (Nichol & Dhariwal 2021), which
MAR's diffusion package reuses: computed in float64, stored in float32 by default.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class DDPMSchedule:
    """Per-timestep tables, each [num_steps]. `t` indexes them directly."""

    betas: torch.Tensor
    log_betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    # posterior_mean_coef1 * sqrt_recipm1_alphas_cumprod: the posterior mean minus the model mean is
    # this times (eps_pred - eps) exactly, which the fused kernel uses instead of going through
    # x_t and pred_xstart (a cancellation of two terms ~1e4 at large t).
    mean_eps_coef: torch.Tensor

    @property
    def num_steps(self) -> int:
        return self.betas.shape[0]

    def to(self, device=None, dtype=None) -> "DDPMSchedule":
        """The same tables on `device` / in `dtype`; returns self when nothing changes (move it
        once, outside the step: a host-to-device copy per call would be a sync)."""
        first = self.betas
        if (device is None or torch.device(device) == first.device) and (dtype is None or dtype == first.dtype):
            return self
        return DDPMSchedule(**{f.name: getattr(self, f.name).to(device=device, dtype=dtype) for f in fields(self)})


def cosine_schedule(num_steps: int = 1000, max_beta: float = 0.999, s: float = 0.008,
                    dtype: torch.dtype = torch.float32, device=None) -> DDPMSchedule:
    """Cosine schedule (alpha_bar(t) = cos^2((t + s) / (1 + s) * pi / 2)), betas clipped at max_beta."""

    def alpha_bar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = torch.tensor(
        [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)],
        dtype=torch.float64,
    )
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, 0)
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    # posterior_variance[0] is 0: the clipped log uses step 1's value there (as improved-diffusion).
    post_log_var = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    coef1 = betas * torch.sqrt(ac_prev) / (1.0 - ac)
    coef2 = (1.0 - ac_prev) * torch.sqrt(alphas) / (1.0 - ac)
    sqrt_recipm1 = torch.sqrt(1.0 / ac - 1.0)
    tables = dict(
        betas=betas,
        log_betas=torch.log(betas),
        alphas_cumprod=ac,
        alphas_cumprod_prev=ac_prev,
        sqrt_alphas_cumprod=torch.sqrt(ac),
        sqrt_one_minus_alphas_cumprod=torch.sqrt(1.0 - ac),
        sqrt_recip_alphas_cumprod=torch.sqrt(1.0 / ac),
        sqrt_recipm1_alphas_cumprod=sqrt_recipm1,
        posterior_variance=post_var,
        posterior_log_variance_clipped=post_log_var,
        posterior_mean_coef1=coef1,
        posterior_mean_coef2=coef2,
        mean_eps_coef=coef1 * sqrt_recipm1,
    )
    return DDPMSchedule(**{k: v.to(device=device, dtype=dtype) for k, v in tables.items()})
