"""nvJPEG through `torchvision.io.decode_jpeg(device="cuda")`: the GPU decoder when DALI is absent.

Same contract as `data_dali.DaliBackend.decode_views` (see there): JPEG only (other formats go
through Pillow in the workers). Views are cut on the GPU with the Pillow semantics: the shared
box, bicubic antialiased resize (`F.interpolate(..., antialias=True)`, a=-0.5 like Pillow),
rounding to uint8 levels as Pillow does, flip, then normalisation. GPU-only: tested by the
`gpu`-marked tests.

Streams: torchvision decodes on a stream of its own, makes torch's current stream wait for it,
and allocates the images on the current stream; everything after runs on the current stream.
`decode_jpeg` also works on the host (header parsing, Huffman decoding of what the hardware
decoder does not take, a host wait on its own stream), which is why the loader calls this from
its prefetch thread, on that thread's stream, rather than from the training thread.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

Raw = tuple[bytes, tuple[int, int, int, int], bool]


def nvjpeg_available() -> bool:
    try:
        import torchvision.io  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


class NvjpegBackend:
    formats = frozenset({"JPEG"})

    def __init__(self, views: Any, cfg: Any, device: torch.device):
        self.views, self.cfg, self.device = views, cfg, device
        v = views
        self.mean = torch.tensor(v.und_mean, device=device).view(3, 1, 1) * 255
        self.std = torch.tensor(v.und_std, device=device).view(3, 1, 1) * 255

    def _decode(self, datas: list[bytes]) -> list[torch.Tensor]:
        from torchvision.io import ImageReadMode, decode_jpeg

        cpu = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        out = decode_jpeg(cpu, mode=ImageReadMode.RGB, device=self.device, apply_exif_orientation=True)
        return list(out)  # [3, H, W] uint8 each, on the GPU

    @staticmethod
    def _resize(x: torch.Tensor, side: int) -> torch.Tensor:
        """[3, h, w] float levels -> [3, side, side], rounded to uint8 levels like Pillow."""
        y = F.interpolate(x[None], size=(side, side), mode="bicubic", antialias=True, align_corners=False)
        return y[0].round_().clamp_(0, 255)

    def _views(self, img: torch.Tensor, box: tuple[int, int, int, int], flip: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.views
        x0, y0, x1, y1 = box
        crop = img[:, y0:y1, x0:x1].float()
        small = max(1, round(v.und_size * self.cfg.und_downscale))
        und = self._resize(crop, small)
        if small != v.und_size:
            und = self._resize(und, v.und_size)
        gen = self._resize(crop, v.gen_size)
        if flip:
            und, gen = und.flip(-1), gen.flip(-1)
        return (und - self.mean) / self.std, gen / 127.5 - 1.0

    def decode_views(self, raws: list[Raw]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        try:
            imgs: list[torch.Tensor | None] = list(self._decode([d for d, _, _ in raws]))
            reasons = [""] * len(raws)
        except RuntimeError:  # one corrupt stream fails the batch: find it one by one
            imgs, reasons = [], []
            for d, _, _ in raws:
                try:
                    imgs.append(self._decode([d])[0])
                    reasons.append("")
                except RuntimeError as e:
                    imgs.append(None)
                    reasons.append(f"nvJPEG cannot decode it: {' '.join(str(e).split())[:200]}")
        pairs = [self._views(img, box, flip) for img, (_, box, flip) in zip(imgs, raws) if img is not None]
        v = self.views
        if not pairs:
            return (torch.empty(0, 3, v.und_size, v.und_size, device=self.device),
                    torch.empty(0, 3, v.gen_size, v.gen_size, device=self.device), reasons)
        return torch.stack([u for u, _ in pairs]), torch.stack([g for _, g in pairs]), reasons
