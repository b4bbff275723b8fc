"""`reca bench memory`: a preset's peak memory per rank, measured by running its training step on
fake tensors (`reca.engine.bench.memstep`), beside the analytic projection of `reca info
--world-size` (`reca.engine.bench.memory`) and their ratio; `--validate` checks the fake
measurement against the same step on real CPU tensors; `--largest` finds the largest micro-batch
that fits each card.

What the figure does not cover, and the margin kept for it: the CUDA context (about 0.5 GiB on
an H100 with CUDA 12), NCCL's buffers (about 1 GiB at 8 ranks), the caching allocator's
fragmentation (about 5-10 % of the peak; less with expandable segments). A card fits when the
measured peak is at most `USABLE` (90 %) of its memory: an 8 GiB margin on an 80 GiB card.
"""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import torch

from reca.engine.bench.fake import CATEGORIES
from reca.engine.bench.memory import USABLE, memory_per_rank
from reca.engine.build import resolve_mode
from reca.engine.bench.memstep import bench_config, largest_shard_bytes, measure_step, startup_host_bytes, uses_fsdp
from reca.engine.config import RunConfig, apply_overrides
from reca.engine.errors import UserError

CARDS_GIB = (80, 48, 40)
NOT_COVERED = ("the CUDA context (~0.5 GiB), NCCL's buffers (~1 GiB at 8 ranks) and the allocator's "
               f"fragmentation (~5-10 %): a card fits at most {USABLE:.0%} of its memory")
VALIDATE_LIMIT = 50_000_000  # parameters: --validate allocates the real model on this machine
GIB = 2**30


