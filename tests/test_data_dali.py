"""Batch decoders against Pillow on the same files: DALI's CPU pipeline here (skipped, with the
reason, when DALI is not installed), DALI `mixed` and nvJPEG on CUDA (`gpu`-marked).

Tolerances, in 8-bit levels of the [0, 255] image: the decoders share libjpeg-turbo-class IDCTs
and the same box; they differ in the cubic resampler's rounding: max 2, mean 0.5 per pixel; the
deliberate und_downscale path resamples twice: max 8, mean 1.5.
"""
from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image

from reca.engine.data import build_loader
from reca.engine.data.backends.dali import dali_available
from reca.engine.data.backends.nvjpeg import nvjpeg_available
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
    assert loader.state_dict()["position"] - 40 >= 2 * (len(bad) - 1)  # passed over in >= 2 epochs
    assert loader.skipped in (len(bad) - 1, len(bad))  # ... and counted once each
    for name in set(bad) - {"cut_late.jpg"}:  # libjpeg may decode a short tail as grey: allowed
        assert sum(name in r.getMessage() for r in caplog.records) == 1, name
    first = build_loader(cfg(root, decoder="dali", decode_device="cpu", batch_size=5), VIEWS)
    part = [next(first) for _ in range(3)]
    again = build_loader(cfg(root, decoder="dali", decode_device="cpu", batch_size=5), VIEWS)
    again.load_state_dict(first.state_dict())
    assert [k for b in part + [next(again) for _ in range(5)] for k in b.keys] == [k for b in batches for k in b.keys]


def gpu_decoder(decoder: str) -> None:
    if decoder == "dali" and not dali_available():
        pytest.skip("NVIDIA DALI is not installed")
    if decoder == "nvjpeg" and not nvjpeg_available():
        pytest.skip("torchvision is not installed")


@pytest.mark.gpu
@pytest.mark.parametrize("decoder", ["dali", "nvjpeg"])
def test_gpu_decoders_agree_with_pillow_and_fill_fixed_buffers(tmp_path, decoder):
    gpu_decoder(decoder)
    root = write(corpus(tmp_path), {"broken.jpg": b"\xff\xd8\xff garbage"})
    for prefetch in (True, False):
        compare(root, decoder, "cuda", batches=4, prefetch=prefetch)
    compare(root, decoder, "cuda", 0.5)
    for prefetch, hold, sets in ((False, 1, 1), (False, 2, 2), (True, 1, 2), (True, 2, 3)):
        loader = build_loader(cfg(root, decoder=decoder, decode_device="cuda", prefetch=prefetch), VIEWS, hold=hold)
        assert loader.prefetch == prefetch
        ptrs = [(b.und.data_ptr(), b.gen.data_ptr()) for b in (next(loader) for _ in range(2 * sets))]
        assert next(loader).und.is_cuda and ptrs[:sets] == ptrs[sets:] and len(set(ptrs)) == sets
        loader.close()


@pytest.mark.gpu
@pytest.mark.parametrize("decoder", ["dali", "nvjpeg"])
@pytest.mark.parametrize("hold", [1, 2])
def test_gpu_prefetch_equals_in_line_decoding(tmp_path, decoder, hold):
    """The prefetched batches (another thread, another stream) are the in-line ones, bit for
    bit, including when a step holds `hold` batches at once and reads them only later."""
    gpu_decoder(decoder)
    gif = encode(Image.fromarray(photo()), "GIF")  # decoded by Pillow, copied into the batch
    root = write(corpus(tmp_path), {"broken.jpg": b"\xff\xd8\xff garbage", "p.gif": gif})
    c = lambda p: cfg(root, decoder=decoder, decode_device="cuda", batch_size=3, prefetch=p)  # noqa: E731
    inline, ahead = build_loader(c(False), VIEWS, hold=hold), build_loader(c(True), VIEWS, hold=hold)
    try:
        for _ in range(4):
            a = [next(inline) for _ in range(hold)]
            b = [next(ahead) for _ in range(hold)]
            for x, y in zip(a, b):  # read after all `hold` were taken, as a step with accumulation does
                assert x.keys == y.keys and torch.equal(x.positions, y.positions)
                assert torch.equal(x.und, y.und) and torch.equal(x.gen, y.gen)
            assert ahead.state_dict() == inline.state_dict() and ahead.skipped == inline.skipped
        assert inline.skipped > 0
    finally:
        inline.close()
        ahead.close()


@pytest.mark.gpu
@pytest.mark.parametrize("decoder", ["dali", "nvjpeg"])
def test_gpu_prefetch_never_overwrites_a_batch_a_step_still_reads(tmp_path, decoder):
    """A long "step" (a GPU sleep) reads each batch at its end: the producer, which refills the
    set as soon as the next batch is taken on the host, must wait for the step on the GPU."""
    gpu_decoder(decoder)
    root = corpus(tmp_path)
    c = lambda p: cfg(root, decoder=decoder, decode_device="cuda", batch_size=4, prefetch=p)  # noqa: E731
    ref = build_loader(c(False), VIEWS)
    expected = [next(ref).und.clone() for _ in range(6)]
    loader = build_loader(c(True), VIEWS, hold=1)
    seen = []
    batch = next(loader)
    for _ in range(6):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the step reads its batch
        seen.append(batch.und.clone())
        batch = next(loader)  # releases the set just read: refilled once the clone is done
    torch.cuda.synchronize()
    loader.close()
    for k, (x, y) in enumerate(zip(expected, seen)):
        assert torch.equal(x, y), f"batch {k} was overwritten while the step still read it"
