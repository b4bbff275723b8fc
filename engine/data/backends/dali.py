"""Batch decoders: many encoded images -> both RecA views at once, on the GPU where there is one.

    backend = make_backend(cfg, views, batch_size, device)     # None: use Pillow
    und, gen, reasons = backend.decode_views(raws)
    # raws: [(bytes, box (x0, y0, x1, y1) in upright pixels, flip)] from `crop_box` on the
    # header's size; und [n_ok, 3, Hu, Hu], gen [n_ok, 3, Hg, Hg] float32 on backend.device,
    # rows for the samples whose reason is "" (a non-empty reason: the sample is bad).

Backends (`data.decoder`): "dali" (NVIDIA DALI: `mixed` = nvJPEG/nvImageCodec decode on the
GPU when CUDA is present, its CPU pipeline otherwise), "nvjpeg" (`torchvision.io.decode_jpeg`
on CUDA; see `nvjpeg`), "pil" (no backend: Pillow in the loader's workers). "auto" picks
dali on CUDA if installed, else nvjpeg on CUDA if torchvision is installed, else pil: on CPU
Pillow's draft-mode (DCT-scaled) decoding in worker processes beats a full-size decode.
Formats a backend does not take (`formats`; odd modes, transparency, GIF...) are decoded by
Pillow in the workers and copied into the batch, so every image means the same to all backends.
"""
from __future__ import annotations

import logging
from typing import Any, Protocol

import numpy as np
import torch

from reca.engine.errors import UserError

log = logging.getLogger("reca.engine.data")

Raw = tuple[bytes, tuple[int, int, int, int], bool]
PLAIN_MODES = frozenset({"RGB", "L"})  # 8-bit, no alpha: every decoder gives Pillow's pixels


class BatchBackend(Protocol):
    formats: frozenset[str]  # Pillow format names this backend decodes (mode in PLAIN_MODES)
    device: torch.device

    def decode_views(self, raws: list[Raw]) -> tuple[torch.Tensor, torch.Tensor, list[str]]: ...


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def make_backend(cfg: Any, views: Any, batch_size: int, device: torch.device) -> BatchBackend | None:
    """The backend `cfg.decoder` names (see the module docstring); None means Pillow."""
    choice = cfg.decoder
    if choice not in ("auto", "dali", "nvjpeg", "pil"):
        raise UserError(f"data.decoder must be auto, dali, nvjpeg or pil, got {choice!r}")
    cuda = device.type == "cuda"
    if choice == "auto":
        if not cuda:
            return None
        if dali_available():
            choice = "dali"
        else:
            from reca.engine.data.backends.nvjpeg import nvjpeg_available
            choice = "nvjpeg" if nvjpeg_available() else "pil"
    if choice == "pil":
        return None
    if choice == "dali":
        if not dali_available():
            raise UserError("data.decoder=dali needs NVIDIA DALI: pip install 'reca[dali]' "
                            "(nvidia-dali-cuda130; nvidia-dali-cuda120 for CUDA 12 torch)")
        return DaliBackend(views, cfg, batch_size, device)
    from reca.engine.data.backends.nvjpeg import NvjpegBackend, nvjpeg_available
    if not cuda or not nvjpeg_available():
        raise UserError("data.decoder=nvjpeg needs CUDA and torchvision")
    return NvjpegBackend(views, cfg, device)


