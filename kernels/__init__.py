"""Fused ops for RecA steps, each with a pure-torch reference beside it.

Models never import a kernel directly: they hold a `KernelOps` from `get_ops(backend, device)`,
chosen by `RunConfig.kernels.backend`, so the same model code runs on the torch references
(CPU, debugging, the reference mode) and on the Triton kernels.

Ops (Triton module / torch reference in `reca.kernels.reference`):
  condition             kernels/condition.py      condition_ref
  flow_matching_noise   kernels/flow_matching.py  flow_matching_noise_ref
  flow_matching_loss    kernels/flow_matching.py  flow_matching_loss_ref
  ddpm_loss             kernels/ddpm.py           ddpm_loss_ref (tables: kernels/schedule.py)
  linear_cross_entropy  kernels/linear_ce.py      linear_cross_entropy_ref

Importing this package imports neither triton nor any Triton module and probes no device: the
Triton functionals are reached through `get_ops("triton")` or the lazy names below.
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Callable

import torch

from reca.kernels import reference
from reca.kernels.schedule import DDPMSchedule, cosine_schedule

BACKENDS = ("auto", "torch", "triton")

__all__ = [
    "BACKENDS", "KernelOps", "get_ops", "resolve_backend", "reference", "DDPMSchedule", "cosine_schedule",
    "fused_condition", "flow_matching_noise", "flow_matching_loss", "ddpm_loss", "linear_cross_entropy",
]


@dataclass(frozen=True)
class KernelOps:
    """The op table a model calls. Signatures are those of the references in `reca.kernels.reference`
    (the Triton `condition` also takes `deterministic=False`)."""

    backend: str
    condition: Callable
    flow_matching_noise: Callable
    flow_matching_loss: Callable
    ddpm_loss: Callable
    linear_cross_entropy: Callable


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """'auto' picks triton on CUDA (when triton imports) and torch elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if backend == "auto":
        return "triton" if torch.device(device).type == "cuda" and _triton_available() else "torch"
    return backend


def get_ops(backend: str = "auto", device: torch.device | str = "cpu") -> KernelOps:
    """The op table for `backend` on `device`. Asking for "triton" where triton does not import
    raises ValueError. On CPU the Triton ops run only under TRITON_INTERPRET=1 (tests)."""
    backend = resolve_backend(backend, device)
    if backend == "torch":
        return KernelOps(
            backend="torch",
            condition=reference.condition_ref,
            flow_matching_noise=reference.flow_matching_noise_ref,
            flow_matching_loss=reference.flow_matching_loss_ref,
            ddpm_loss=reference.ddpm_loss_ref,
            linear_cross_entropy=reference.linear_cross_entropy_ref,
        )
    if not _triton_available():
        raise ValueError(
            f"kernels.backend='triton' but triton cannot be imported ({_triton_import_error()}); "
            "install triton or use kernels.backend='torch'"
        )
    return KernelOps(
        backend="triton",
        condition=_load("condition", "fused_condition"),
        flow_matching_noise=_load("flow_matching", "flow_matching_noise"),
        flow_matching_loss=_load("flow_matching", "flow_matching_loss"),
        ddpm_loss=_load("ddpm", "ddpm_loss"),
        linear_cross_entropy=_load("linear_ce", "linear_cross_entropy"),
    )


_LAZY = {
    "fused_condition": "condition",
    "flow_matching_noise": "flow_matching",
    "flow_matching_loss": "flow_matching",
    "ddpm_loss": "ddpm",
    "linear_cross_entropy": "linear_ce",
}


def __getattr__(name: str):
    """`reca.kernels.fused_condition` etc.: the Triton functionals, imported on first use."""
    if name in _LAZY:
        return _load(_LAZY[name], name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _load(module: str, name: str) -> Callable:
    return getattr(importlib.import_module(f"reca.kernels.{module}"), name)


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising something else
        return f"{type(e).__name__}: {e}"
    return None


def _triton_available() -> bool:
    return _triton_import_error() is None
