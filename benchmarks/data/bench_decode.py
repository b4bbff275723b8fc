"""Images/s of each available decoder on a folder of JPEGs, Pillow measured in the same run.

    python benchmarks/data/bench_decode.py CORPUS [--batch 64] [--batches 8] [--views 448,512] [--step-ms 50]

Two figures per decoder: decode only (encoded bytes -> full RGB), and decode + both RecA views
(the loader's own path: `data.decoder=...`, one process, no workers, in-memory bytes so disk
speed does not count). Prints ratios to Pillow; writes benchmarks/results/data_<device>.json.
On CUDA, a third per GPU decoder: the loader's wait per batch beside a simulated training step
(`--step-ms` of GPU time, then a host wait for it, as a step that reads a value back does),
decoding in line vs prefetched in the loader's thread (`data.prefetch`).
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image

from reca.engine.config import DataConfig
from reca.engine.data import Loader
from reca.engine.data.backends.dali import dali_available, make_backend
from reca.engine.data.backends.nvjpeg import nvjpeg_available
from reca.models.adapter import ViewSpec


class Memory:
    """A folder read into memory once: the benchmark times decoding, not the disk."""

    def __init__(self, root: str):
        names = sorted(f for f in os.listdir(root) if f.lower().endswith((".jpg", ".jpeg")))
        self.names, self.data = names, [open(os.path.join(root, f), "rb").read() for f in names]

    def __len__(self) -> int:
        return len(self.names)

    def key(self, i: int) -> str:
        return self.names[i]

    def read(self, i: int) -> bytes:
        return self.data[i]


def decode_only(decoder: str, src: Memory, n: int, device: torch.device) -> float:
    t0 = time.perf_counter()
    if decoder == "pil":
        for i in range(n):
            Image.open(io.BytesIO(src.data[i % len(src)])).convert("RGB").load()
    elif decoder == "nvjpeg":
        from torchvision.io import decode_jpeg
        for k in range(0, n, 64):
            decode_jpeg([torch.frombuffer(bytearray(src.data[i % len(src)]), dtype=torch.uint8)
                         for i in range(k, min(n, k + 64))], device=device)
        torch.cuda.synchronize()
    else:
        from nvidia.dali import fn, pipeline_def, types
        gpu = device.type == "cuda"

        @pipeline_def(batch_size=64, num_threads=os.cpu_count() or 2, device_id=0 if gpu else None,
                      prefetch_queue_depth=1, exec_dynamic=True)
        def pipe():  # type: ignore[no-untyped-def]
            return fn.decoders.image(fn.external_source(name="enc", dtype=types.UINT8),
                                     device="mixed" if gpu else "cpu", output_type=types.RGB)
        p = pipe()
        p.build()
        t0 = time.perf_counter()
        for k in range(0, n, 64):
            p.feed_input("enc", [np.frombuffer(src.data[i % len(src)], np.uint8) for i in range(k, k + 64)])
            p.run()
        n = -(-n // 64) * 64
    return n / (time.perf_counter() - t0)


def with_views(decoder: str, src: Memory, views: ViewSpec, batch: int, batches: int,
               device: torch.device) -> float:
    cfg = DataConfig(source="bench", batch_size=batch, decoder=decoder, decode_device=str(device),
                     decode_threads=os.cpu_count() or 2)
    backend = make_backend(cfg, views, batch, device)
    loader = Loader(src, views, cfg, backend=backend, cache_bytes=0)  # no cache: decode every time
    next(loader)  # warm-up: pipeline build, CUDA context, allocator
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(batches):
        next(loader)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * batches / (time.perf_counter() - t0)


def overlap(decoder: str, src: Memory, views: ViewSpec, batch: int, batches: int,
            device: torch.device, step_ms: float) -> dict:
    """Data wait (ms per batch) and images/s beside a simulated step, in line vs prefetched."""
    cycles = int(step_ms * _cycles_per_ms())
    out = {}
    for prefetch in (False, True):
        cfg = DataConfig(source="bench", batch_size=batch, decoder=decoder, decode_device=str(device),
                         decode_threads=os.cpu_count() or 2, prefetch=prefetch)
        loader = Loader(src, views, cfg, backend=make_backend(cfg, views, batch, device), cache_bytes=0,
                        prefetch=prefetch)
        next(loader)  # warm-up
        torch.cuda.synchronize()
        wait0, t0 = loader.wait_seconds, time.perf_counter()
        for _ in range(batches):
            next(loader)
            torch.cuda._sleep(cycles)  # the step's GPU time ...
            torch.cuda.current_stream().synchronize()  # ... and its one host wait
        dt = time.perf_counter() - t0
        out["prefetch" if prefetch else "in_line"] = {
            "data_wait_ms": 1000 * (loader.wait_seconds - wait0) / batches, "images_per_s": batch * batches / dt}
        loader.close()
    return out


def _cycles_per_ms() -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000_000)  # clocks up
    start.record()
    torch.cuda._sleep(50_000_000)
    end.record()
    end.synchronize()
    return 50_000_000 / start.elapsed_time(end)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--views", default="448,512", help="understanding,generation side")
    ap.add_argument("--step-ms", type=float, default=50.0, help="GPU time of the simulated step (CUDA only)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results"))
    args = ap.parse_args()
    src = Memory(args.corpus)
    u, g = (int(x) for x in args.views.split(","))
    views = ViewSpec(und_size=u, und_mean=(0.5,) * 3, und_std=(0.5,) * 3, gen_size=g)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    decoders = ["pil"] + (["dali"] if dali_available() else []) + (["nvjpeg"] if cuda and nvjpeg_available() else [])
    n = args.batch * args.batches
    rows = {}
    for d in decoders:
        rows[d] = {"decode_only": decode_only(d, src, n, device),
                   "decode_and_views": with_views(d, src, views, args.batch, args.batches, device)}
    base = rows["pil"]
    print(f"{'decoder':8} {'decode img/s':>13} {'x pil':>6} {'+views img/s':>13} {'x pil':>6}")
    for d, r in rows.items():
        r["ratio_decode_only"] = r["decode_only"] / base["decode_only"]
        r["ratio_decode_and_views"] = r["decode_and_views"] / base["decode_and_views"]
        print(f"{d:8} {r['decode_only']:13.1f} {r['ratio_decode_only']:6.2f} "
              f"{r['decode_and_views']:13.1f} {r['ratio_decode_and_views']:6.2f}")
    overlaps = {d: overlap(d, src, views, args.batch, args.batches, device, args.step_ms)
                for d in decoders if cuda and d != "pil"}
    if overlaps:
        print(f"beside a {args.step_ms:g} ms step, in line -> prefetched:")
    for d, r in overlaps.items():
        a, b = r["in_line"], r["prefetch"]
        print(f"{d:8} data wait {a['data_wait_ms']:8.2f} -> {b['data_wait_ms']:8.2f} ms/batch, "
              f"{a['images_per_s']:8.1f} -> {b['images_per_s']:8.1f} img/s")
    name = torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine())
    versions = {"torch": torch.__version__, "pillow": PIL.__version__, "numpy": np.__version__}
    if dali_available():
        import nvidia.dali
        versions["dali"] = nvidia.dali.__version__
    try:
        import torchvision
        versions["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    out = {"device": name, "cpus": os.cpu_count(), "date": datetime.date.today().isoformat(),
           "versions": versions, "corpus": {"path": args.corpus, "images": len(src)},
           "batch": args.batch, "batches": args.batches, "views": [u, g],
           "note": "one process; Pillow decodes in draft mode (DCT-scaled) in the views figure",
           "results": rows, "step_ms": args.step_ms, "overlap": overlaps}
    tag = "cuda" if cuda else "cpu"
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"data_{tag}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print("wrote", path, "on", name)


if __name__ == "__main__":
    main()
