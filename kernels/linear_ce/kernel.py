"""Cross-entropy of a linear head without the [N, V] logits (forward and backward).

Reference: `reca.kernels.linear_ce.reference.linear_cross_entropy_ref` (F.linear + F.cross_entropy).
Forward: one program per BLOCK_M rows walks the vocabulary in BLOCK_V tiles, each tile's logits
computed by tl.dot over D in BLOCK_D slices, folded into an online logsumexp; it stores the
row's lse [N] and loss [N]. Backward: one program per (BLOCK_M rows, BLOCK_V vocab) tile
recomputes that tile's logits, forms G = (softmax - onehot) * row scale in registers, and adds
G @ W_tile into grad_hidden and G^T @ h_tile into grad_weight (fp32 atomics, D sliced), the column
sums of G into grad_bias. Memory beyond the inputs: lse [N] and the fp32 gradient buffers.
Logit FLOPs: forward 2NVD, backward 3 x 2NVD (the recompute + two products).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from reca.kernels import utils
from reca.kernels.linear_ce.reference import linear_cross_entropy_ref  # noqa: F401  (the reference, beside the kernel)


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, rmask, cmask, D, stride_h, stride_w,
                 BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                 ACC: tl.constexpr, PRECISION: tl.constexpr):
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        h = tl.load(h_ptr + rows[:, None] * stride_h + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_w + dd[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION, out_dtype=ACC)
    return acc


@triton.jit
def _lce_fwd_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, loss_ptr,
    N, V, D, stride_h, stride_w, ignore_index,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    rows = rows.to(tl.int64)
    tgt = tl.load(tgt_ptr + rows, mask=rmask, other=ignore_index)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    t_logit = tl.zeros([BLOCK_M], dtype=ACC)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < V
        logits = _logits_tile(h_ptr, w_ptr, rows, cols.to(tl.int64), rmask, cmask, D, stride_h, stride_w,
                              BLOCK_M, BLOCK_V, BLOCK_D, ACC, PRECISION)
        if HAS_BIAS:
            logits += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
        logits = tl.where(cmask[None, :], logits, float("-inf"))
        t_logit += tl.sum(tl.where(cols[None, :] == tgt[:, None], logits, 0.0), axis=1)
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m_i = m_new
    lse = m_i + tl.log(l_i)
    valid = rmask & (tgt != ignore_index)
    tl.store(lse_ptr + rows, lse, mask=rmask)
    tl.store(loss_ptr + rows, tl.where(valid, lse - t_logit, 0.0), mask=rmask)


@triton.jit
def _lce_bwd_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, scale_ptr, gh_ptr, gw_ptr, gb_ptr,
    N, V, D, stride_h, stride_w, stride_scale, ignore_index,
    HAS_BIAS: tl.constexpr, NEED_H: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    rmask = rows < N
    cmask = cols < V
    rows = rows.to(tl.int64)
    cols = cols.to(tl.int64)
    tgt = tl.load(tgt_ptr + rows, mask=rmask, other=ignore_index)
    valid = rmask & (tgt != ignore_index)
    # Tiles whose rows are all ignored (or past N) add nothing: skip the recompute.
    if tl.max(valid.to(tl.int32), axis=0) > 0:
        lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0).to(ACC)
        scale = tl.load(scale_ptr + rows * stride_scale, mask=rmask, other=0.0).to(ACC)
        logits = _logits_tile(h_ptr, w_ptr, rows, cols, rmask, cmask, D, stride_h, stride_w,
                              BLOCK_M, BLOCK_V, BLOCK_D, ACC, PRECISION)
        if HAS_BIAS:
            logits += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
        p = tl.exp(logits - lse[:, None])
        g = p - tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
        g = tl.where(valid[:, None] & cmask[None, :], g * scale[:, None], 0.0)
        if NEED_B:
            tl.atomic_add(gb_ptr + cols, tl.sum(g, axis=0).to(gb_ptr.dtype.element_ty), mask=cmask)
        g_in = g.to(h_ptr.dtype.element_ty)  # bf16 inputs: bf16 x bf16 products, fp32 accumulation
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dmask = dd < D
            if NEED_H:
                w = tl.load(w_ptr + cols[:, None] * stride_w + dd[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
                gh = tl.dot(g_in, w.to(g_in.dtype), input_precision=PRECISION, out_dtype=ACC)
                tl.atomic_add(gh_ptr + rows[:, None] * D + dd[None, :], gh.to(gh_ptr.dtype.element_ty),
                              mask=rmask[:, None] & dmask[None, :])
            if NEED_W:
                h = tl.load(h_ptr + rows[:, None] * stride_h + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
                gw = tl.dot(tl.trans(g_in), h, input_precision=PRECISION, out_dtype=ACC)
                tl.atomic_add(gw_ptr + cols[:, None] * D + dd[None, :], gw.to(gw_ptr.dtype.element_ty),
                              mask=cmask[:, None] & dmask[None, :])


def _blocks(D: int):
    """(BLOCK_M, BLOCK_V, BLOCK_D, num_warps, num_stages); fixed, not autotuned (backward's atomics
    cannot be replayed by the autotuner). GPU values are a starting point: see benchmarks/."""
    if utils.interpreting():
        return 16, 128, max(16, min(64, utils.next_pow2(D))), 4, 1
    return 64, 128, 64, 8, 3


def lce_fwd(hidden, weight, bias, targets, ignore_index):
    """hidden [N, D], weight [V, D] (unit stride in D), targets [N] -> (lse [N], loss [N]) in fp32/fp64."""
    N, D = hidden.shape
    V = weight.shape[0]
    acc = utils.acc_dtype(hidden.dtype)
    lse = utils.empty((N,), acc, hidden.device)
    loss = utils.empty((N,), acc, hidden.device)
    bm, bv, bd, warps, stages = _blocks(D)
    if N:
        _lce_fwd_kernel[(triton.cdiv(N, bm),)](
            hidden, weight, bias, targets, lse, loss,
            N, V, D, hidden.stride(0), weight.stride(0), ignore_index,
            HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_V=bv, BLOCK_D=bd,
            ACC=utils.tl_acc(hidden.dtype), PRECISION=utils.dot_precision(hidden.dtype),
            num_warps=warps, num_stages=stages,
        )
    return lse, loss


def lce_bwd(hidden, weight, bias, targets, lse, scale, ignore_index, need_h, need_w, need_b):
    """scale: d loss / d row-loss, a 0-d tensor (mean, sum) or [N] (none). -> grads or None."""
    N, D = hidden.shape
    V = weight.shape[0]
    acc = utils.acc_dtype(hidden.dtype)
    dev = hidden.device
    gh = torch.zeros((N, D), dtype=acc, device=dev) if need_h else None
    gw = torch.zeros((V, D), dtype=acc, device=dev) if need_w else None
    gb = torch.zeros((V,), dtype=acc, device=dev) if need_b else None
    bm, bv, bd, warps, stages = _blocks(D)
    if N and (need_h or need_w or need_b):
        _lce_bwd_kernel[(triton.cdiv(N, bm), triton.cdiv(V, bv))](
            hidden, weight, bias, targets, lse, scale, gh, gw, gb,
            N, V, D, hidden.stride(0), weight.stride(0), 0 if scale.dim() == 0 else scale.stride(0), ignore_index,
            HAS_BIAS=bias is not None, NEED_H=need_h, NEED_W=need_w, NEED_B=need_b,
            BLOCK_M=bm, BLOCK_V=bv, BLOCK_D=bd,
            ACC=utils.tl_acc(hidden.dtype), PRECISION=utils.dot_precision(hidden.dtype),
            num_warps=warps, num_stages=stages,
        )
    cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
    return cast(gh, hidden), cast(gw, weight), (cast(gb, bias) if need_b else None)


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, ignore_index, reduction):
        lse, loss = lce_fwd(hidden, weight, bias, targets, ignore_index)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.ignore_index = ignore_index
        ctx.reduction = reduction
        if reduction == "none":
            return loss
        total = loss.sum()
        if reduction == "sum":
            return total
        count = (targets != ignore_index).sum().to(loss.dtype).clamp_min(1)
        ctx.count = count
        return total / count

    @staticmethod
    def backward(ctx, grad_output):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        go = grad_output.to(lse.dtype)
        scale = go / ctx.count if ctx.reduction == "mean" else go.contiguous()
        gh, gw, gb = lce_bwd(hidden, weight, bias, targets, lse, scale, ctx.ignore_index,
                             ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                             bias is not None and ctx.needs_input_grad[3])
        return gh, gw, None, gb, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T + bias, targets) without materialising the logits.

    hidden [N, D], weight [V, D], bias [V] or None, targets [N] int -> scalar ("mean", "sum") or
    [N] ("none", 0 at ignored rows), fp32 (fp64 for fp64 hidden). fp32 accumulation for bf16.
    "mean" divides by the non-ignored count on the device and gives 0 when every row is ignored
    (torch: nan). Gradients for hidden, weight and bias, in their dtypes. Targets must lie in
    [0, V) or equal ignore_index (not checked: that would be a host sync).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, D] and weight [V, D] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    targets = targets.reshape(-1).contiguous()
    return LinearCrossEntropy.apply(hidden, weight, targets, bias, int(ignore_index), reduction)
