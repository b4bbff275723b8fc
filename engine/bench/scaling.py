"""`reca bench step` under torchrun: throughput per GPU and in aggregate at N ranks, beside one
rank's measured in the same job, and the scaling efficiency between them.

    torchrun --nproc-per-node 8 -m reca.engine bench step --preset harmon-1.5b --data DIR

One mode is timed (the last of `--modes`, `fast` by default), under `distributed.strategy` as
training runs it (`reca.engine.distributed.apply_strategy`: DDP, or FSDP2 per block). First
rank 0 alone times the same step on one device while the other ranks wait (the baseline;
`--no-baseline` skips it for a model that does not fit one device), then every rank times the
step together:

    per GPU     images/s of one rank (its micro-batches, the slowest rank's time)
    aggregate   per GPU x N: the job's images/s (the global batch grows with N)
    efficiency  per GPU at N / one rank alone: 1.0 is perfect scaling; what is lost is the
                gradient all-reduce / reduce-scatter and the parameter all-gathers left exposed

MFU per GPU is against the matmul peak rank 0 measures in the same job. The build is reported
too: its time, the most device memory any rank reached while building (under fsdp its shards
and one whole tensor in flight: the meta build's promise), and rank 0's host peak. Rank 0
prints and writes the JSON (`step_scaling_<preset>_<device>.json`, device, versions, date).
"""
from __future__ import annotations

import datetime as _dt
import resource
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from reca.engine.bench.step import (PAPER_GPU_HOURS, RESULTS, _device_name, _versions, measure, micro_batch_flops,
                                    mode_config, peak_tflops, timed_steps, use_synthetic, write_report)
from reca.engine.presets import preset as get_preset


def bench_scaling(preset: str, *, batch: int | None, steps: int, warmup: int, mode: str, data: str,
                  sets: list[str], out: str | None, baseline: bool = True) -> dict:
    from reca.engine.distributed import apply_strategy, build_on_ranks, init_process_group, whole_on_rank0

    r, device = init_process_group()
    base = get_preset(preset)
    cfg = mode_config(base, mode, batch=batch, steps=steps, warmup=warmup, device=str(device), data=data, sets=sets)
    peak, dtype = peak_tflops(device)
    say = print if r.main else (lambda *a, **k: None)
    say(f"peak ({dtype} matmul, rank 0, measured in this run): {peak:.2f} TFLOP/s on {_device_name(device)}; "
        f"{r.world_size} ranks, distributed.strategy={cfg.distributed.strategy}, mode {mode}", flush=True)
    single = None
    if baseline:
        if r.main:  # one device alone, as a one-GPU run: the baseline of the efficiency
            single = measure(cfg, steps, warmup, data)
            say(f"  1 rank : {single['images_per_s']:9.2f} img/s  MFU {100 * single['tflops'] / peak:5.1f}%", flush=True)
        dist.barrier()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    c = build_on_ranks(cfg, r, whole_on_rank0(cfg, r))
    built = torch.tensor([time.perf_counter() - t0, torch.cuda.max_memory_allocated(device) / 2**30
                          if device.type == "cuda" else 0.0], device=device, dtype=torch.float64)
    dist.all_reduce(built, op=dist.ReduceOp.MAX)  # under fsdp: the largest shard set plus one tensor in flight
    use_synthetic(c, data)
    micro_flops, _, _, how = micro_batch_flops(c)
    step_c = apply_strategy(c, r)
    dist.barrier()
    dt, losses, wait = timed_steps(c, step_c, steps, warmup)
    slowest = torch.tensor([dt, wait], device=device, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # the job moves at its slowest rank's pace
    dt, wait = float(slowest[0]), float(slowest[1])
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    c.close()

    per_rank_images = steps * cfg.optim.grad_accum * cfg.data.batch_size
    per_gpu = per_rank_images / dt
    row = {"world_size": r.world_size, "strategy": cfg.distributed.strategy, "mode": mode,
           "step_ms": 1e3 * dt / steps, "images_per_s_per_gpu": per_gpu,
           "images_per_s": per_gpu * r.world_size, "tflops_per_gpu": micro_flops / cfg.data.batch_size * per_gpu / 1e12,
           "peak_memory_gb_rank0": peak_mem, "data_wait": wait / dt, "final_loss": float(losses[-1]),
           "flop_count": how, "build_s": float(built[0]),
           "build_peak_memory_gb_max_rank": float(built[1]) if device.type == "cuda" else None,
           # rank 0's host high-water mark over the whole job (the one-rank baseline included)
           "host_peak_rss_gb_rank0": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    row["mfu"] = row["tflops_per_gpu"] / peak
    row["scaling_efficiency"] = per_gpu / single["images_per_s"] if single else None
    base_images = base.train.steps * base.optim.grad_accum * base.data.batch_size
    row["recipe_gpu_hours"] = base_images / per_gpu / 3600  # GPU-hours do not shrink with N: wall hours do
    report = {"benchmark": "step_scaling", "preset": preset, "batch_per_rank": cfg.data.batch_size,
              "steps": steps, "warmup": warmup, "data": data, "device": _device_name(device),
              "peak_tflops": peak, "peak_dtype": dtype, "one_rank": single, "ranks": row,
              "recipe_images": base_images, "paper_gpu_hours": PAPER_GPU_HOURS.get(preset),
              "versions": _versions(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    if r.main:
        eff = f"{100 * row['scaling_efficiency']:.1f}%" if single else "- (no one-rank baseline)"
        say(f"{r.world_size:>2} ranks: {per_gpu:9.2f} img/s per GPU, {row['images_per_s']:9.2f} aggregate, "
            f"MFU {100 * row['mfu']:5.1f}%, scaling efficiency {eff}; the recipe ({base_images:,} images): "
            f"{row['recipe_gpu_hours']:.2f} GPU-hours, {row['recipe_gpu_hours'] / r.world_size:.2f} h on "
            f"{r.world_size} GPUs", flush=True)
        mem = f", at most {row['build_peak_memory_gb_max_rank']:.2f} GiB on a device" if device.type == "cuda" else ""
        say(f"build ({cfg.distributed.strategy}): {row['build_s']:.1f} s{mem}; rank 0 host peak "
            f"{row['host_peak_rss_gb_rank0']:.2f} GiB", flush=True)
        write_report(report, out, RESULTS if device.type == "cuda" else Path(tempfile.mkdtemp(prefix="reca-bench-")),
                     f"step_scaling_{preset}_{r.world_size}x")
    dist.barrier()
    # the job ends here: leaving the group to the interpreter's exit once aborted a rank on CI
    # ("terminate called without an active exception" from a gloo thread, exit -6)
    dist.destroy_process_group()
    return report
