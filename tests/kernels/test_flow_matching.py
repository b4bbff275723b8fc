"""flow_matching_noise and flow_matching_loss against their references: output and every gradient."""
import pytest
import torch

from kernel_helpers import CASES, assert_close, grads, make, ref_copy, tol
from reca.kernels.flow_matching.kernel import flow_matching_loss, flow_matching_noise
from reca.kernels.flow_matching.reference import flow_matching_loss_ref, flow_matching_noise_ref

# (B, T, C): C not a power of two, a single token, a token count not a multiple of any block.
SHAPES = [
    pytest.param(2, 7, 5, id="b2-t7-c5"),
    pytest.param(1, 1, 97, id="single-token-c97"),
    pytest.param(3, 33, 60, id="b3-t33-c60"),
]


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("B,T,C", SHAPES)
def test_noise_matches_reference(B, T, C, device, dtype):
    gen = torch.Generator().manual_seed(B * 100 + T + C)
    x0 = make((B, T, C), dtype, device, requires_grad=True, gen=gen)
    noise = make((B, T, C), dtype, device, requires_grad=True, gen=gen)
    t = torch.rand(B, generator=gen, dtype=torch.float64).to(dtype).to(device).requires_grad_()
    out = flow_matching_noise(x0, noise, t)
    ins_r = [ref_copy(x) for x in (x0, noise, t)]
    ref = flow_matching_noise_ref(*ins_r)
    assert_close(out, ref, tol(dtype), "x_t")
    g = make(out.shape, dtype, device, gen=gen)
    for name, a, b in zip(("x0", "noise", "t"), grads(out, [x0, noise, t], g), grads(ref, ins_r, ref_copy(g))):
        assert_close(a, b, tol(dtype), f"grad {name}")


@pytest.mark.parametrize("device,dtype", CASES[:1] + CASES[2:3])
def test_noise_without_t_grad(device, dtype):
    gen = torch.Generator().manual_seed(5)
    x0 = make((2, 3, 4), dtype, device, requires_grad=True, gen=gen)
    noise = make((2, 3, 4), dtype, device, gen=gen)
    t = torch.tensor([0.25, 0.75], dtype=dtype, device=device)
    (gx0,) = grads(flow_matching_noise(x0, noise, t), [x0], torch.ones(2, 3, 4, dtype=dtype, device=device))
    assert torch.equal(gx0[0].cpu(), torch.full((3, 4), 0.75, dtype=dtype))


MASKS = ["none", "random", "all-false", "all-true"]


def _mask(kind, B, T, gen, device):
    if kind == "none":
        return None
    if kind == "random":
        return (torch.rand(B, T, generator=gen) < 0.5).to(device)
    return torch.full((B, T), kind == "all-true", device=device)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("B,T,C", SHAPES)
def test_loss_matches_reference(B, T, C, mask_kind, device, dtype):
    gen = torch.Generator().manual_seed(B * 100 + T + C + len(mask_kind))
    pred, x0, noise = (make((B, T, C), dtype, device, requires_grad=True, gen=gen) for _ in range(3))
    mask = _mask(mask_kind, B, T, gen, device)
    loss = flow_matching_loss(pred, x0, noise, mask)
    ins_r = [ref_copy(x) for x in (pred, x0, noise)]
    ref = flow_matching_loss_ref(*ins_r, None if mask is None else mask.cpu())
    assert loss.dim() == 0 and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    if mask_kind == "all-false":
        assert loss.item() == 0.0
    assert_close(loss, ref, tol(dtype), "loss")
    go = torch.tensor(1.7, dtype=torch.float64)
    got = grads(loss, [pred, x0, noise], go.to(loss.dtype).to(device))
    want = grads(ref, ins_r, go)
    for name, a, b in zip(("pred", "x0", "noise"), got, want):
        if mask_kind == "all-false":
            assert (a == 0).all()
        else:
            assert_close(a, b, tol(dtype), f"grad {name}")


@pytest.mark.parametrize("device,dtype", CASES[:1] + CASES[2:3])
def test_loss_pred_only_grad(device, dtype):
    """The usual case: x0 and noise are data; only pred gets a gradient."""
    gen = torch.Generator().manual_seed(11)
    pred = make((2, 5, 7), dtype, device, requires_grad=True, gen=gen)
    x0, noise = make((2, 5, 7), dtype, device, gen=gen), make((2, 5, 7), dtype, device, gen=gen)
    loss = flow_matching_loss(pred, x0, noise)
    (gp,) = grads(loss, [pred])
    want = 2 * (pred.detach() - (noise - x0)) / pred.numel()
    assert_close(gp, want, tol(dtype), "grad pred")
