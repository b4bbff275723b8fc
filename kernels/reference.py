"""Pure-torch references of every fused op: the `torch` backend, and the ground truth that the
Triton kernels' tests and benchmarks import (nobody re-types them).

Shapes: B batch, S sequence, D model width, V vocabulary, Nv visual tokens in the batch,
T tokens per sample, C channels per token.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from reca.kernels.schedule import DDPMSchedule


def _acc(x: torch.Tensor) -> torch.Tensor:
    """At least float32: bf16/fp16 upcast, float64 stays float64 (the tests' ground truth)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by `scale` (Harmon: 0.1 on the visual prompt)."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    return x if scale == 1.0 else _ScaleGrad.apply(x, scale)


def condition_ref(
    input_ids: torch.Tensor,
    embed_weight: torch.Tensor,
    visual: torch.Tensor,
    image_token_id: int,
    grad_scale: float = 1.0,
    check: bool = False,
) -> torch.Tensor:
    """Token embeddings with the visual prompt written over the image placeholders.

    input_ids [B, S] int, embed_weight [V, D], visual [Nv, D] -> [B, S, D].
    Placeholder positions (`input_ids == image_token_id`) take the rows of `visual` in row-major
    order (`masked_scatter` semantics); `visual` receives `grad_scale` times their gradient.
    `check=True` verifies that the placeholder count equals Nv (a host sync: off in the step).
    """
    is_image = input_ids == image_token_id
    if check:
        n = int(is_image.sum())
        if n != visual.shape[0]:
            raise ValueError(f"{n} image placeholders but {visual.shape[0]} visual tokens")
    embeds = F.embedding(input_ids, embed_weight)
    visual = scale_grad(visual, grad_scale).to(embeds.dtype)
    return embeds.masked_scatter(is_image.unsqueeze(-1), visual)


def flow_matching_noise_ref(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Rectified-flow interpolation. x0, noise [B, T, C], t [B] -> x_t = (1 - t) x0 + t noise."""
    t = t.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * noise


def flow_matching_loss_ref(
    pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """MSE of the predicted velocity against noise - x0.

    pred, x0, noise [B, T, C], mask [B, T] bool (None = all tokens) -> scalar: the mean over all
    elements of the selected tokens (0 when none is selected).
    """
    err = (_acc(pred) - (_acc(noise) - _acc(x0))).square()
    if mask is None:
        return err.mean()
    per_token = err.sum(-1)
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / (m.sum() * pred.shape[-1]).clamp_min(1)


# ---------------------------------------------------------------------------------------------
# DDPM loss of the MAR diffusion head (improved-diffusion: MSE on epsilon + variational bound).


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


def linear_cross_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T + bias, targets), the logits materialised (reference only).

    hidden [N, D], weight [V, D], bias [V] or None, targets [N] int -> scalar ("mean", "sum")
    or [N] ("none", 0 at ignored rows). Computed in float32 (float64 stays float64).
    "mean" divides by the number of non-ignored rows and gives 0 when every row is ignored
    (torch's cross_entropy gives nan there; a fully-padded micro-batch must not poison the step).
    """
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    logits = F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    losses = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    count = (targets != ignore_index).sum().to(dtype)
    return losses.sum() / count.clamp_min(1)
