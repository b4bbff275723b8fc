"""Fused conditioning: token embedding + visual prompt scattered over the image placeholders.

Reference: `reca.kernels.condition.reference.condition_ref` (embedding, then the placeholders overwritten).
Forward reads each output row once from the right table and writes it once: no [B, S, D]
embedding that is then overwritten. Backward: `visual` gets grad_scale times its rows'
gradient (plain stores, each visual row has one position); `embed_weight` accumulates the rows
of the non-placeholder positions, with fp32 atomics by default or, with `deterministic=True`, by
a stable sort of the ids and one program per (id segment, D block) that sums its positions in
sequence order (bitwise repeatable, no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from reca.kernels import utils
from reca.kernels.condition.reference import condition_ref  # noqa: F401  (the reference, beside the kernel)


@triton.jit
def _condition_fwd_kernel(
    ids_ptr, vis_row_ptr, embed_ptr, visual_ptr, out_ptr,
    D, Nv, stride_e, stride_v, image_token_id,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs < D
    tok = tl.load(ids_ptr + pid_m)
    if tok == image_token_id:
        row = tl.load(vis_row_ptr + pid_m)
        # More placeholders than visual rows is a caller error (check=True catches it); read zeros
        # instead of out of bounds.
        lim = tl.where(row < Nv, D, 0)
        x = tl.load(visual_ptr + row * stride_v + offs, mask=offs < lim, other=0.0).to(out_ptr.dtype.element_ty)
    else:
        x = tl.load(embed_ptr + tok * stride_e + offs, mask=dmask, other=0.0).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + pid_m.to(tl.int64) * D + offs, x, mask=dmask)


@triton.jit
def _condition_bwd_atomic_kernel(
    ids_ptr, vis_row_ptr, grad_out_ptr, grad_embed_ptr, grad_visual_ptr,
    D, Nv, image_token_id, grad_scale,
    EMBED_GRAD: tl.constexpr, VISUAL_GRAD: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs < D
    tok = tl.load(ids_ptr + pid_m)
    g = tl.load(grad_out_ptr + pid_m.to(tl.int64) * D + offs, mask=dmask, other=0.0)
    if tok == image_token_id:
        if VISUAL_GRAD:
            row = tl.load(vis_row_ptr + pid_m)
            gv = g.to(ACC) * grad_scale
            tl.store(grad_visual_ptr + row * D + offs, gv.to(grad_visual_ptr.dtype.element_ty), mask=offs < tl.where(row < Nv, D, 0))
    else:
        if EMBED_GRAD:
            tl.atomic_add(grad_embed_ptr + tok * D + offs, g.to(grad_embed_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _condition_bwd_sorted_kernel(
    sorted_ids_ptr, perm_ptr, vis_row_ptr, grad_out_ptr, grad_embed_ptr, grad_visual_ptr,
    M, D, Nv, image_token_id, grad_scale,
    EMBED_GRAD: tl.constexpr, VISUAL_GRAD: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    i = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs < D
    tok = tl.load(sorted_ids_ptr + i)
    if tok == image_token_id:
        if VISUAL_GRAD:
            pos = tl.load(perm_ptr + i)
            row = tl.load(vis_row_ptr + pos)
            g = tl.load(grad_out_ptr + pos * D + offs, mask=dmask, other=0.0).to(ACC) * grad_scale
            tl.store(grad_visual_ptr + row * D + offs, g.to(grad_visual_ptr.dtype.element_ty), mask=offs < tl.where(row < Nv, D, 0))
    else:
        if EMBED_GRAD:
            prev = tl.load(sorted_ids_ptr + i - 1, mask=i > 0, other=-1)
            if (i == 0) | (prev != tok):
                # First position of this id's segment: sum the segment in (stable) sequence order.
                acc = tl.zeros([BLOCK_D], dtype=ACC)
                j = i
                nxt = tok
                while nxt == tok:
                    pos = tl.load(perm_ptr + j)
                    acc += tl.load(grad_out_ptr + pos * D + offs, mask=dmask, other=0.0).to(ACC)
                    j += 1
                    nxt = tl.load(sorted_ids_ptr + j, mask=j < M, other=-1)
                tl.store(grad_embed_ptr + tok * D + offs, acc.to(grad_embed_ptr.dtype.element_ty), mask=dmask)


def _block_d(D: int) -> int:
    return utils.pick(512 if D >= 512 else utils.next_pow2(D), utils.next_pow2(D))


def _visual_rows(ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """[M] int64: the visual row each placeholder takes (row-major order), on the device, no sync."""
    return torch.cumsum(ids == image_token_id, 0) - 1


def condition_fwd(ids, embed_weight, visual, image_token_id: int):
    """ids [M] int64 contiguous, embed_weight [V, D], visual [Nv, D] -> ([M, D], vis_rows [M])."""
    M, D = ids.shape[0], embed_weight.shape[1]
    vis_rows = _visual_rows(ids, image_token_id)
    out = utils.empty((M, D), embed_weight.dtype, ids.device)
    if M == 0:
        return out, vis_rows
    block_d = _block_d(D)
    grid = (M, triton.cdiv(D, block_d))
    _condition_fwd_kernel[grid](
        ids, vis_rows, embed_weight, visual, out,
        D, visual.shape[0], embed_weight.stride(0), visual.stride(0), image_token_id,
        BLOCK_D=block_d, num_warps=4,
    )
    return out, vis_rows


def condition_bwd(grad_out, ids, vis_rows, embed_shape, embed_dtype, visual_shape, visual_dtype,
                  image_token_id: int, grad_scale: float, need_embed: bool, need_visual: bool,
                  deterministic: bool):
    """grad_out [M, D] -> (grad_embed [V, D] or None, grad_visual [Nv, D] or None)."""
    M, D = grad_out.shape
    device = grad_out.device
    grad_visual = torch.zeros(visual_shape, dtype=visual_dtype, device=device) if need_visual else None
    block_d = _block_d(D)
    grid = (M, triton.cdiv(D, block_d))
    if deterministic:
        grad_embed = torch.zeros(embed_shape, dtype=embed_dtype, device=device) if need_embed else None
        if M:
            sorted_ids, perm = torch.sort(ids, stable=True)
            _condition_bwd_sorted_kernel[grid](
                sorted_ids, perm, vis_rows, grad_out, grad_embed, grad_visual,
                M, D, visual_shape[0], image_token_id, grad_scale,
                EMBED_GRAD=need_embed, VISUAL_GRAD=need_visual, BLOCK_D=block_d,
                ACC=utils.tl_acc(embed_dtype), num_warps=4,
            )
        return grad_embed, grad_visual
    # Atomics accumulate in fp32 (fp64 for fp64 weights), then one cast to the weight's dtype.
    acc = utils.acc_dtype(embed_dtype)
    acc_tl = utils.tl_acc(embed_dtype)
    grad_embed = torch.zeros(embed_shape, dtype=acc, device=device) if need_embed else None
    if M:
        _condition_bwd_atomic_kernel[grid](
            ids, vis_rows, grad_out, grad_embed, grad_visual,
            D, visual_shape[0], image_token_id, grad_scale,
            EMBED_GRAD=need_embed, VISUAL_GRAD=need_visual, BLOCK_D=block_d, ACC=acc_tl, num_warps=4,
        )
    if grad_embed is not None and grad_embed.dtype != embed_dtype:
        grad_embed = grad_embed.to(embed_dtype)
    return grad_embed, grad_visual


class FusedCondition(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_ids, embed_weight, visual, image_token_id, grad_scale, deterministic):
        ids = input_ids.reshape(-1).to(torch.int64).contiguous()
        out, vis_rows = condition_fwd(ids, embed_weight, visual, image_token_id)
        ctx.save_for_backward(ids, vis_rows)
        ctx.meta = (embed_weight.shape, embed_weight.dtype, visual.shape, visual.dtype,
                    image_token_id, grad_scale, deterministic)
        return out.view(*input_ids.shape, embed_weight.shape[1])

    @staticmethod
    def backward(ctx, grad_out):
        ids, vis_rows = ctx.saved_tensors
        embed_shape, embed_dtype, visual_shape, visual_dtype, image_token_id, grad_scale, det = ctx.meta
        grad_embed, grad_visual = condition_bwd(
            grad_out.reshape(-1, embed_shape[1]).contiguous(), ids, vis_rows, embed_shape, embed_dtype,
            visual_shape, visual_dtype, image_token_id, grad_scale,
            ctx.needs_input_grad[1], ctx.needs_input_grad[2], det,
        )
        return None, grad_embed, grad_visual, None, None, None


def condition(
    input_ids: torch.Tensor,
    embed_weight: torch.Tensor,
    visual: torch.Tensor,
    image_token_id: int,
    grad_scale: float = 1.0,
    check: bool = False,
    deterministic: bool = False,
) -> torch.Tensor:
    """Token embeddings with the visual prompt written over the image placeholders.

    input_ids [B, S] int, embed_weight [V, D], visual [Nv, D] -> [B, S, D] in embed_weight's dtype.
    Positions with `input_ids == image_token_id` take the rows of `visual` in row-major order
    (masked_scatter semantics; the row index is a device cumsum, no host sync); every other
    position takes `embed_weight[id]`. Backward: placeholders give embed_weight nothing, `visual`
    gets `grad_scale` times its positions' gradient. `check=True` raises ValueError when the
    placeholder count differs from Nv (a host sync). Without it, extra placeholders read zeros
    and extra visual rows get zero gradient. `deterministic=True` accumulates the embedding
    gradient without atomics (bitwise repeatable).
    """
    if check:
        n = int((input_ids == image_token_id).sum())
        if n != visual.shape[0]:
            raise ValueError(f"{n} image placeholders but {visual.shape[0]} visual tokens")
    if embed_weight.stride(1) != 1:
        embed_weight = embed_weight.contiguous()
    if visual.stride(-1) != 1:
        visual = visual.contiguous()
    return FusedCondition.apply(input_ids, embed_weight, visual, int(image_token_id), float(grad_scale), bool(deterministic))
