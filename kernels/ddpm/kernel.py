"""Learned-sigma DDPM loss of the MAR diffusion head, forward and backward in one kernel.

Reference: `reca.kernels.ddpm.reference.ddpm_loss_ref` (improved-diffusion's steps, one tensor each).
One program takes BLOCK_N tokens x C channels: it reads model_out [N, 2C], x0, noise and t once,
gathers the schedule tables at t, and writes the per-token loss and d loss / d model_out (both
halves). Backward is a scale by grad_output.

Algebra used instead of improved-diffusion's sequence (same value, better conditioned):
the posterior mean minus the model mean is `mean_eps_coef[t] * (eps_pred - eps)` (x_t and
pred_xstart cancel; computing them costs a cancellation of terms ~1e4 at large t), and the
decoder's CDF difference at t == 0 is taken on the tail nearer the value (sigmoid form), so
fp32 matches the float64 reference where improved-diffusion's fp32 would round it to 0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from reca.kernels import utils
from reca.kernels.ddpm.reference import ddpm_loss_ref  # noqa: F401  (the reference, beside the kernel)
from reca.kernels.ddpm.schedule import DDPMSchedule, cosine_schedule  # noqa: F401

@triton.jit
def _cdf_parts(x, ACC: tl.constexpr):
    """improved-diffusion's tanh-approximate normal CDF as sigmoid(2y): (2y, d(2y)/dx)."""
    # Constants built in ACC: a bare float literal is an fp32 constant in Triton.
    k = tl.full([], 1.5957691216057308, ACC)  # 2 sqrt(2 / pi)
    a = tl.full([], 0.044715, ACC)
    y2 = k * (x + a * x * x * x)
    dy2 = k * (1.0 + 3.0 * a * x * x)
    return y2, dy2


