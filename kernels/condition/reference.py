"""Pure-torch reference of `condition`: the `torch` backend and the ground truth of the Triton
kernel's tests and benchmark. Shapes: B batch, S sequence, D width, V vocabulary, Nv visual tokens."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
    order (`masked_scatter` semantics, without a host sync in the backward); `visual` receives
    `grad_scale` times their gradient.
    `check=True` verifies that the placeholder count equals Nv (a host sync: off in the step).
    """
    is_image = input_ids == image_token_id
    if check:
        n = int(is_image.sum())
        if n != visual.shape[0]:
            raise ValueError(f"{n} image placeholders but {visual.shape[0]} visual tokens")
    embeds = F.embedding(input_ids, embed_weight)
    visual = scale_grad(visual, grad_scale).to(embeds.dtype)
    if visual.shape[0] == 0:  # no placeholders: a row to gather from (visual still gets its empty gradient)
        visual = torch.cat([visual, embeds.new_zeros(1, embeds.shape[-1])])
    # masked_scatter's semantics without its backward (a masked_select: on CUDA a host sync,
    # which CUDA-graph capture refuses): placeholder k takes visual row k, k from a device cumsum
    row = (is_image.flatten().cumsum(0) - 1).clamp_(0, visual.shape[0] - 1)
    gathered = visual.index_select(0, row).view(embeds.shape)
    return torch.where(is_image.unsqueeze(-1), gathered, embeds)
