"""The op table: backend choice, the contract's fields, nothing imported or probed at import."""
import dataclasses
import subprocess
import sys

import pytest
import torch

import reca.kernels as K
from reca.kernels import reference

FIELDS = ["backend", "condition", "flow_matching_noise", "flow_matching_loss", "ddpm_loss", "linear_cross_entropy"]


def test_fields():
    assert [f.name for f in dataclasses.fields(K.KernelOps)] == FIELDS


def test_torch_backend_is_the_references():
    ops = K.get_ops("torch", "cpu")
    assert ops.condition is reference.condition_ref
    assert ops.ddpm_loss is reference.ddpm_loss_ref
    assert ops.linear_cross_entropy is reference.linear_cross_entropy_ref
    assert K.get_ops("auto", "cpu").backend == "torch"


def test_triton_backend_functionals():
    ops = K.get_ops("triton", "cpu")
    from reca.kernels import condition, ddpm, flow_matching, linear_ce

    assert ops.backend == "triton"
    assert ops.condition is condition.fused_condition
    assert ops.flow_matching_noise is flow_matching.flow_matching_noise
    assert ops.flow_matching_loss is flow_matching.flow_matching_loss
    assert ops.ddpm_loss is ddpm.ddpm_loss
    assert ops.linear_cross_entropy is linear_ce.linear_cross_entropy
    assert K.fused_condition is condition.fused_condition


def test_bad_backends(monkeypatch):
    with pytest.raises(ValueError, match="unknown kernel backend"):
        K.get_ops("cuda", "cpu")
    monkeypatch.setattr(K, "_triton_import_error", lambda: "ImportError: no module named 'triton'")
    monkeypatch.setattr(K, "_triton_available", lambda: False)
    with pytest.raises(ValueError, match="triton cannot be imported"):
        K.get_ops("triton", "cpu")
    assert K.get_ops("auto", torch.device("cuda")).backend == "torch"


def test_import_is_lazy():
    code = (
        "import sys, reca.kernels as K; ops = K.get_ops('torch');"
        "assert 'triton' not in sys.modules, 'triton imported';"
        "assert not any(m.startswith('reca.kernels.') and m.split('.')[-1] in"
        " ('condition', 'flow_matching', 'ddpm', 'linear_ce', 'utils') for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
