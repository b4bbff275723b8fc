"""Reconstruction alignment: does the model's generation follow its own understanding?

For a fixed set of preview images, the model generates each image from that image's visual
prompt (own) and from another image's visual prompt (shuffled: a fixed derangement, image i
gets image i + 1's), with the same noise. Fidelity to image i is measured for both:

    align/psnr_own       PSNR (dB) of the image generated from its own visual prompt
    align/psnr_shuffled  PSNR (dB) of the image generated from another image's visual prompt
    align/gap            psnr_own - psnr_shuffled: the alignment (0: the prompt is ignored)
    align/ssim_own, align/ssim_shuffled   SSIM of the same pairs (structure, not only colour)

No download: PSNR and SSIM need nothing but the pixels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Images [N, 3, H, W] in [-1, 1] -> PSNR per image [N] in dB, on the [0, 1] scale."""
    mse = ((a.float() - b.float()) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))  # 100 dB for identical images


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """Images [N, 3, H, W] in [-1, 1] -> SSIM per image [N] (Wang et al. 2004 on the [0, 1]
    scale, constants K1 0.01 and K2 0.03, a Gaussian window, valid positions only, averaged
    over channels). The window is 7 wide, not 11: the tiny presets' 32 px images would keep
    only 22 x 22 positions with 11."""
    x, y = (a.float() + 1) / 2, (b.float() + 1) / 2
    window = min(window, x.shape[-1], x.shape[-2])
    g = torch.exp(-((torch.arange(window, dtype=torch.float32) - (window - 1) / 2) ** 2) / (2 * sigma**2))
    g = (g / g.sum()).to(x.device)
    kernel = (g[:, None] * g[None, :]).expand(x.shape[1], 1, window, window)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=x.shape[1])

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def derangement(n: int) -> torch.Tensor:
    """A fixed permutation [n] with no fixed point: image i gets image (i + 1) mod n's prompt."""
    if n < 2:
        raise ValueError(f"a shuffled prompt needs at least 2 images, got {n}")
    return torch.roll(torch.arange(n), -1)


def alignment_metrics(target: torch.Tensor, own: torch.Tensor, shuffled: torch.Tensor | None) -> dict[str, float]:
    """Preview images `target`, images generated from their own visual prompts `own` and from
    the deranged prompts `shuffled` (None when there is a single preview image), all
    [N, 3, H, W] in [-1, 1] -> the `align/*` numbers (means over the N images)."""
    out = {"align/psnr_own": psnr(own, target).mean().item(), "align/ssim_own": ssim(own, target).mean().item()}
    if shuffled is not None:
        out["align/psnr_shuffled"] = psnr(shuffled, target).mean().item()
        out["align/ssim_shuffled"] = ssim(shuffled, target).mean().item()
        out["align/gap"] = out["align/psnr_own"] - out["align/psnr_shuffled"]
    return {k: round(v, 4) for k, v in out.items()}


def describe(step: int, values: dict[str, float]) -> str:
    """One line for the terminal."""
    own = f"{values['align/psnr_own']:.2f} dB (SSIM {values['align/ssim_own']:.3f})"
    if "align/gap" not in values:
        return f"step {step}: reconstruction PSNR {own} from each image's own visual prompt"
    return (f"step {step}: reconstruction PSNR {own} from each image's own visual prompt, "
            f"{values['align/psnr_shuffled']:.2f} dB (SSIM {values['align/ssim_shuffled']:.3f}) from another "
            f"image's; alignment gap {values['align/gap']:+.2f} dB")
