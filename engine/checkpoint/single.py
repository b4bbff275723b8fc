"""Checkpoints that survive a crash mid-write and resume a run exactly.

A checkpoint holds the trainable parameters (frozen ones are rebuilt from the seed or
`train.init_from` at start), the optimizer and scheduler, every RNG state and the data
position. It is written to a temporary file in the run directory, flushed, then renamed over
the previous one: a reader sees the old checkpoint or the new one, never half of either.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT = "checkpoint.pt"


def atomic_save(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} trainable parameters, e.g. {missing[0]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def save_checkpoint(run_dir: str | Path, *, step: int, model, optimizer, scheduler, data: dict, generator,
                    extra=None) -> Path:
    """`data`: the loaders' positions (`Components.data_state()`)."""
    path = Path(run_dir) / CHECKPOINT
    atomic_save(
        {
            "step": step,
            "model": trainable_state(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "data": data,
            "rng": rng_state(generator),
            "extra": extra or {},
        },
        path,
    )
    return path


def load_checkpoint(run_dir: str | Path, map_location="cpu") -> dict[str, Any]:
    return torch.load(Path(run_dir) / CHECKPOINT, map_location=map_location, weights_only=True)
