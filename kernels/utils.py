"""Helpers shared by the Triton ops: launch configs, accumulation dtypes, checked allocation.

Imported only by the Triton op modules (it imports triton), never by `reca.kernels` itself.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

_POISON = False


def interpreting() -> bool:
    """True under `TRITON_INTERPRET=1` (CPU): one small config per kernel, no autotuning."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def pick(gpu, interp):
    """The GPU launch parameter, or the interpreter's (bigger blocks = fewer Python-level programs)."""
    return interp if interpreting() else gpu


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype in torch terms: float64 stays float64, everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc(dtype: torch.dtype):
    """The same in Triton terms, passed to kernels as a `tl.constexpr`."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype: torch.dtype):
    """fp32/fp64 matmuls in IEEE precision, not TF32 (fp32 is the accuracy mode; training runs
    bf16); None (Triton's default) for bf16/fp16, whose products are exact in fp32 anyway."""
    return "ieee" if dtype in (torch.float32, torch.float64) else None


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """`torch.empty` for launcher outputs. Tests set poison mode: floats come back NaN-filled and
    integers filled with a large sentinel, which proves each kernel writes every element."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _POISON:
        out.fill_(float("nan") if out.is_floating_point() else 2**30)
    return out


@contextlib.contextmanager
def poisoned_allocations():
    """Within this block, `empty` fills what it returns with NaN (tests only)."""
    global _POISON
    prev, _POISON = _POISON, True
    try:
        yield
    finally:
        _POISON = prev


def contiguous(*tensors):
    return tuple(None if x is None else x.contiguous() for x in tensors)