@triton.jit
def _ddpm_fwd_kernel(
    mo_ptr, x0_ptr, noise_ptr, t_ptr, mask_ptr, weight_ptr,
    log_betas_ptr, post_log_var_ptr, mean_coef_ptr,
    loss_ptr, grad_ptr,
    N, C, stride_mo,
    HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < N
    cmask = cols < C
    m2 = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    t = tl.load(t_ptr + rows, mask=rmask, other=1)
    if HAS_MASK:
        sel = rmask & (tl.load(mask_ptr + rows, mask=rmask, other=0) != 0)
    else:
        sel = rmask
    # Per-token weight of the gradient: 1 (reduction "none") or 1 / selected-count ("mean").
    w = tl.where(sel, tl.load(weight_ptr).to(ACC), 0.0)

    mo_off = rows64[:, None] * stride_mo + cols[None, :]
    io_off = rows64[:, None] * C + cols[None, :]
    eps_pred = tl.load(mo_ptr + mo_off, mask=m2, other=0.0).to(ACC)
    v = tl.load(mo_ptr + mo_off + C, mask=m2, other=0.0).to(ACC)
    x0 = tl.load(x0_ptr + io_off, mask=m2, other=0.0).to(ACC)
    eps = tl.load(noise_ptr + io_off, mask=m2, other=0.0).to(ACC)
    max_log = tl.load(log_betas_ptr + t, mask=rmask, other=0.0).to(ACC)[:, None]
    min_log = tl.load(post_log_var_ptr + t, mask=rmask, other=0.0).to(ACC)[:, None]
    coef = tl.load(mean_coef_ptr + t, mask=rmask, other=0.0).to(ACC)[:, None]

    d = eps_pred - eps
    frac = (v + 1.0) * 0.5
    log_var = frac * max_log + (1.0 - frac) * min_log
    dlogvar_dv = 0.5 * (max_log - min_log)
    dm = coef * d  # posterior mean - model mean (= x0 - model mean at t == 0)

    # t > 0: KL(N(true_mean, exp(min_log)) || N(model_mean, exp(log_var))), d/d log_var.
    e_ratio = tl.exp(min_log - log_var)
    e_inv = tl.exp(-log_var)
    kl = 0.5 * (-1.0 + log_var - min_log + e_ratio + dm * dm * e_inv)
    dkl = 0.5 * (1.0 - e_ratio - dm * dm * e_inv)

    # t == 0: -log of the discretised Gaussian (bin half-width 1/255), log_scale = log_var / 2.
    inv_s = tl.exp(-0.5 * log_var)
    half_bin = tl.full([], 1.0 / 255.0, ACC)
    p_in = inv_s * (dm + half_bin)
    m_in = inv_s * (dm - half_bin)
    yp, dyp = _cdf_parts(p_in, ACC)
    ym, dym = _cdf_parts(m_in, ACC)
    cdf_p = tl.sigmoid(yp)
    sf_m = tl.sigmoid(-ym)  # 1 - cdf(m_in)
    pdf_p = cdf_p * tl.sigmoid(-yp) * dyp
    pdf_m = tl.sigmoid(ym) * sf_m * dym
    delta = tl.where(m_in > 0, sf_m - tl.sigmoid(-yp), cdf_p - tl.sigmoid(ym))
    lo_branch = x0 < -0.999
    hi_branch = x0 > 0.999
    val = tl.where(lo_branch, cdf_p, tl.where(hi_branch, sf_m, delta))
    # d val / d log_scale (d p_in / d log_scale = -p_in); 0 where the 1e-12 clamp is active.
    dval = tl.where(lo_branch, -pdf_p * p_in, tl.where(hi_branch, pdf_m * m_in, m_in * pdf_m - p_in * pdf_p))
    clamped = val < 1e-12
    nll = -tl.log(tl.maximum(val, 1e-12))
    dnll = tl.where(clamped, 0.0, -dval / tl.where(clamped, 1.0, val)) * 0.5  # per log_var

    is_t0 = (t == 0)[:, None]
    inv_ln2_c = tl.full([], 1.4426950408889634, ACC) / C
    vb = tl.where(is_t0, nll, kl)
    dvb = tl.where(is_t0, dnll, dkl) * dlogvar_dv
    per_elem = tl.where(m2, d * d / C + vb * inv_ln2_c, 0.0)
    loss = tl.where(sel, tl.sum(per_elem, axis=1), 0.0)
    tl.store(loss_ptr + rows, loss, mask=rmask)

    wc = w[:, None]
    g_eps = 2.0 * d / C * wc
    g_v = dvb * inv_ln2_c * wc
    g_ty = grad_ptr.dtype.element_ty
    tl.store(grad_ptr + rows64[:, None] * (2 * C) + cols[None, :], g_eps.to(g_ty), mask=m2)
    tl.store(grad_ptr + rows64[:, None] * (2 * C) + C + cols[None, :], g_v.to(g_ty), mask=m2)


def ddpm_fwd(model_out, x0, noise, t, schedule: DDPMSchedule, mask, reduction: str):
    """model_out [N, 2C] (unit stride in C), x0, noise [N, C] contiguous, t [N], mask [N] bool
    or None -> (per-token loss [N] (0 at unselected tokens), d reduced loss / d model_out [N, 2C])."""
    N, C = x0.shape
    device = x0.device
    acc = utils.acc_dtype(model_out.dtype)
    if reduction == "mean":
        count = torch.full((), float(N), dtype=acc, device=device) if mask is None else mask.sum().to(acc)
        weight = 1.0 / count.clamp_min(1)
    else:
        weight = torch.ones((), dtype=acc, device=device)
    loss = utils.empty((N,), acc, device)
    grad = utils.empty((N, 2 * C), model_out.dtype, device)
    block_c = utils.next_pow2(C)
    block_n = max(1, min(utils.pick(2048, 1024) // block_c, utils.next_pow2(N)))
    if N:
        _ddpm_fwd_kernel[(triton.cdiv(N, block_n),)](
            model_out, x0, noise, t, mask, weight,
            schedule.log_betas, schedule.posterior_log_variance_clipped, schedule.mean_eps_coef,
            loss, grad, N, C, model_out.stride(0),
            HAS_MASK=mask is not None, BLOCK_N=block_n, BLOCK_C=block_c, ACC=utils.tl_acc(model_out.dtype),
            num_warps=4,
        )
    return loss, grad, weight


class DDPMLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, model_out, x0, noise, t, schedule, mask, reduction):
        loss, grad, weight = ddpm_fwd(model_out, x0, noise, t, schedule, mask, reduction)
        ctx.save_for_backward(grad)
        ctx.reduction = reduction
        if reduction == "none":
            return loss
        return loss.sum() * weight

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        go = grad_output.to(grad.dtype)
        g = grad * (go[:, None] if ctx.reduction == "none" else go)
        return g, None, None, None, None, None, None


def ddpm_loss(
    model_out: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    schedule: DDPMSchedule,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Learned-sigma DDPM loss (MSE on epsilon + variational bound in bits), fused with its gradient.

    model_out [N, 2C] (epsilon prediction, then v in [-1, 1]: log_var = frac log(beta_t)
    + (1 - frac) posterior_log_variance_clipped_t, frac = (v + 1) / 2), x0, noise [N, C],
    t [N] int in [0, num_steps), schedule from `cosine_schedule()` (move it to the device once:
    `schedule.to(device)`), mask [N] bool (None = all tokens).
    reduction "mean" -> scalar, the mean over selected tokens (0 when none); "none" -> [N]
    (0 at unselected tokens). Values in fp32 (fp64 for fp64 model_out). The gradient reaches
    model_out only (both halves; the vb term sees eps_pred detached, as MAR): x0, noise, t
    and the schedule get none. Semantics: `reca.kernels.ddpm.reference.ddpm_loss_ref`.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if model_out.shape[-1] != 2 * x0.shape[-1]:
        raise ValueError(f"model_out has {model_out.shape[-1]} channels, expected 2 x {x0.shape[-1]}")
    C = x0.shape[-1]
    if model_out.stride(-1) != 1:
        model_out = model_out.contiguous()
    model_out = model_out.reshape(-1, 2 * C)
    x0, noise = x0.reshape(-1, C).contiguous(), noise.reshape(-1, C).contiguous()
    t = t.reshape(-1).contiguous()
    if mask is not None:
        mask = (mask if mask.dtype == torch.bool else mask != 0).reshape(-1).contiguous()
    schedule = schedule.to(device=model_out.device)
    return DDPMLoss.apply(model_out, x0, noise, t, schedule, mask, reduction)
