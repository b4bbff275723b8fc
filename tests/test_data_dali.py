"""Batch decoders against Pillow on the same files: DALI's CPU pipeline here (skipped, with the
reason, when DALI is not installed), DALI `mixed` and nvJPEG on CUDA (`gpu`-marked).

Tolerances, in 8-bit levels of the [0, 255] image: the decoders share libjpeg-turbo-class IDCTs
and the same box; they differ in the cubic resampler's rounding: max 2, mean 0.5 per pixel; the
deliberate und_downscale path resamples twice: max 8, mean 1.5.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from reca.engine.data import build_loader
from reca.engine.data_dali import dali_available
from reca.engine.data_nvjpeg import nvjpeg_available
from test_data import VIEWS, broken_images, cfg, encode, photo, unusual_images, write

needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed: pip install 'reca[dali]'")


def corpus(root):
    files = {}
    for i in range(9):
        fmt = ("JPEG", "PNG", "WEBP")[i % 3]
        img = Image.fromarray(photo(96 + 8 * i, 72 + 4 * i, seed=i))
        files[f"p{i}.{fmt.lower()}"] = encode(img, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    files["grey.jpg"] = encode(Image.fromarray(photo(seed=20)).convert("L"), "JPEG")
    return write(root, files)


def levels(a: torch.Tensor, b: torch.Tensor, std: torch.Tensor) -> tuple[float, float]:
    d = ((a.cpu() - b.cpu()) * std * 255).abs()
    return float(d.max()), float(d.mean())


def compare(root, decoder: str, device: str, downscale: float = 1.0, batches: int = 3, **kw) -> None:
    c = lambda dec: cfg(root, decoder=dec, decode_device=device, und_downscale=downscale, **kw)  # noqa: E731
    ref, got = build_loader(c("pil"), VIEWS), build_loader(c(decoder), VIEWS)
    assert got.backend is not None
    und_std = torch.tensor(VIEWS.und_std)[:, None, None]
    limit = (2.0, 0.5) if downscale == 1.0 else (8.0, 1.5)
    for _ in range(batches):
        a, b = next(ref), next(got)
        assert a.keys == b.keys and torch.equal(a.positions, b.positions) and a.captions == b.captions
        assert b.und.shape == a.und.shape and b.gen.shape == a.gen.shape
        for x, y, std, lim in ((a.und, b.und, und_std, limit), (a.gen, b.gen, torch.tensor(0.5), (2.0, 0.5))):
            mx, mean = levels(x, y, std)
            assert mx <= lim[0] and mean <= lim[1], (mx, mean)
    assert got.skipped == ref.skipped


@needs_dali
@pytest.mark.parametrize("downscale", [1.0, 0.5])
def test_dali_cpu_agrees_with_pillow(tmp_path, downscale):
    compare(corpus(tmp_path), "dali", "cpu", downscale)


@needs_dali
def test_dali_cpu_odd_formats_fall_back_to_pillow(tmp_path):
    compare(write(tmp_path, unusual_images()), "dali", "cpu", batches=4, crop_scale=1.0)


@needs_dali
def test_dali_cpu_bad_files_are_skipped_and_named_once(tmp_path, caplog):
    jpeg = encode(Image.fromarray(photo()), "JPEG")
    bad = {**broken_images(), "cut_late.jpg": jpeg[: len(jpeg) - 40]}  # header fine, data not
    root = write(corpus(tmp_path), bad)
    loader = build_loader(cfg(root, decoder="dali", decode_device="cpu", batch_size=5), VIEWS)
    with caplog.at_level(logging.WARNING, logger="reca.engine.data"):
        batches = [next(loader) for _ in range(8)]
    assert all(b.und.shape[0] == 5 == len(b.keys) for b in batches)
    assert not any(k in bad for b in batches for k in b.keys if k != "cut_late.jpg")
    assert loader.skipped == loader.state_dict()["position"] - 40
    for name in set(bad) - {"cut_late.jpg"}:  # libjpeg may decode a short tail as grey: allowed
        assert sum(name in r.getMessage() for r in caplog.records) == 1, name
    first = build_loader(cfg(root, decoder="dali", decode_device="cpu", batch_size=5), VIEWS)
    part = [next(first) for _ in range(3)]
    again = build_loader(cfg(root, decoder="dali", decode_device="cpu", batch_size=5), VIEWS)
    again.load_state_dict(first.state_dict())
    assert [k for b in part + [next(again) for _ in range(5)] for k in b.keys] == [k for b in batches for k in b.keys]


@pytest.mark.gpu
@pytest.mark.parametrize("decoder", ["dali", "nvjpeg"])
def test_gpu_decoders_agree_with_pillow_and_fill_fixed_buffers(tmp_path, decoder):
    if decoder == "dali" and not dali_available():
        pytest.skip("NVIDIA DALI is not installed")
    if decoder == "nvjpeg" and not nvjpeg_available():
        pytest.skip("torchvision is not installed")
    root = write(corpus(tmp_path), {"broken.jpg": b"\xff\xd8\xff garbage"})
    compare(root, decoder, "cuda", batches=4)
    compare(root, decoder, "cuda", 0.5)
    loader = build_loader(cfg(root, decoder=decoder, decode_device="cuda"), VIEWS)
    a, b = next(loader), next(loader)
    assert a.und.is_cuda and a.und.data_ptr() == b.und.data_ptr() and a.gen.data_ptr() == b.gen.data_ptr()
