"""linear_cross_entropy against linear_cross_entropy_ref: loss and the hidden / weight / bias gradients."""
import pytest
import torch

from kernel_helpers import CASES, assert_close, grads, make, ref_copy, tol
from reca.kernels.linear_ce.kernel import linear_cross_entropy
from reca.kernels.linear_ce.reference import linear_cross_entropy_ref

# (N, D, V): D not a power of two, a single row, V not a multiple of the vocabulary block (128).
SHAPES = [
    pytest.param(37, 60, 257, id="n37-d60-v257"),
    pytest.param(1, 97, 1000, id="single-row-d97-v1000"),
    pytest.param(20, 33, 130, id="n20-d33-v130"),
]


def _targets(N, V, ignore_index, kind, gen, device):
    tgt = torch.randint(0, V, (N,), generator=gen)
    if kind == "some-ignored" and N > 1:
        tgt[::3] = ignore_index
    elif kind == "all-ignored":
        tgt[:] = ignore_index
    return tgt.to(device)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("N,D,V", SHAPES)
def test_lce_matches_reference(N, D, V, bias, reduction, device, dtype):
    gen = torch.Generator().manual_seed(N * 10000 + D * 10 + V + bias)
    hidden = make((N, D), dtype, device, requires_grad=True, gen=gen)
    weight = make((V, D), dtype, device, requires_grad=True, scale=D**-0.5 * 3, gen=gen)
    b = make((V,), dtype, device, requires_grad=True, gen=gen) if bias else None
    targets = _targets(N, V, -100, "some-ignored", gen, device)
    loss = linear_cross_entropy(hidden, weight, targets, b, reduction=reduction)
    ins_r = [ref_copy(x) for x in (hidden, weight, b)]
    ref = linear_cross_entropy_ref(ins_r[0], ins_r[1], targets.cpu(), ins_r[2], reduction=reduction)
    assert_close(loss, ref, tol(dtype), "loss")
    if reduction == "none":
        assert (loss[targets == -100] == 0).all()
    go = make(loss.shape, torch.float64, "cpu", gen=gen)
    got = grads(loss, [hidden, weight, b], go.to(loss.dtype).to(device))
    want = grads(ref, ins_r, go)
    for name, a, w in zip(("hidden", "weight", "bias"), got, want):
        assert a.dtype == dtype
        assert_close(a, w, tol(dtype), f"grad {name}")


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_lce_all_ignored(reduction, device, dtype):
    """Every row ignored: loss 0 (mean included: our choice, torch gives nan) and zero gradients."""
    gen = torch.Generator().manual_seed(1)
    hidden = make((9, 60), dtype, device, requires_grad=True, gen=gen)
    weight = make((257, 60), dtype, device, requires_grad=True, gen=gen)
    b = make((257,), dtype, device, requires_grad=True, gen=gen)
    targets = torch.full((9,), -100, device=device)
    loss = linear_cross_entropy(hidden, weight, targets, b, reduction=reduction)
    ref = linear_cross_entropy_ref(hidden.detach(), weight.detach(), targets, b.detach(), reduction=reduction)
    assert (loss == 0).all() and (ref == 0).all()
    for g in grads(loss.sum(), [hidden, weight, b]):
        assert (g == 0).all()


@pytest.mark.parametrize("device,dtype", CASES[:1] + CASES[2:3])
def test_lce_custom_ignore_index_and_frozen_weight(device, dtype):
    """ignore_index that is also a valid class id; weight without grad (only hidden gets one)."""
    gen = torch.Generator().manual_seed(2)
    hidden = make((13, 24), dtype, device, requires_grad=True, gen=gen)
    weight = make((70, 24), dtype, device, gen=gen)
    targets = torch.randint(0, 70, (13,), generator=gen).to(device)
    targets[:4] = 5
    loss = linear_cross_entropy(hidden, weight, targets, ignore_index=5)
    h_r = ref_copy(hidden)
    ref = linear_cross_entropy_ref(h_r, ref_copy(weight), targets.cpu(), ignore_index=5)
    assert_close(loss, ref, tol(dtype), "loss")
    assert_close(grads(loss, [hidden])[0], grads(ref, [h_r])[0], tol(dtype), "grad hidden")
