"""Fit the tiny preset's pixel-patch codebook (`codebook_tiny.pt`) on the demo photographs.

    python -m reca.models.showo.fit_codebook [OUT.pt] [--codes 256] [--patch 4]

The 14 photographs bundled with scikit-image (the `demo` source) are cut into square crops
(the whole image stretched, and crops of 60-100 % of the short side, 40 in all per image),
each resized to 32 px as the tiny preset sees them ([-1, 1], bilinear), and split into
p x p patches in `reca.models.layers.patchify` order. K-means (k-means++ seeding, 60 Lloyd
iterations, seed 0) over those patches gives K centroids [K, 3 p p]; grey images count as
three equal channels. Deterministic: the same inputs give the same file.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from reca.models.layers import patchify

_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "hubble_deep_field", "immunohistochemistry",
           "retina", "colorwheel", "camera", "moon", "grass", "gravel", "brick")


def demo_patches(patch: int, size: int = 32, crops: int = 40, seed: int = 0) -> torch.Tensor:
    import skimage.data

    rng = np.random.default_rng(seed)
    out = []
    for name in _PHOTOS:
        try:
            img = getattr(skimage.data, name)()
        except Exception:  # a photograph missing from this scikit-image release
            continue
        img = np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3]
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()[None] / 127.5 - 1
        h, w = x.shape[-2:]
        views = [x]
        for _ in range(crops - 1):
            side = int(min(h, w) * rng.uniform(0.6, 1.0))
            top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            views.append(x[..., top:top + side, left:left + side])
        for v in views:
            v = F.interpolate(v, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            out.append(patchify(v.clamp(-1, 1), patch)[0])
    return torch.cat(out)


def kmeans(x: torch.Tensor, k: int, iters: int = 60, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = x[torch.randint(len(x), (1,), generator=g)]
    for _ in range(k - 1):  # k-means++ seeding
        d = torch.cdist(x, centers).min(1).values ** 2
        centers = torch.cat([centers, x[torch.multinomial(d / d.sum(), 1, generator=g)]])
    for _ in range(iters):
        assign = torch.cdist(x, centers).argmin(1)
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).float()[:, None]
        centers = torch.where(counts > 0, sums / counts.clamp_min(1), centers)
    return centers


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="models/showo/codebook_tiny.pt")
    ap.add_argument("--codes", type=int, default=256)
    ap.add_argument("--patch", type=int, default=4)
    args = ap.parse_args(argv)
    x = demo_patches(args.patch)
    book = kmeans(x, args.codes)
    err = (x - book[torch.cdist(x, book).argmin(1)]).pow(2).mean()
    torch.save(book.contiguous().clone(), args.out)
    print(f"{len(x)} patches -> {args.codes} codes of {x.shape[1]} values; mean squared error {err:.4f} -> {args.out}")


if __name__ == "__main__":
    main()
