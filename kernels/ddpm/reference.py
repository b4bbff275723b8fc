"""Pure-torch reference of `ddpm_loss` (MAR's diffusion-head loss). Shapes: N tokens, C channels."""
from __future__ import annotations

import math

import torch

from reca.kernels.ddpm.schedule import DDPMSchedule


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2).square() * torch.exp(-logvar2))


def _cdf_logit(x):
    """improved-diffusion's approximate normal CDF is 0.5 (1 + tanh(z)) = sigmoid(2 z); this is 2 z."""
    return 2.0 * math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    """log-likelihood of x under a Gaussian discretised into 255 bins over [-1, 1] (the t == 0 decoder).

    improved-diffusion's function, evaluated without its cancellations: 1 - cdf as sigmoid(-2z)
    and the bin mass on the tail nearer the value. Its literal form (1 - 0.5 (1 + tanh z), a
    difference of two CDFs near 1) loses ~1e-16 absolute even in float64, i.e. 1e-4 relative on
    the masses down to the 1e-12 clamp, and rounds them to the clamp in float32.
    """
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    plus = _cdf_logit(inv_stdv * (centered + 1.0 / 255.0))
    minus = _cdf_logit(inv_stdv * (centered - 1.0 / 255.0))
    cdf_plus = torch.sigmoid(plus)
    one_minus_cdf_min = torch.sigmoid(-minus)
    cdf_delta = torch.where(minus > 0, one_minus_cdf_min - torch.sigmoid(-plus), cdf_plus - torch.sigmoid(minus))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log(one_minus_cdf_min.clamp(min=1e-12))
    log_cdf_delta = torch.log(cdf_delta.clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def ddpm_loss_ref(
    model_out: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    schedule: DDPMSchedule,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Learned-sigma DDPM loss: mse(eps) + vb, step by step as improved-diffusion / MAR compute it.

    model_out [N, 2C] (epsilon prediction, then the variance interpolation v in [-1, 1]),
    x0, noise [N, C], t [N] int in [0, num_steps), mask [N] bool (None = all tokens).
    Per token: mean_C (noise - eps_pred)^2 + vb, vb = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))
    in bits averaged over C for t > 0, the discretised-Gaussian decoder NLL in bits at t == 0.
    The vb term sees the epsilon prediction detached (it trains only the variance; MAR's
    `frozen_out`); pred_xstart is not clipped (MAR: clip_denoised=False). MSE loss type, no
    rescaling (MAR's `create_diffusion(timestep_respacing="", noise_schedule="cosine")`).
    reduction "mean": mean over the selected tokens (0 when none: MAR's masked mean would give
    nan), "none": [N] per-token losses, 0 at unselected tokens. Computed in model_out's dtype
    promoted to at least float32, with the schedule's tables in that dtype.
    """
    dtype = torch.promote_types(model_out.dtype, torch.float32)
    C = x0.shape[-1]
    eps_pred, v = model_out.to(dtype).split(C, dim=-1)
    x0, noise = x0.to(dtype), noise.to(dtype)
    sched = schedule.to(device=model_out.device, dtype=dtype)

    def at(table):
        return table[t].unsqueeze(-1)

    x_t = at(sched.sqrt_alphas_cumprod) * x0 + at(sched.sqrt_one_minus_alphas_cumprod) * noise
    true_mean = at(sched.posterior_mean_coef1) * x0 + at(sched.posterior_mean_coef2) * x_t
    true_log_var = at(sched.posterior_log_variance_clipped)
    frac = (v + 1.0) / 2.0
    model_log_var = frac * at(sched.log_betas) + (1.0 - frac) * true_log_var
    pred_xstart = at(sched.sqrt_recip_alphas_cumprod) * x_t - at(sched.sqrt_recipm1_alphas_cumprod) * eps_pred.detach()
    model_mean = at(sched.posterior_mean_coef1) * pred_xstart + at(sched.posterior_mean_coef2) * x_t

    kl = _normal_kl(true_mean, true_log_var, model_mean, model_log_var).mean(-1) / math.log(2.0)
    nll = -_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var).mean(-1) / math.log(2.0)
    vb = torch.where(t == 0, nll, kl)
    loss = (noise - eps_pred).square().mean(-1) + vb
    if mask is not None:
        loss = loss * mask.to(dtype)
    if reduction == "none":
        return loss
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    count = loss.new_tensor(loss.shape[0]) if mask is None else mask.sum().to(dtype)
    return loss.sum() / count.clamp_min(1)


# ---------------------------------------------------------------------------------------------
# Cross-entropy of a linear head (LM head / unified-vocabulary head).
