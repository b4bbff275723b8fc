"""Pure-torch references of `flow_matching_noise` and `flow_matching_loss`. Shapes: B batch,
T tokens per sample, C channels per token."""
from __future__ import annotations

import torch


def _acc(x: torch.Tensor) -> torch.Tensor:
    """At least float32: bf16/fp16 upcast, float64 stays float64 (the tests' ground truth)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))



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
