"""`reca info`: a preset's parameter counts per module, and with `--world-size` its memory per rank
under FSDP (`memory.memory_per_rank`), computed on the meta device (no memory)."""
from __future__ import annotations

import torch

from reca.engine.bench.memory import WORLD_SIZES, memory_per_rank
from reca.engine.config import RunConfig
from reca.models import build_model


def describe(cfg: RunConfig, world_size: int | None = None) -> dict:
    """Counts and shapes; with `world_size`, "memory": the projection at 1, 2, 4, 8 ranks and it."""
    with torch.device("meta"):
        model = build_model(cfg.model)
    modules = {}
    for name, child in model.named_children():
        n = sum(p.numel() for p in child.parameters())
        if n:
            modules[name] = {"parameters": n, "trainable": any(p.requires_grad for p in child.parameters())}
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    text = cfg.sample.max_text_tokens
    gen_tokens = getattr(model, "latent_grid", 0) ** 2
    parts = model.parameter_breakdown()
    report = {
        "preset": cfg.preset,
        "parts": parts,  # a family's finer split, when it gives one (e.g. Harmon's head apart from MAR)
        "family": cfg.model.family,
        "modules": modules,
        "parameters": total,
        "trainable": trainable,
        "shapes": {
            "understanding view": f"{model.views.und_size} px -> {model.num_visual_tokens} visual tokens",
            "generation view": f"{model.views.gen_size} px -> {gen_tokens} generation tokens",
            "prompt length": f"{model.num_visual_tokens} visual + <= {text} instruction tokens + template",
            "batch": cfg.data.batch_size,
        },
    }
    if world_size is not None:
        report["memory"] = memory_per_rank(model, cfg, sorted({*WORLD_SIZES, world_size}))
    return report
