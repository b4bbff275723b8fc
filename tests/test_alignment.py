"""The reconstruction-alignment metric: PSNR and SSIM against hand-computed values, the shuffled
baseline's derangement (every image gets another image's visual prompt, nothing else changes),
and a positive alignment gap after a short tiny run, read from the run's metrics.jsonl."""
import math

import pytest
import torch

import reca
from reca.engine.alignment import alignment_metrics, derangement, psnr, ssim
from reca.engine.build import build
from reca.engine.config import apply_overrides
from reca.engine.metrics import read_metrics
from reca.engine.preview import Previewer
from reca.models.adapter import SampleBatch


# --- PSNR and SSIM against numbers worked out by hand --------------------------------------------

def test_psnr_by_hand():
    a = torch.zeros(2, 3, 4, 4)  # mid-grey in [-1, 1] = 0.5 on the [0, 1] scale
    b = torch.stack([torch.full((3, 4, 4), 0.5), torch.full((3, 4, 4), -1.0)])  # 0.75 and 0.0
    # errors 0.25 and 0.5 on the [0, 1] scale: 10 log10(1 / 0.0625) and 10 log10(1 / 0.25)
    torch.testing.assert_close(psnr(a, b), torch.tensor([10 * math.log10(16), 10 * math.log10(4)]))
    assert psnr(a, a).tolist() == pytest.approx([100.0, 100.0])  # identical: the 1e-10 floor, not infinity


def test_ssim_by_hand():
    c1, c2 = 0.01**2, 0.03**2
    # flat images: no variance, only the luminance term (2 m_x m_y + C1) / (m_x^2 + m_y^2 + C1)
    grey, white = torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 8, 8)
    torch.testing.assert_close(ssim(grey, white), torch.tensor([(2 * 0.5 * 1.0 + c1) / (0.25 + 1.0 + c1)]))
    assert ssim(grey, grey).item() == pytest.approx(1.0)
    # a 6 x 6 image, left half black, right half white, against its negative, with a 6-wide window
    # (one position): by the window's symmetry both means are 0.5, both variances 0.25 and the
    # covariance -0.25, whatever the Gaussian's width
    x = torch.cat([torch.zeros(1, 3, 6, 3), torch.ones(1, 3, 6, 3)], dim=3) * 2 - 1
    expected = ((2 * 0.25 + c1) * (-2 * 0.25 + c2)) / ((0.25 + 0.25 + c1) * (0.25 + 0.25 + c2))
    torch.testing.assert_close(ssim(x, -x, window=6), torch.tensor([expected]))
    torch.testing.assert_close(ssim(x, x, window=6), torch.tensor([1.0]))


def test_metrics_without_a_second_image_have_no_gap():
    img = torch.zeros(1, 3, 8, 8)
    out = alignment_metrics(img, img, None)
    assert set(out) == {"align/psnr_own", "align/ssim_own"}


# --- the shuffled baseline ----------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 3, 4, 7])
def test_derangement_has_no_fixed_point(n):
    perm = derangement(n)
    assert sorted(perm.tolist()) == list(range(n))  # a permutation: every prompt used once
    assert (perm != torch.arange(n)).all()  # and never an image's own


def test_derangement_needs_two_images():
    with pytest.raises(ValueError):
        derangement(1)


def _tiny(tmp_path, steps: int, *extra: str):
    """The demo's setting (the tiny model on the whole bundled photos) cut to `steps` steps."""
    return apply_overrides(reca.preset("demo"), [
        f"output.dir={tmp_path / 'run'}", f"train.steps={steps}", "output.preview_every=0", "output.preview_images=4",
        "output.tensorboard=false", f"output.ckpt_every={steps}", "train.device=cpu", *extra])


def test_shuffled_generation_uses_the_other_images_prompts(tmp_path, monkeypatch):
    """The previewer's second generation sees image (i + 1) mod n's visual prompt for image i, the
    same text prompt and the same noise; its images equal a direct generation from those prompts."""
    c = build(_tiny(tmp_path, 1))
    try:
        previews = Previewer(c, tmp_path, quiet=True)
        und = previews.batch.und
        assert all(not torch.equal(und[i], und[j]) for i in range(4) for j in range(i))  # four distinct images
        seen = []
        forward = c.model.forward

        def spy(batch, objective="recon", generator=None):
            if objective == "sample":
                seen.append(batch)
            return forward(batch, objective, generator)

        monkeypatch.setattr(c.model, "forward", spy)
        own, shuffled = previews.generate()
        monkeypatch.setattr(c.model, "forward", forward)
        assert len(seen) == 2
        torch.testing.assert_close(seen[0].und, und, rtol=0, atol=0)
        for i in range(4):
            assert torch.equal(seen[1].und[i], und[(i + 1) % 4]) and not torch.equal(seen[1].und[i], und[i])
        assert torch.equal(seen[0].prompt.input_ids, seen[1].prompt.input_ids)
        c.model.eval()
        direct = c.model(SampleBatch(und.roll(-1, 0), seen[0].prompt, c.cfg.output.preview_steps), "sample",
                         generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(shuffled, direct.float(), rtol=0, atol=0)
        assert not torch.equal(own, shuffled)
    finally:
        c.close()


# --- a short run: generation follows the visual prompt ------------------------------------------

# Measured (2 CPU cores): the untrained model's gap is -0.00 dB; after 150 steps own 11.6 dB,
# shuffled 8.8 dB, gap +2.8 dB (150 steps at batch 4, +1.6 dB: too close to the margin).
STEPS = 150
MARGIN_DB = 1.0


def test_alignment_gap_is_positive_after_a_short_run(tmp_path):
    """Before training the model ignores the visual prompt as much as it follows it (a gap near
    zero); after a short run the image generated from an image's own prompt is closer to it than
    the one generated from another image's, by PSNR and SSIM, in the row written to metrics.jsonl."""
    cfg = _tiny(tmp_path, STEPS)
    c = build(cfg)  # the run below builds the same initial model (train.seed)
    try:
        previews = Previewer(c, tmp_path, quiet=True)
        before = alignment_metrics(previews.batch.gen.float(), *previews.generate())
    finally:
        c.close()
    reca.train(cfg, quiet=True)
    row = read_metrics(tmp_path / "run")[-1]
    assert row["step"] == STEPS and "align/gap" in row
    assert row["align/gap"] == pytest.approx(row["align/psnr_own"] - row["align/psnr_shuffled"], abs=1e-3)
    assert row["align/gap"] > MARGIN_DB, row
    assert row["align/gap"] > before["align/gap"] + MARGIN_DB, (before, row)
    assert row["align/ssim_own"] > row["align/ssim_shuffled"], row

