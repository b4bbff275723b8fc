"""Pure-torch reference of `linear_cross_entropy` (LM head + cross-entropy). Shapes: N rows,
D width, V vocabulary."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
