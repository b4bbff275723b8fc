"""Shared pieces of the kernel tests: device/dtype cases, tolerances, comparisons, poisoning.

Every kernel result is compared with the torch reference evaluated in float64 on CPU on the
very same (already rounded) inputs, by norm-wise relative error ||got - ref|| / ||ref||.
"""
from __future__ import annotations

import os

import pytest
import torch


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_cpu = pytest.mark.skipif(not _INTERPRET, reason="Triton runs CPU tensors only under TRITON_INTERPRET=1")

# (device, dtype) cases: CPU under the interpreter in float64 (exactness) and float32; CUDA in
# float32 and bfloat16 (the training dtype), marked `gpu`.
CASES = [
    pytest.param("cpu", torch.float64, id="cpu-f64", marks=_cpu),
    pytest.param("cpu", torch.float32, id="cpu-f32", marks=_cpu),
    pytest.param("cuda", torch.float32, id="cuda-f32", marks=pytest.mark.gpu),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=pytest.mark.gpu),
]
# The cheaper subset for the slowest op under the interpreter.
CASES_F64 = [CASES[0], CASES[2], CASES[3]]

# Tolerances on the norm-wise relative error against the float64 reference.
TOL = {
    # float64 kernels: only summation order differs (sums of <= a few thousand terms).
    torch.float64: 1e-12,
    # fp32: ~1e-7 per rounding, growing ~sqrt(terms) over reductions of <= ~1e4 terms, plus exp/log.
    torch.float32: 2e-5,
    # bf16: outputs and gradients are rounded to bf16 (2^-9 relative per element, ~2e-3 norm-wise);
    # LCE multiplies the bf16-rounded softmax gradient: 2e-2 leaves room for both roundings.
    torch.bfloat16: 2e-2,
}


def tol(dtype: torch.dtype) -> float:
    return TOL[dtype]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().to("cpu", torch.float64), ref.detach().to("cpu", torch.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert torch.isfinite(got).all(), "non-finite values (an unwritten element?)"
    denom = ref.norm().item()
    diff = (got - ref).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(got, ref, tolerance: float, what: str = ""):
    err = rel_err(got, ref)
    assert err <= tolerance, f"{what}: relative error {err:.3e} > {tolerance:.1e}"


def make(shape, dtype, device, *, requires_grad=False, scale=1.0, gen=None):
    """Fresh random input: rounded to `dtype` once, so the float64 reference sees the same values."""
    x = (torch.randn(shape, dtype=torch.float64, generator=gen) * scale).to(dtype).to(device)
    return x.requires_grad_(requires_grad)


def ref_copy(x: torch.Tensor | None) -> torch.Tensor | None:
    """A float64 CPU leaf with the same values (and requires_grad) as x."""
    if x is None:
        return None
    y = x.detach().to("cpu")
    if y.is_floating_point():
        y = y.to(torch.float64).requires_grad_(x.requires_grad)
    return y


def grads(out: torch.Tensor, inputs, grad_out: torch.Tensor | None = None):
    inputs = [x for x in inputs if x is not None and x.requires_grad]
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=False)