class DaliBackend:
    """One DALI pipeline: decode -> ROI resize (cubic, antialiased) -> flip + normalise -> CHW.

    External inputs per sample: encoded bytes, ROI start/end (y, x), flip. The pipeline is
    rebuilt after a failed batch (DALI may leave it unusable); the failing batch is then decoded
    one sample at a time to name the bad ones (rare: headers were checked already).
    """

    formats = frozenset({"JPEG", "PNG", "WEBP", "BMP", "TIFF"})

    def __init__(self, views: Any, cfg: Any, batch_size: int, device: torch.device):
        self.views, self.cfg, self.batch_size, self.device = views, cfg, batch_size, device
        self.threads = max(1, int(getattr(cfg, "decode_threads", 2)))
        self._pipe: Any = None

    def _build(self) -> Any:
        from nvidia.dali import fn, pipeline_def, types

        v, gpu = self.views, self.device.type == "cuda"
        small = max(1, round(v.und_size * self.cfg.und_downscale))

        @pipeline_def(batch_size=self.batch_size, num_threads=self.threads, prefetch_queue_depth=1,
                      device_id=(self.device.index or 0) if gpu else None, exec_dynamic=True)
        def pipe():  # type: ignore[no-untyped-def]
            enc = fn.external_source(name="enc", dtype=types.UINT8)
            start = fn.external_source(name="start", dtype=types.FLOAT)
            end = fn.external_source(name="end", dtype=types.FLOAT)
            flip = fn.external_source(name="flip", dtype=types.INT32)
            img = fn.decoders.image(enc, device="mixed" if gpu else "cpu", output_type=types.RGB)

            def resize(x: Any, side: int, roi: bool) -> Any:
                extra = dict(roi_start=start, roi_end=end, roi_relative=False) if roi else {}
                return fn.resize(x, size=[side, side], interp_type=types.INTERP_CUBIC,
                                 antialias=True, **extra)

            und = resize(img, small, True)
            if small != v.und_size:  # down then up, as Pillow does it
                und = resize(und, v.und_size, False)
            gen = resize(img, v.gen_size, True)
            und = fn.crop_mirror_normalize(
                und, dtype=types.FLOAT, output_layout="CHW", mirror=flip,
                mean=[255 * m for m in v.und_mean], std=[255 * s for s in v.und_std])
            gen = fn.crop_mirror_normalize(gen, dtype=types.FLOAT, output_layout="CHW",
                                           mirror=flip, mean=[127.5] * 3, std=[127.5] * 3)
            return und, gen

        p = pipe()
        p.build()
        return p

    def _run(self, raws: list[Raw]) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pipe is None:
            self._pipe = self._build()
        p = self._pipe
        p.feed_input("enc", [np.frombuffer(d, np.uint8) for d, _, _ in raws])
        # DALI's ROI follows the layout: (y, x); floats keep Pillow's pixel-edge convention
        p.feed_input("start", [np.array([b[1], b[0]], np.float32) for _, b, _ in raws])
        p.feed_input("end", [np.array([b[3], b[2]], np.float32) for _, b, _ in raws])
        p.feed_input("flip", [np.array(int(f), np.int32) for _, _, f in raws])
        und, gen = p.run()
        return self._torch(und), self._torch(gen)

    def _torch(self, out: Any) -> torch.Tensor:
        if self.device.type != "cuda":
            return torch.from_numpy(np.array(out.as_array()))
        from nvidia.dali.plugin.pytorch import feed_ndarray

        t = out.as_tensor()
        dst = torch.empty(t.shape(), dtype=torch.float32, device=self.device)
        # on torch's current stream: the prefetch thread's own (the loader's events order it
        # against the step), or the step's stream itself when decoding in line
        feed_ndarray(t, dst, cuda_stream=torch.cuda.current_stream(self.device))
        return dst

    def decode_views(self, raws: list[Raw]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        try:
            und, gen = self._run(raws)
            return und, gen, [""] * len(raws)
        except Exception:
            self._pipe = None  # DALI says the pipeline is no longer valid after an error
        unds, gens, reasons = [], [], []
        for raw in raws:
            try:
                u, g = self._run([raw])
                unds.append(u)
                gens.append(g)
                reasons.append("")
            except Exception as e:  # DALI raises RuntimeError/IndexError for corrupt streams
                self._pipe = None
                reasons.append(f"DALI cannot decode it: {_dali_reason(e)}")
        if not unds:
            v = self.views
            return (torch.empty(0, 3, v.und_size, v.und_size, device=self.device),
                    torch.empty(0, 3, v.gen_size, v.gen_size, device=self.device), reasons)
        return torch.cat(unds), torch.cat(gens), reasons


def _dali_reason(e: Exception) -> str:
    """The informative line of a DALI error (they span many lines of traceback and advice)."""
    lines = [" ".join(ln.split()) for ln in str(e).splitlines()]
    for needle in ("failure", "Could not decode", "encountered:", "rror"):
        for ln in lines:
            if needle in ln and "pipeline is no longer valid" not in ln:
                return ln[ln.find(needle):][:200] if needle == "encountered:" else ln[:200]
    return type(e).__name__
