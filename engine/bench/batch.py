"""`reca bench batch`: the largest micro-batch of a preset that trains on this device.

One model and optimizer are built once; each candidate batch runs two full optimizer steps on
synthetic views of the model's sizes (the second one holds the optimizer state as well), and a
CUDA out-of-memory error marks it as not fitting. Candidates double from `--start`, then the gap
to the first failure is bisected, so a 48-image recipe costs about six tries. The step is eager
(bf16 autocast, the preset's activation checkpointing): compiled or graphed steps change shape
per candidate and must not capture a failing size; their memory is printed by `reca bench step`.
"""
from __future__ import annotations

import datetime as _dt
import gc
from typing import Callable

import torch

from reca.engine.bench.step import RESULTS, SyntheticLoader, _device_name, _sync, _versions, reca_alone, write_report
from reca.engine.config import apply_overrides
from reca.engine.presets import preset as get_preset
from reca.engine.build import build, resolve_device
from reca.engine.train import next_batches


def largest_fitting(fits: Callable[[int], bool], limit: int, start: int = 1) -> int:
    """The largest b in [1, limit] with fits(b), fits assumed monotone (a bigger batch never needs
    less memory); 0 when even 1 does not fit. Doubling from `start`, then bisection."""
    lo, hi, b = 0, limit + 1, max(1, min(start, limit))
    while lo < b < hi:
        if fits(b):
            lo, b = b, min(2 * b, hi - 1)
        else:
            hi = b
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def bench_batch(preset: str, *, limit: int | None, start: int, device: str, sets: list[str],
                out: str | None) -> dict:
    base = get_preset(preset)
    limit = limit or base.data.batch_size
    dev = resolve_device(device)
    overrides = ["train.mode=custom", "train.compile=false", "train.cuda_graph=false", f"train.device={device}",
                 f"data.batch_size={start}", "output.tensorboard=false", "optim.warmup_steps=1"]
    if reca_alone(base, sets):
        overrides.append("mix.cycle=recon")  # generation micro-batches: the larger activations
    c = build(apply_overrides(base, overrides + sets))
    c.loader.close()
    tries: list[dict] = []

    def fits(b: int) -> bool:
        c.loaders[c.objectives[0].name] = SyntheticLoader(b, c.model.views, seed=b)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        ok = True
        try:
            for _ in range(2):
                c.update(c, next_batches(c))
            _sync(dev)
        except torch.OutOfMemoryError:
            ok = False  # the handler ends before cleanup: the traceback's frames hold activations
        if not ok:
            c.optimizer.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
        peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
        tries.append({"batch": b, "fits": ok, "peak_memory_gb": peak if ok else None})
        print(f"  batch {b:4d}: {'fits' if ok else 'out of memory'}" + (f", peak {peak:.1f} GiB" if ok and peak else ""),
              flush=True)
        return ok

    print(f"{preset}: largest micro-batch on {_device_name(dev)} (eager step, limit {limit})", flush=True)
    best = largest_fitting(fits, limit, start)
    total = torch.cuda.get_device_properties(dev).total_memory / 2**30 if dev.type == "cuda" else None
    recipe = base.data.batch_size
    print(f"{preset}: largest micro-batch {best}" + (f" of {total:.0f} GiB" if total else "")
          + (f"; the recipe's {recipe} fits" if best >= recipe else f"; the recipe's {recipe} needs "
             f"grad_accum x{-(-recipe // max(best, 1))} or activation checkpointing"), flush=True)
    report = {"benchmark": "batch", "preset": preset, "largest_batch": best, "limit": limit,
              "recipe_batch": recipe, "tries": tries, "device": _device_name(dev), "device_memory_gb": total,
              "step": "eager, bf16 autocast on CUDA, preset checkpointing", "sets": sets, "versions": _versions(),
              "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    write_report(report, out, RESULTS if dev.type == "cuda" else None, f"batch_{preset}")
    return report
