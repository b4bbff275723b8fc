"""Rectified-flow ops: the noisy interpolation x_t and the velocity MSE with its gradient fused.

References: `reca.kernels.flow_matching.reference.flow_matching_noise_ref` / `flow_matching_loss_ref`.
Both are memory-bound: each kernel reads its inputs once and writes its outputs once. The loss
recomputes the target noise - x0 in registers (never stored) and writes d loss / d pred in the
forward pass, so backward is one scale by grad_output. Reductions (the loss, d x_t / d t) go
through per-program partial sums reduced by torch: deterministic, no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from reca.kernels import utils
from reca.kernels.flow_matching.reference import flow_matching_loss_ref, flow_matching_noise_ref  # noqa: F401


@triton.jit
def _fm_noise_fwd_kernel(x0_ptr, noise_ptr, t_ptr, out_ptr, L, BLOCK: tl.constexpr, ACC: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < L
    base = b.to(tl.int64) * L
    t = tl.load(t_ptr + b).to(ACC)
    x0 = tl.load(x0_ptr + base + offs, mask=m, other=0.0).to(ACC)
    n = tl.load(noise_ptr + base + offs, mask=m, other=0.0).to(ACC)
    tl.store(out_ptr + base + offs, ((1.0 - t) * x0 + t * n).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _fm_noise_bwd_kernel(
    g_ptr, x0_ptr, noise_ptr, t_ptr, gx0_ptr, gn_ptr, gt_partial_ptr, L, n_blocks,
    NEED_X0: tl.constexpr, NEED_NOISE: tl.constexpr, NEED_T: tl.constexpr,
    BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    b = tl.program_id(0)
    pid = tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < L
    base = b.to(tl.int64) * L
    t = tl.load(t_ptr + b).to(ACC)
    g = tl.load(g_ptr + base + offs, mask=m, other=0.0).to(ACC)
    if NEED_X0:
        tl.store(gx0_ptr + base + offs, ((1.0 - t) * g).to(gx0_ptr.dtype.element_ty), mask=m)
    if NEED_NOISE:
        tl.store(gn_ptr + base + offs, (t * g).to(gn_ptr.dtype.element_ty), mask=m)
    if NEED_T:
        x0 = tl.load(x0_ptr + base + offs, mask=m, other=0.0).to(ACC)
        n = tl.load(noise_ptr + base + offs, mask=m, other=0.0).to(ACC)
        tl.store(gt_partial_ptr + b * n_blocks + pid, tl.sum(g * (n - x0), axis=0))


@triton.jit
def _fm_loss_fwd_kernel(
    pred_ptr, x0_ptr, noise_ptr, mask_ptr, inv_denom_ptr, partial_ptr, grad_ptr, R, C,
    HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < R
    if HAS_MASK:
        rmask_sel = rmask & (tl.load(mask_ptr + rows, mask=rmask, other=0) != 0)
    else:
        rmask_sel = rmask
    m2 = rmask[:, None] & (cols < C)[None, :]
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    pred = tl.load(pred_ptr + offs, mask=m2, other=0.0).to(ACC)
    x0 = tl.load(x0_ptr + offs, mask=m2, other=0.0).to(ACC)
    n = tl.load(noise_ptr + offs, mask=m2, other=0.0).to(ACC)
    diff = tl.where(rmask_sel[:, None], pred - (n - x0), 0.0)
    tl.store(partial_ptr + pid, tl.sum(tl.sum(diff * diff, axis=1), axis=0))
    inv_denom = tl.load(inv_denom_ptr).to(ACC)
    tl.store(grad_ptr + offs, (2.0 * inv_denom * diff).to(grad_ptr.dtype.element_ty), mask=m2)


def _noise_block(L: int) -> int:
    return utils.pick(1024, max(16, min(utils.next_pow2(L), 4096)))


def flow_noise_fwd(x0, noise, t):
    """x0, noise [B, L] contiguous, t [B] -> x_t [B, L]."""
    B, L = x0.shape
    out = utils.empty((B, L), x0.dtype, x0.device)
    if x0.numel():
        block = _noise_block(L)
        _fm_noise_fwd_kernel[(B, triton.cdiv(L, block))](
            x0, noise, t, out, L, BLOCK=block, ACC=utils.tl_acc(x0.dtype), num_warps=4)
    return out


def flow_noise_bwd(g, x0, noise, t, need_x0, need_noise, need_t):
    B, L = g.shape
    block = _noise_block(L)
    n_blocks = triton.cdiv(L, block)
    gx0 = utils.empty((B, L), x0.dtype, g.device) if need_x0 else None
    gn = utils.empty((B, L), noise.dtype, g.device) if need_noise else None
    acc = utils.acc_dtype(x0.dtype)
    partial = utils.empty((B, n_blocks), acc, g.device) if need_t else None
    if g.numel():
        _fm_noise_bwd_kernel[(B, n_blocks)](
            g, x0, noise, t, gx0, gn, partial, L, n_blocks,
            NEED_X0=need_x0, NEED_NOISE=need_noise, NEED_T=need_t,
            BLOCK=block, ACC=utils.tl_acc(x0.dtype), num_warps=4)
    gt = None
    if need_t:
        gt = (partial.sum(1) if n_blocks else torch.zeros(B, dtype=acc, device=g.device)).to(t.dtype)
    return gx0, gn, gt


class FlowMatchingNoise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x0, noise, t):
        shape = x0.shape
        x0_, n_ = x0.reshape(shape[0], -1).contiguous(), noise.reshape(shape[0], -1).contiguous()
        t_ = t.contiguous()
        ctx.save_for_backward(x0_, n_, t_)
        return flow_noise_fwd(x0_, n_, t_).view(shape)

    @staticmethod
    def backward(ctx, g):
        x0, n, t = ctx.saved_tensors
        gx0, gn, gt = flow_noise_bwd(g.reshape(x0.shape).contiguous(), x0, n, t, *ctx.needs_input_grad[:3])
        shape = g.shape
        return (None if gx0 is None else gx0.view(shape), None if gn is None else gn.view(shape), gt)


def flow_matching_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Rectified-flow interpolation. x0, noise [B, T, C], t [B] -> x_t = (1 - t) x0 + t noise.

    Computed in fp32 (fp64 for fp64 inputs), one rounding to x0's dtype. Gradients for x0,
    noise and t, each only when it requires grad; t's is reduced deterministically.
    """
    if noise.dtype != x0.dtype:
        noise = noise.to(x0.dtype)
    return FlowMatchingNoise.apply(x0, noise, t)


