"""condition against condition_ref: output, embedding gradient, visual gradient."""
import pytest
import torch

from kernel_helpers import CASES, assert_close, grads, make, ref_copy, tol
from reca.kernels.condition.kernel import condition
from reca.kernels.condition.reference import condition_ref

IMG = 3  # image placeholder id


def _ids(B, S, V, layout, gen):
    ids = torch.randint(0, V, (B, S), generator=gen)
    ids[ids == IMG] = (IMG + 1) % V
    if layout == "first-last":
        ids[0, 0] = IMG
        ids[-1, -1] = IMG
        ids[0, S // 2 : S // 2 + 3] = IMG
    elif layout == "block":  # a contiguous visual prompt per sample, as in a real RecA prompt
        ids[:, 1 : 1 + S // 2] = IMG
    elif layout == "all":
        ids[:] = IMG
    elif layout == "none":
        pass
    return ids


# (B, S, D, V, layout): D not a power of two, a single row, repeated ids (V=5: every embedding
# row accumulates many positions), placeholders first / last, no / only placeholders.
SHAPES = [
    pytest.param(2, 13, 60, 50, "first-last", id="d60-first-last"),
    pytest.param(1, 1, 97, 31, "all", id="d97-single-row-all-placeholders"),
    pytest.param(1, 1, 97, 31, "none", id="d97-single-row-no-placeholder"),
    pytest.param(3, 17, 33, 5, "block", id="d33-repeated-ids"),
    pytest.param(2, 9, 130, 40, "none", id="d130-no-placeholders"),
]


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("B,S,D,V,layout", SHAPES)
def test_condition_matches_reference(B, S, D, V, layout, deterministic, device, dtype):
    gen = torch.Generator().manual_seed(B * 1000 + S * 10 + D)
    ids = _ids(B, S, V, layout, gen).to(device)
    nv = int((ids == IMG).sum())
    embed = make((V, D), dtype, device, requires_grad=True, gen=gen)
    visual = make((nv, D), dtype, device, requires_grad=True, gen=gen)
    out = condition(ids, embed, visual, IMG, grad_scale=0.1, deterministic=deterministic)

    embed_r, visual_r = ref_copy(embed), ref_copy(visual)
    ref = condition_ref(ids.cpu(), embed_r, visual_r, IMG, grad_scale=0.1)
    # The forward is a copy: exact in every dtype.
    assert torch.equal(out.detach().cpu().double(), ref.detach()), "forward must be an exact copy"

    g = make(out.shape, dtype, device, gen=gen)
    g_embed, g_visual = grads(out, [embed, visual], g)
    r_embed, r_visual = grads(ref, [embed_r, visual_r], ref_copy(g))
    assert_close(g_embed, r_embed, tol(dtype), "grad embed_weight")
    assert (g_embed[IMG] == 0).all(), "placeholders must not reach the placeholder's embedding row"
    if nv:
        assert_close(g_visual, r_visual, tol(dtype), "grad visual (x grad_scale)")


@pytest.mark.parametrize("device,dtype", CASES)
def test_condition_deterministic_is_bitwise_repeatable(device, dtype):
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 4, (3, 41), generator=gen).to(device)  # heavy repetition
    ids[0, :5] = IMG
    embed = make((4, 60), dtype, device, requires_grad=True, gen=gen)
    visual = make((5, 60), dtype, device, requires_grad=True, gen=gen)
    g = make((3, 41, 60), dtype, device, gen=gen)
    runs = [grads(condition(ids, embed, visual, IMG, deterministic=True), [embed, visual], g) for _ in range(3)]
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


@pytest.mark.parametrize("device,dtype", CASES[:1] + CASES[2:3])
def test_condition_count_mismatch(device, dtype):
    ids = torch.tensor([[IMG, 1, IMG, 2]], device=device)
    embed = make((8, 16), dtype, device)
    visual = make((3, 16), dtype, device)
    with pytest.raises(ValueError, match="2 image placeholders but 3 visual tokens"):
        condition(ids, embed, visual, IMG, check=True)
    condition(ids, embed, visual[:2], IMG, check=True)


@pytest.mark.parametrize("device,dtype", CASES[:1] + CASES[2:3])
def test_condition_only_visual_requires_grad(device, dtype):
    """A frozen embedding table: only `visual` gets a gradient."""
    gen = torch.Generator().manual_seed(3)
    ids = _ids(2, 11, 20, "first-last", gen).to(device)
    nv = int((ids == IMG).sum())
    embed = make((20, 24), dtype, device, gen=gen)
    visual = make((nv, 24), dtype, device, requires_grad=True, gen=gen)
    out = condition(ids, embed, visual, IMG, grad_scale=0.5)
    (gv,) = grads(out, [visual], torch.ones_like(out))
    assert torch.equal(gv.cpu(), torch.full((nv, 24), 0.5, dtype=dtype))
