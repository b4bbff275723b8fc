"""Synthetic photographic-like JPEG corpus: smooth gradients, shapes, blurred texture, grain.

    python benchmarks/data/make_corpus.py OUT_DIR [--n 1000] [--side 1024] [--seed 0] [--captions] [--jobs N]

Noise alone compresses unlike photographs; these compose what JPEG sees in photos: smooth
large-scale shading, hard edges, mid-frequency texture and a little sensor-like grain.
Sizes vary around `side` (aspect 3:4 .. 16:9), quality 85..95 with 4:2:0 subsampling.
`--captions` writes `NAME.txt` beside each image (20-90 words), so that the same folder can be
the captioned source of a mixed recipe (`--set mix.caption_source=OUT_DIR`).
Each image depends on (seed, index) alone, so `--jobs` (processes) changes nothing but the time:
about 0.1 s per 1024 px image on one core, which the GPU suite's short device call cannot spare.
"""
from __future__ import annotations

import argparse
import functools
import os
from multiprocessing import Pool

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def photo(rng: np.random.Generator, side: int) -> Image.Image:
    aspect = rng.choice([0.75, 1.0, 1.333, 1.5, 1.778])
    w, h = int(side * (aspect if aspect >= 1 else 1)), int(side / (aspect if aspect >= 1 else 1 / aspect))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.zeros((h, w, 3), np.float32)
    for c in range(3):  # smooth lighting: a tilted plane plus a broad blob
        a, b, k = rng.normal(0, 60, 3)
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.2, 0.8) * side
        base[..., c] = 110 + a * xx / w + b * yy / h + k * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(4, 12)):  # objects: hard edges at several scales
        x0, y0 = rng.uniform(-0.1, 1.0, 2) * (w, h)
        s = rng.uniform(0.05, 0.4) * side
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = (x0, y0, x0 + s * rng.uniform(0.5, 2), y0 + s * rng.uniform(0.5, 2))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(shape, fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))  # lens softness
    tex = rng.normal(0, 1, (h // 8 + 1, w // 8 + 1)).astype(np.float32)  # mid-frequency texture
    tex_img = Image.fromarray(tex).resize((w, h), Image.Resampling.BICUBIC)
    a = np.asarray(img, np.float32) + 12 * np.asarray(tex_img)[..., None]
    a += rng.normal(0, 3, a.shape).astype(np.float32)  # grain
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


WORDS = ("a", "the", "red", "blue", "green", "yellow", "grey", "round", "square", "large", "small", "soft",
         "bright", "dark", "shape", "circle", "rectangle", "gradient", "light", "shadow", "surface", "texture",
         "grain", "edge", "corner", "background", "foreground", "over", "under", "beside", "with", "and", "of")


def caption(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, int(rng.integers(20, 91)))).capitalize() + "."


def write_one(i: int, out: str, side: int, seed: int, captions: bool) -> int:
    """Image i (and its caption): bytes written."""
    rng = np.random.default_rng([seed, i])
    path = os.path.join(out, f"img{i:05d}.jpg")
    photo(rng, side).save(path, "JPEG", quality=int(rng.integers(85, 96)))
    if captions:  # its own stream: the images do not depend on the flag
        with open(path[:-4] + ".txt", "w") as f:
            f.write(caption(np.random.default_rng([seed, i, 1])))
    return os.path.getsize(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--side", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--captions", action="store_true", help="write NAME.txt captions beside the images")
    ap.add_argument("--jobs", type=int, default=1, help="processes writing images (0: one per CPU)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    one = functools.partial(write_one, out=args.out, side=args.side, seed=args.seed, captions=args.captions)
    jobs = args.jobs if args.jobs > 0 else os.cpu_count() or 1
    if jobs == 1:
        total = sum(map(one, range(args.n)))
    else:
        with Pool(jobs) as pool:
            total = sum(pool.imap_unordered(one, range(args.n), chunksize=4))
    print(f"{args.n} JPEGs in {args.out}, {total / max(args.n, 1) / 1024:.0f} KiB average")


if __name__ == "__main__":
    main()