def bench_memory(cfg: RunConfig, *, name: str, world_size: int, cards: tuple[int, ...] = CARDS_GIB,
                 largest: bool = False, json_out: str | None = None) -> dict:
    """Measure, print the table and write `json_out`; returns the report."""
    report = memory_report(cfg, world_size, cards=cards)
    report["preset"] = name
    if largest:
        report["largest"] = largest_batches(cfg, world_size, cards, first=report)
    for line in format_report(report):
        print(line, flush=True)
    if json_out:
        path = Path(json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
        print(f"wrote {path}")
    return report


def memory_report(cfg: RunConfig, world_size: int, *, cards: tuple[int, ...] = CARDS_GIB,
                  startup: bool = True) -> dict:
    """One measured step with its projection and verdicts (bytes; see `format_report`)."""
    captured = resolve_mode(cfg, torch.device("cuda")).train.cuda_graph  # train.mode=fast: a CUDA graph
    cfg = bench_config(cfg)
    m = measure_step(cfg, world_size, captured=captured)
    projected = projection(cfg, world_size)
    peak = m["peak_device_bytes"]
    report = {
        "kind": "fake-tensor measurement on the CPU (FakeTensorMode + torch.distributed._tools memory trackers), "
                "not a GPU run",
        "world_size": world_size, "path": "fsdp2" if uses_fsdp(cfg, world_size) else "one process",
        "batch": cfg.data.batch_size, "grad_accum": cfg.optim.grad_accum, "cycle": list(cfg.mix.cycle),
        "tokens_per_rank": m["pack_tokens"], "checkpoint_every": cfg.train.checkpoint_every, "cuda_graph": captured,
        "ema": cfg.train.ema,
        "cpu_offload": cfg.distributed.cpu_offload, "ema_on_host": _ema_on_host(cfg),
        "peak_device_bytes": peak, "categories": m["categories"], "where": m["where"],
        "peak_step_host_bytes": m["peak_step_host_bytes"],
        "peak_host_bytes": startup_host_bytes(cfg) if startup else None,
        "peak_host_bytes_init_from": largest_shard_bytes(cfg, world_size) if startup else None,
        "projected": projected, "measured_over_projected": peak / projected["total"],
        "fits": {str(g): peak <= USABLE * g * GIB for g in cards}, "usable": USABLE, "not_covered": NOT_COVERED,
        "seconds": m["seconds"], "torch": torch.__version__, "date": _dt.date.today().isoformat(),
    }
    return report


def projection(cfg: RunConfig, world_size: int) -> dict:
    """`reca info --world-size`'s row for `world_size`, by report category (bytes)."""
    from reca.models import build_model

    with torch.device("meta"):
        model = build_model(cfg.model)
    row = memory_per_rank(model, cfg, (world_size,))["rows"][0]
    return {"parameters": row["parameters"], "gathered": row["gathered"], "gradients": row["gradients"],
            "optimizer": row["optimizer"] - row["ema"], "ema": row["ema"], "activations": row["activations"],
            "temporaries": 0.0, "total": row["total"]}


def largest_batches(cfg: RunConfig, world_size: int, cards: tuple[int, ...], *, first: dict | None = None,
                    tries: int = 6) -> dict:
    """The largest micro-batch (BAGEL: samples a pack) whose measured peak fits each card. The
    peak is linear in the batch where its place in the step stays (each sample adds its
    activations): the preset's batch and half of it give a line, the batch it predicts is
    measured, and the line through the measured batches that bracket the card predicts again,
    until a prediction is measured and fits (at most `tries` steps a card)."""
    b0 = cfg.data.batch_size
    measured: dict[int, dict] = {} if first is None else {b0: first}

    def peak(b: int) -> int:
        if b not in measured:
            measured[b] = memory_report(_with_batch(cfg, b), world_size, cards=cards, startup=False)
        return measured[b]["peak_device_bytes"]

    peak(b0), peak(b0 // 2 if b0 > 1 else 2)
    out = {}
    for g in cards:
        room = USABLE * g * GIB
        for _ in range(tries):
            b = predict({k: v["peak_device_bytes"] for k, v in measured.items()}, room)
            if b == 0 or peak(b) <= room:
                break
        r = measured.get(b)
        out[str(g)] = {"batch": b, "tokens_per_rank": r["tokens_per_rank"] if r else None,
                       "peak_device_bytes": r["peak_device_bytes"] if r else None,
                       "checked": r is not None and r["peak_device_bytes"] <= room}
    return out


def predict(points: dict[int, float], room: float) -> int:
    """The largest batch whose peak is at most `room` on the line through the measured batches
    (batch -> peak, two at least) that bracket it, else through the two nearest; never below a
    batch measured to fit, never at one measured not to."""
    fit = [b for b in points if points[b] <= room]
    lo = max(fit, default=None)
    above = sorted(b for b in points if points[b] > room and (lo is None or b > lo))
    if lo is not None and above:
        a, z = lo, above[0]
    elif lo is not None:
        a, z = sorted(points)[-2:]
    else:
        a, z = sorted(points)[:2]
    slope = (points[z] - points[a]) / (z - a)
    b = max(0, int(a + (room - points[a]) // slope)) if slope > 0 else (lo or 0)
    if lo is not None:
        b = max(b, lo)
    if above:
        b = min(b, above[0] - 1)
    return b


def validate(cfg: RunConfig, world_size: int = 1) -> dict:
    """The step measured on fake tensors and on real CPU tensors, under the same tracker ->
    {"fake", "real" (peak bytes), "measured_over_real"}."""
    with torch.device("meta"):
        from reca.models import build_model

        n = sum(p.numel() for p in build_model(bench_config(cfg).model).parameters())
    if n > VALIDATE_LIMIT:
        raise UserError(f"--validate runs the step on real CPU tensors too: {n:,} parameters is too many "
                        f"(at most {VALIDATE_LIMIT:,}; use a tiny preset)")
    fake = measure_step(cfg, world_size, fake=True)
    real = measure_step(cfg, world_size, fake=False)
    out = {"fake": fake["peak_device_bytes"], "real": real["peak_device_bytes"],
           "measured_over_real": fake["peak_device_bytes"] / real["peak_device_bytes"],
           "fake_categories": fake["categories"], "real_categories": real["categories"]}
    return out


def _with_batch(cfg: RunConfig, b: int) -> RunConfig:
    return apply_overrides(cfg, [f"data.batch_size={b}"])


def _ema_on_host(cfg: RunConfig) -> bool:
    return cfg.train.ema_on_host


def format_report(r: dict) -> list[str]:
    """The table `reca bench memory` prints (GiB per rank)."""
    n = r["world_size"]
    how = (f"{n} rank{'s' if n > 1 else ''} of FSDP2 over a fake process group" if r["path"] == "fsdp2"
           else "one process (reca train on one GPU)")
    tokens = f" ({r['tokens_per_rank']:,} tokens a pack)" if r.get("tokens_per_rank") else ""
    options = [f"checkpoint_every={r['checkpoint_every']}"]
    if r.get("cuda_graph") and r["checkpoint_every"]:
        options.append("a CUDA graph's step (random ops saved in checkpointed blocks with dropout)")
    if r["ema"]:
        options.append(f"EMA {r['ema']}" + (" on the host" if r["ema_on_host"] else ""))
    if r["cpu_offload"]:
        options.append("cpu_offload")
    unit, div = ("GiB", GIB) if r["peak_device_bytes"] >= GIB else ("MiB", 2**20)
    lines = [f"reca bench memory: {r.get('preset') or 'the config'} on {how}; micro-batch {r['batch']}{tokens} "
             f"x grad_accum {r['grad_accum']} ({','.join(r['cycle'])}); bf16 autocast; {', '.join(options)}",
             f"  per rank, {unit}       {'measured':>9}  {'projected':>9}"]
    p = r["projected"]
    for k in CATEGORIES:
        lines.append(f"    {k:<16} {r['categories'][k] / div:>9.2f}  {p[k] / div:>9.2f}")
    lines.append(f"    {'peak':<16} {r['peak_device_bytes'] / div:>9.2f}  {p['total'] / div:>9.2f}"
                 f"   measured / projected {r['measured_over_projected']:.2f}")
    lines.append(f"  the peak: {r['where']}")
    if r["peak_step_host_bytes"]:
        lines.append(f"  host memory held during the step (offloaded): {r['peak_step_host_bytes'] / div:.2f} {unit}")
    if r.get("peak_host_bytes") is not None and r["path"] == "fsdp2":
        lines.append(f"  rank 0's host at start-up: with --init-from {r['peak_host_bytes_init_from'] / div:.2f} {unit} "
                     "(each rank reads its own rows of one tensor at a time; the buffers); without it "
                     f"{r['peak_host_bytes'] / div:.2f} {unit} (the whole model, built once on the CPU)")
    elif r.get("peak_host_bytes") is not None:
        lines.append("  host at start-up: the model is built on the GPU; --init-from reads each weight file whole "
                     f"while copying it (the whole model: {r['peak_host_bytes'] / div:.2f} {unit})")
    verdict = ", ".join(f"{g} GiB {'yes' if ok else 'no'}" for g, ok in r["fits"].items())
    lines.append(f"  fits (peak <= {r['usable']:.0%} of the card): {verdict}")
    if "largest" in r:
        big = r["largest"]
        lines.append("  largest micro-batch that fits (* measured): " + ", ".join(
            f"{g} GiB {big[g]['batch']}{'*' if big[g]['checked'] else ''}"
            + (f" ({big[g]['tokens_per_rank']:,} tokens)" if big[g]["tokens_per_rank"] else "") for g in r["fits"]))
    lines.append(f"  not covered: {r['not_covered']}")
    lines.append(f"  measured in {r['seconds']:.0f} s on fake tensors (torch {r['torch']}, {r['date']})")
    return lines
