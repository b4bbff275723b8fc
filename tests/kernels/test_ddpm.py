"""ddpm_loss (learned-sigma DDPM: mse + vb) against ddpm_loss_ref, and the cosine schedule's tables."""
import math

import pytest
import torch

from kernel_helpers import CASES, assert_close, grads, make, ref_copy, tol
from reca.kernels.ddpm.kernel import ddpm_loss
from reca.kernels.ddpm.reference import ddpm_loss_ref
from reca.kernels.ddpm.schedule import cosine_schedule

SCHED64 = cosine_schedule(dtype=torch.float64)


def _inputs(N, C, t_kind, device, dtype, gen):
    eps_pred = torch.randn(N, C, generator=gen, dtype=torch.float64)
    v = torch.rand(N, C, generator=gen, dtype=torch.float64) * 2.4 - 1.2  # a little beyond [-1, 1] too
    model_out = torch.cat([eps_pred, v], 1).to(dtype).to(device).requires_grad_()
    x0 = make((N, C), dtype, device, scale=0.8, gen=gen)  # some |x0| > 0.999: all decoder branches
    noise = make((N, C), dtype, device, gen=gen)
    t = torch.randint(0, 1000, (N,), generator=gen)
    if t_kind == "mixed":
        t[: max(1, N // 4)] = 0  # the decoder-NLL branch
        t[-1] = 999
        t[N // 2] = 1
    elif t_kind == "zero":
        t[:] = 0
    return model_out, x0, noise, t.to(device)


# (N, C, t): C of the MAR head (16) and odd (5, 7), a single token, N not a multiple of a block.
SHAPES = [
    pytest.param(37, 16, "mixed", id="n37-c16-mixed-t"),
    pytest.param(1, 7, "zero", id="single-token-t0"),
    pytest.param(70, 5, "uniform", id="n70-c5-uniform-t"),
    pytest.param(19, 16, "zero", id="n19-c16-all-t0"),
]
MASKS = ["none", "random", "all-false"]


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("N,C,t_kind", SHAPES)
def test_ddpm_matches_reference(N, C, t_kind, mask_kind, reduction, device, dtype):
    gen = torch.Generator().manual_seed(N * 100 + C + len(mask_kind) + len(reduction))
    model_out, x0, noise, t = _inputs(N, C, t_kind, device, dtype, gen)
    mask = None
    if mask_kind == "random":
        mask = (torch.rand(N, generator=gen) < 0.6).to(device)
    elif mask_kind == "all-false":
        mask = torch.zeros(N, dtype=torch.bool, device=device)
    # The kernel reads the float32 tables of training (float64 ones for a float64 run); the
    # reference gets float64 tables: its x_t / pred_xstart route amplifies table rounding ~1e2
    # at small t, the kernel's algebra does not.
    sched = cosine_schedule(dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)
    loss = ddpm_loss(model_out, x0, noise, t, sched, mask, reduction=reduction)
    mo_r = ref_copy(model_out)
    ref = ddpm_loss_ref(mo_r, ref_copy(x0), ref_copy(noise), t.cpu(), SCHED64,
                        None if mask is None else mask.cpu(), reduction=reduction)
    tolerance = tol(dtype)
    if mask_kind == "all-false":
        assert (loss == 0).all()
    assert_close(loss, ref, tolerance, "loss")
    go = make(loss.shape, torch.float64, "cpu", gen=gen)
    (got,) = grads(loss, [model_out], go.to(loss.dtype).to(device))
    (want,) = grads(ref, [mo_r], go)
    if mask_kind == "all-false":
        assert (got == 0).all()
        return
    assert_close(got[:, :C], want[:, :C], tolerance, "grad eps_pred")
    assert_close(got[:, C:], want[:, C:], tolerance, "grad v")


def test_cosine_schedule_tables():
    s = cosine_schedule(dtype=torch.float64)
    assert s.num_steps == 1000 and cosine_schedule().betas.dtype == torch.float32
    assert s.betas[-1] == 0.999 and (s.betas > 0).all() and (s.betas[:-1] < 0.999).all()
    ab = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert math.isclose(s.betas[0].item(), 1 - ab(1e-3) / ab(0.0), rel_tol=1e-12)
    assert torch.allclose(s.alphas_cumprod, torch.cumprod(1 - s.betas, 0), rtol=1e-12, atol=0)
    assert s.alphas_cumprod_prev[0] == 1 and s.posterior_variance[0] == 0
    assert s.posterior_log_variance_clipped[0] == s.posterior_log_variance_clipped[1]
    assert math.isclose(s.posterior_mean_coef1[0].item(), 1.0, rel_tol=1e-9) and s.posterior_mean_coef2[0] == 0
    # The posterior variance interpolates between 0 and beta: coef2 / coef1 relation and bounds.
    assert (s.posterior_variance[1:] <= s.betas[1:]).all()
    assert torch.allclose(s.mean_eps_coef, s.posterior_mean_coef1 * s.sqrt_recipm1_alphas_cumprod, rtol=1e-14)
    assert s.to(device="cpu") is s
