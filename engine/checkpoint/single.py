"""Checkpoints that survive a crash mid-write, refuse damaged bytes and resume a run exactly.

A checkpoint holds the trainable parameters (frozen ones are rebuilt from the seed or
`train.init_from` at start, and their fingerprint is stored to prove it), the optimizer and
scheduler, every RNG state, the data position and the run's config. It is one file,
`RUN/checkpoint.pt`, written atomically with a sha256 of its bytes (`integrity`): a reader
sees the old checkpoint or the new one, never half of either, and never a changed byte.
Every fault a user can meet (damaged, empty, foreign, another preset's, a full disk) is a
one-line `UserError`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from reca.engine.checkpoint.integrity import atomic_save, verified_load
from reca.engine.errors import UserError

CHECKPOINT = "checkpoint.pt"
REQUIRED = ("step", "model", "optimizer", "scheduler", "data", "rng")


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
    """The trainable parameters by name; a tensor tied under several names (an LM head sharing
    the embedding table) appears once, under its first name (`named_parameters`' order)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def tied_names(model: torch.nn.Module) -> dict[str, str]:
    """Every other name of a parameter tied under several -> the name it is saved under (its
    first, as `named_parameters` lists it): {"lm_head.weight": "embed.weight"}. Checkpoints,
    the optimizer, the EMA and FSDP hold such a tensor once."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[name] = first[id(p)]
        else:
            first[id(p)] = name
    return out


def load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor], *, source: str = "the checkpoint") -> None:
    """Copy `state` into the model's trainable parameters. Every name and shape is checked
    before anything is copied: a mismatch raises a `UserError` naming the tensor, and the
    model is left as it was. A tied tensor's other name (what a torchrun run's step-N/ folder
    written before they were dropped holds) is the same tensor: it must equal it."""
    params = dict(model.named_parameters())
    state = dict(state)
    for alias, name in tied_names(model).items():
        if alias not in state:
            continue
        value = state.pop(alias)
        if name not in state:
            state[name] = value
        elif not (isinstance(value, torch.Tensor) and value.shape == state[name].shape
                  and torch.equal(value, state[name])):
            raise UserError(f"{source} holds two different tensors for {name} and {alias}, which this model ties "
                            "(one tensor under both names)")
    for name, value in state.items():
        p = params.get(name)
        if p is None:
            raise UserError(f"{source} holds tensor {name}, which this model does not have "
                            "(a checkpoint of another preset or model config?)")
        if not p.requires_grad:
            raise UserError(f"{source} trains tensor {name}, which this model keeps frozen "
                            "(a checkpoint of another preset or model config?)")
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{source}: entry {name} is not a tensor")
        if value.shape != p.shape:
            raise UserError(f"{source}: tensor {name} has shape {list(value.shape)}, this model's is "
                            f"{list(p.shape)} (a checkpoint of another preset or model config?)")
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if missing:
        raise UserError(f"{source} lacks {len(missing)} trainable tensor(s) of this model, e.g. {missing[0]} "
                        "(a checkpoint of another preset or model config?)")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def save_checkpoint(run_dir: str | Path, *, step: int, model, optimizer, scheduler, data: dict, generator,
                    config: dict | None = None, frozen: dict[str, str] | None = None, extra=None) -> Path:
    """`data`: the loaders' positions (`Components.data_state()`); `config`: the run's
    `RunConfig.to_dict()` (a resume compares it, `guard.resume_conflicts`); `frozen`: the
    frozen parameters' fingerprint (`guard.frozen_fingerprint`, computed once at start)."""
    path = Path(run_dir) / CHECKPOINT
    atomic_save(
        {
            "step": step,
            "model": trainable_state(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "data": data,
            "rng": rng_state(generator),
            "config": json.dumps(config) if config is not None else "",  # a string: weights_only loads it
            "frozen": frozen or {},
            "extra": extra or {},
        },
        path,
    )
    return path


def load_checkpoint(run_dir: str | Path, map_location="cpu") -> dict[str, Any]:
    """RUN/checkpoint.pt, checksum verified and weights-only; `config` comes back as a dict
    (empty when the writer gave none). Faults are one-line `UserError`s naming the file."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        raise UserError(f"nothing to resume: {path} does not exist")
    ckpt = verified_load(path, map_location)
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} is not a reca checkpoint: it holds a {type(ckpt).__name__}, not a dict")
    for key in REQUIRED:
        if key not in ckpt:
            raise UserError(f"{path} is not a reca run's checkpoint: it lacks {key!r}")
    if not isinstance(ckpt["step"], int) or ckpt["step"] < 0:
        raise UserError(f"{path}: its step is {ckpt['step']!r}, not a count of optimizer steps")
    if not isinstance(ckpt["model"], dict):
        raise UserError(f"{path}: 'model' is not a dict of tensors")
    try:
        ckpt["config"] = json.loads(ckpt["config"]) if ckpt.get("config") else {}
    except (TypeError, ValueError):
        raise UserError(f"{path}: the config stored in it does not parse") from None
    ckpt.setdefault("frozen", {})
    return ckpt


def restore(ckpt: dict[str, Any], *, model, optimizer, scheduler, generator, source: str = "the checkpoint") -> int:
    """Load weights, optimizer, scheduler and RNG states from a `load_checkpoint` dict; returns
    its step. The data position is the caller's (`Components.load_data_state(ckpt["data"])`)."""
    load_trainable(model, ckpt["model"], source=source)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{source}: its optimizer state does not fit this run ({e})") from None
    try:
        set_rng_state(ckpt["rng"], generator)
    except (RuntimeError, KeyError, TypeError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"{source}: its random-number state does not fit this device ({first}); "
                        "resume on the device type that wrote it") from None
    return ckpt["step"]


def checkpoint_bytes(params: list[torch.nn.Parameter]) -> int:
    """About how many bytes a checkpoint of these trainable parameters takes: the weights and
    AdamW's two moments of the same size (the rest is small)."""
    return sum(3 * p.numel() * p.element_size() for p in params)
