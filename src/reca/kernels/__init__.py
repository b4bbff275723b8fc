"""Fused ops for RecA steps, one folder an op, each with its pure-torch reference beside it.

Models never import a kernel directly: they hold a `KernelOps` from `get_ops(backend, device)`,
chosen by `RunConfig.kernels.backend`, so the same model code runs on the torch references
(CPU, debugging, the reference mode) and on the Triton kernels.

`OPS` is the one list of ops: op name -> its folder. In folder F, `F/kernel.py` holds the
Triton kernel -> launcher -> autograd.Function -> functional named as the op, and
`F/reference.py` the reference named `<op>_ref`:

  condition             kernels/condition/        token embedding + visual-prompt scatter
  flow_matching_noise   kernels/flow_matching/    rectified-flow interpolation
  flow_matching_loss    kernels/flow_matching/    its MSE, the gradient made in the forward
  ddpm_loss             kernels/ddpm/             MAR's diffusion-head loss (tables: ddpm/schedule.py)
  linear_cross_entropy  kernels/linear_ce/        LM head + cross-entropy, logits never stored

Importing this package imports neither triton nor any kernel module and probes no device.
"""

from __future__ import annotations

from reca import _folder

__path__ += _folder("kernels")  # the modules of kernels/ (see reca._folder)

import dataclasses
import functools
import importlib
from dataclasses import dataclass
from typing import Callable

import torch

from reca.kernels.ddpm.schedule import DDPMSchedule, cosine_schedule

BACKENDS = ("auto", "torch", "triton")
OPS: dict[str, str] = {
    "condition": "condition",
    "flow_matching_noise": "flow_matching",
    "flow_matching_loss": "flow_matching",
    "ddpm_loss": "ddpm",
    "linear_cross_entropy": "linear_ce",
}

__all__ = ["BACKENDS", "OPS", "KernelOps", "get_ops", "resolve_backend", "reference", "kernel", "DDPMSchedule",
           "cosine_schedule"]


@dataclass(frozen=True)
class KernelOps:
    """The op table a model calls: one field per entry of `OPS`, with the signature of its
    reference `<op>_ref` (the Triton `condition` also takes `deterministic=False`)."""

    backend: str
    condition: Callable
    flow_matching_noise: Callable
    flow_matching_loss: Callable
    ddpm_loss: Callable
    linear_cross_entropy: Callable

    def map(self, fn: Callable[[str, Callable], Callable]) -> "KernelOps":
        """The table with every op replaced by fn(name, op) (e.g. compiled)."""
        return dataclasses.replace(self, **{name: fn(name, getattr(self, name)) for name in OPS})


def reference(op: str) -> Callable:
    """The pure-torch reference of `op` (`kernels/<folder>/reference.py`, `<op>_ref`)."""
    return getattr(importlib.import_module(f"reca.kernels.{OPS[op]}.reference"), f"{op}_ref")


def kernel(op: str) -> Callable:
    """The Triton functional of `op` (`kernels/<folder>/kernel.py`); imports triton."""
    return getattr(importlib.import_module(f"reca.kernels.{OPS[op]}.kernel"), op)


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
    if backend == "triton" and not _triton_available():
        raise ValueError(
            f"kernels.backend='triton' but triton cannot be imported ({_triton_import_error()}); "
            "install triton or use kernels.backend='torch'"
        )
    pick = reference if backend == "torch" else kernel
    return KernelOps(backend=backend, **{op: pick(op) for op in OPS})


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising something else
        return f"{type(e).__name__}: {e}"
    return None


def _triton_available() -> bool:
    return _triton_import_error() is None
