"""AdamW with decay only on matrices, and the warm-up + cosine/constant learning-rate schedule."""
from __future__ import annotations

import math

import torch

from reca.engine.config import OptimConfig


def param_groups(model: torch.nn.Module, weight_decay: float, exempt: tuple[str, ...] = ()) -> list[dict]:
    """Trainable parameters split into decayed (>= 2-D weights) and undecayed (1-D: norms,
    biases, and the parameters under the `exempt` name prefixes: the model's
    `no_weight_decay_modules()`, e.g. Harmon's diffusion head)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = p.ndim < 2 or name.endswith(".bias") or (exempt and name.startswith(exempt))
        (no_decay if plain else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device,
                    capturable: bool = False, exempt: tuple[str, ...] = ()) -> torch.optim.AdamW:
    """Fused AdamW on every device: one kernel per step, and its `found_inf` input skips a
    non-finite step without a host sync. `capturable` (CUDA graphs): the lr is a device tensor
    that the scheduler fills in place, since a float would be frozen into the graph."""
    groups = [g for g in param_groups(model, cfg.weight_decay, exempt) if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters (check model.trainable)")
    lr = torch.tensor(cfg.lr, device=device) if capturable else cfg.lr
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True, capturable=capturable)


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warm-up ((step + 1) /
    warmup, or step / warmup with `warmup_from_zero`: transformers' get_*_schedule_with_warmup),
    then cosine decay to `min_lr_ratio` at `total_steps`, or constant."""
    if step < cfg.warmup_steps:
        return (step if cfg.warmup_from_zero else step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule != "cosine":
        raise ValueError(f"unknown schedule {cfg.schedule!r} (cosine or constant)")
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, total_steps))
