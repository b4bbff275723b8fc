"""FLOPs of one RecA training step, counted analytically: what MFU and the GPU-hour projections
are computed from (nanoGPT's `estimate_mfu`, torchtitan's explicit count).

`step_flops` is the one formula (executed or useful tokens). `counted_flops` runs a function under PyTorch's FlopCounterMode
(matmuls, convolutions, attention): the tests check the two agree on the tiny preset, and it is
the fallback for a family that describes no token plan (no `flop_plan`).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from reca.models.flops import Stage  # noqa: F401  (the plan type families declare)


def matmul_params(module: nn.Module) -> int:
    """Weights multiplied once per token: Linear weights, and convolutions applied once per token
    (patch embeddings, kernel == stride). Embedding tables are lookups: no FLOPs."""
    n = 0
    for m in module.modules():
        if isinstance(m, nn.Linear):
            n += m.weight.numel()
        elif isinstance(m, nn.Conv2d) and m.kernel_size == m.stride:
            n += m.weight.numel()
    return n


def codec_passes(model: nn.Module, und_downscale: float = 1.0) -> int:
    """Frozen-codec (VAE) passes per sample: the family's `codec_passes(same_pixels)`, where
    `same_pixels` says the loader hands one tensor as both views (`ViewSpec.same_pixels`)."""
    return model.codec_passes(model.views.same_pixels(und_downscale))


def step_flops(model: nn.Module, prompt_len: float, batch: int, codec_flops: float = 0.0,
               passes: int | None = None, useful: bool = False) -> dict:
    """FLOPs of one micro-batch of `batch` samples, forward and backward:

        module that trains:   6 M n      (forward 2 M n; backward 4 M n: input and weight gradients)
        frozen module:        2 M n      (forward only; RecA's frozen parts precede the trained ones)
        attention, per layer: 4 L^2 d forward (Q K^T and A V over the full L x L: masked positions
                              cost SDPA the same), x3 when the module trains
        codec (frozen VAE):   `codec_flops` per sample and pass (convolutions: measured, see
                              `codec_flops`), `passes` passes (default: `codec_passes(model)`)

    M: `matmul_params` of the module, n: tokens it processes per sample (the family's plan:
    `model.flop_plan(prompt_len, useful)`, an optional adapter member). Two counts:
    executed (default: the fixed shapes, padding included, with `prompt_len` the padded length;
    what the hardware does) and `useful` (the model's own work: mean valid prompt length, mean
    kept tokens; what MFU is quoted on, as PaLM's MFU excludes padding). Returns total FLOPs and
    the per-module split (per micro-batch)."""
    plan = model.flop_plan(prompt_len, useful)
    parts, tokens = {}, {}
    for s in plan:
        module = model.get_submodule(s.module)
        trains = any(p.requires_grad for p in module.parameters())
        k = 3 if trains else 1
        dense = 2 * k * matmul_params(module) * s.tokens
        attn = k * s.attn_layers * 4 * s.attn_len**2 * s.attn_width
        parts[s.module] = parts.get(s.module, 0.0) + float(batch * (dense + attn))
        tokens[s.module] = tokens.get(s.module, 0) + s.tokens
    parts["codec"] = float(batch * codec_flops * (codec_passes(model) if passes is None else passes))
    return {"total": sum(parts.values()), "modules": parts, "tokens_per_sample": tokens}


def counted_flops(fn: Callable[[], object]) -> float:
    """FLOPs of fn() as FlopCounterMode counts them (matmul, convolution, attention kernels),
    with every compiled block and op run eagerly (compiled frames refuse the counting mode)."""
    from torch.utils.flop_counter import FlopCounterMode

    from reca.engine.compile import eager

    with eager(), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def codec_flops(model: nn.Module, device: torch.device | str = "cpu") -> float:
    """Per-sample FLOPs of `make_target` (the frozen VAE encode), counted once on one image."""
    size = model.views.gen_size
    x = torch.zeros(1, 3, size, size, device=device)
    return counted_flops(lambda: model.make_target(x, None))
