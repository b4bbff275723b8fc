"""The op table: backend choice, the contract's fields, nothing imported or probed at import."""
import dataclasses
import subprocess
import sys

import pytest
import torch

import reca.kernels as K

FIELDS = ["backend", "condition", "flow_matching_noise", "flow_matching_loss", "ddpm_loss", "linear_cross_entropy"]


def test_fields():
    """The op table and the one op list agree (KernelOps is typed; OPS names the folders)."""
    assert [f.name for f in dataclasses.fields(K.KernelOps)] == FIELDS == ["backend", *K.OPS]


def test_torch_backend_is_the_references():
    ops = K.get_ops("torch", "cpu")
    from reca.kernels.condition.reference import condition_ref
    from reca.kernels.ddpm.reference import ddpm_loss_ref
    from reca.kernels.linear_ce.reference import linear_cross_entropy_ref

    assert ops.condition is condition_ref and K.reference("condition") is condition_ref
    assert ops.ddpm_loss is ddpm_loss_ref
    assert ops.linear_cross_entropy is linear_cross_entropy_ref
    assert K.get_ops("auto", "cpu").backend == "torch"


def test_triton_backend_functionals():
    ops = K.get_ops("triton", "cpu")
    from reca.kernels.condition import kernel as condition
    from reca.kernels.ddpm import kernel as ddpm
    from reca.kernels.flow_matching import kernel as flow_matching
    from reca.kernels.linear_ce import kernel as linear_ce

    assert ops.backend == "triton"
    assert ops.condition is condition.condition
    assert ops.flow_matching_noise is flow_matching.flow_matching_noise
    assert ops.flow_matching_loss is flow_matching.flow_matching_loss
    assert ops.ddpm_loss is ddpm.ddpm_loss
    assert ops.linear_cross_entropy is linear_ce.linear_cross_entropy
    assert K.kernel("condition") is condition.condition


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
        " ('kernel', 'utils') for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