def flow_loss_fwd(pred, x0, noise, mask):
    """pred, x0, noise [R, C] contiguous, mask [R] bool or None -> (loss scalar, d loss / d pred [R, C])."""
    R, C = pred.shape
    acc = utils.acc_dtype(pred.dtype)
    if mask is None:
        inv_denom = torch.full((), 1.0 / max(R * C, 1), dtype=acc, device=pred.device)
    else:
        inv_denom = 1.0 / (mask.sum().to(acc) * C).clamp_min(1)
    grad = utils.empty((R, C), pred.dtype, pred.device)
    block_c = utils.next_pow2(C)
    block_r = max(1, min(utils.pick(4096, 2048) // block_c, utils.next_pow2(R)))
    n_prog = triton.cdiv(R, block_r)
    partial = utils.empty((n_prog,), acc, pred.device)
    if R:
        _fm_loss_fwd_kernel[(n_prog,)](
            pred, x0, noise, mask, inv_denom, partial, grad, R, C,
            HAS_MASK=mask is not None, BLOCK_R=block_r, BLOCK_C=block_c, ACC=utils.tl_acc(pred.dtype),
            num_warps=4)
    return partial.sum() * inv_denom, grad


class FlowMatchingLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, x0, noise, mask):
        C = pred.shape[-1]
        flat = [x.reshape(-1, C).contiguous() for x in (pred, x0, noise)]
        m = None if mask is None else mask.reshape(-1).contiguous()
        loss, grad = flow_loss_fwd(*flat, m)
        ctx.save_for_backward(grad)
        ctx.shapes = (pred.shape, x0.dtype, noise.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        shape, x0_dtype, noise_dtype = ctx.shapes
        g = grad.view(shape)
        go = grad_output.to(grad.dtype)
        # target = noise - x0, so d/dx0 = d/dpred and d/dnoise = -d/dpred.
        gp = g * go if ctx.needs_input_grad[0] else None
        gx0 = (g * go).to(x0_dtype) if ctx.needs_input_grad[1] else None
        gn = (g * -go).to(noise_dtype) if ctx.needs_input_grad[2] else None
        return gp, gx0, gn, None


def flow_matching_loss(
    pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """MSE of the predicted velocity against noise - x0, fused with its gradient.

    pred, x0, noise [B, T, C], mask [B, T] bool (None = all tokens) -> scalar (fp32; fp64 for
    fp64 pred): the mean over all elements of the selected tokens, 0 when none is selected.
    Accumulates in fp32 for bf16 inputs. d loss / d pred ([B, T, C], pred's dtype) is written in
    the forward pass and kept for backward (memory: one pred-sized tensor instead of x0 and
    noise). x0 and noise get gradients too when they require grad (+ / - that of pred).
    """
    if mask is not None and mask.dtype != torch.bool:
        mask = mask != 0
    return FlowMatchingLoss.apply(pred, x0, noise, mask)
