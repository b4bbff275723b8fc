"""The README's memory table: `reca bench memory` (the training step on fake tensors) for every
real-size preset at 1, 2, 4 and 8 ranks, and BAGEL's options for fewer or smaller GPUs.

    python benchmarks/memory_table.py [--out FILE] [--presets a,b] [--table-only]

Every run's raw report goes to the JSON file as it finishes (a rerun skips the runs it holds).
Per preset and rank count the step is measured once per objective of its cycle, as two
micro-batches of that objective where the preset accumulates (the second holds the first's
gradients, as every later one of a longer accumulation does; a second objective after one
micro-batch of the first): the row's peak is the larger. The peak is linear in the
micro-batch (each sample adds its activations), so a second batch (half the preset's) at 1 and
at 8 ranks gives the line (one process and FSDP), from which the largest micro-batch under 90 %
of each card follows; `--verify` measures the 80 GiB prediction at 1 and 8 ranks, and again from
the line through the nearest measured batches where it misses (the line bends where the peak
moves to another part of the step).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

import torch

from reca.engine.bench.memory import USABLE
from reca.engine.bench.memreport import memory_report, predict
from reca.engine.config import apply_overrides
from reca.engine.presets import preset

PRESETS = ("harmon-0.5b", "harmon-1.5b", "bagel-7b-mot", "flow-7b", "openuni-b-512", "openuni-l-512",
           "showo-1.3b-256", "showo-1.3b-512")
WORLDS = (1, 2, 4, 8)
CARDS = (80, 48, 40)
GIB = 2**30
# BAGEL on fewer or smaller GPUs: none changes the step's result (the last two keep the global batch)
BAGEL_OPTIONS = {
    "as published": [],
    "EMA on the host": ["train.ema_on_host=true"],
    "FSDP2 CPU offload": ["distributed.cpu_offload=true"],
    "checkpoint every 2nd block": ["train.checkpoint_every=2"],
    "no checkpointing": ["train.checkpoint_every=0"],
    "4 samples x 2 accumulated": ["data.batch_size=4", "optim.grad_accum=2"],
    "2 samples x 4 accumulated": ["data.batch_size=2", "optim.grad_accum=4"],
    "7 samples (31,488 tokens)": ["data.batch_size=7"],
    "4 x 2, each micro-batch reduced": ["data.batch_size=4", "optim.grad_accum=2",
                                        "distributed.reduce_every_micro_batch=true"],
    "2 x 4, each micro-batch reduced": ["data.batch_size=2", "optim.grad_accum=4",
                                        "distributed.reduce_every_micro_batch=true"],
    "EMA on the host, 4 x 2 reduced": ["train.ema_on_host=true", "data.batch_size=4", "optim.grad_accum=2",
                                       "distributed.reduce_every_micro_batch=true"],
}
BAGEL_WORLDS = (1, 4, 8)


def key(name: str, world: int, sets: list[str]) -> str:
    return f"{name}|{world}|{' '.join(sets)}"


def run(results: dict, path: Path, name: str, world: int, sets: list[str]) -> dict:
    k = key(name, world, sets)
    if k not in results["runs"]:
        r = memory_report(apply_overrides(preset(name), sets), world, cards=CARDS, startup=False)
        r.update(preset=name, sets=sets)
        results["runs"][k] = r
        path.write_text(json.dumps(results, indent=1))
        print(f"  {name} x{world} {' '.join(sets)}: {r['peak_device_bytes'] / GIB:.2f} GiB at {r['where']} "
              f"({r['seconds']:.0f} s)", flush=True)
    return results["runs"][k]


def objective_sets(name: str, batch: int | None = None) -> list[list[str]]:
    """Per objective of the preset's cycle: it alone, accumulated twice (once where the preset
    does not accumulate: under FSDP an accumulation keeps the gradients unsharded between
    micro-batches)."""
    cfg = preset(name)
    b = [] if batch is None else [f"data.batch_size={batch}"]
    accum = min(cfg.optim.grad_accum, 2)
    first, *rest = dict.fromkeys(cfg.mix.cycle)
    # another objective runs after the first, twice (accumulated, then reduced), as in the
    # presets' cycles: FSDP2 refuses to reduce a block whose parameters first get a gradient in
    # the last micro-batch while others hold accumulated ones (engine/fsdp.py)
    return [[f"mix.cycle={first}", f"optim.grad_accum={accum}", *b]] + \
        [[f"mix.cycle={first},{o},{o}", f"optim.grad_accum={min(cfg.optim.grad_accum, 3)}", *b] for o in rest]


def measure_all(results: dict, path: Path, names, verify: bool) -> None:
    for name in names:
        b0 = preset(name).data.batch_size
        for world in WORLDS:
            for sets in objective_sets(name):
                run(results, path, name, world, sets)
        for world in (1, 8):  # the bytes per sample, one process and FSDP
            for sets in objective_sets(name, b0 // 2 if b0 > 1 else 2):
                run(results, path, name, world, sets)
        if verify:  # the 80 GiB prediction measured, and measured again where it misses
            for world in (1, 8):
                for _ in range(4):
                    f = largest(results, name, world, 80)
                    if f["checked"] or f["batch"] == 0:
                        break
                    for sets in objective_sets(name, f["batch"]):
                        run(results, path, name, world, sets)
    if "bagel-7b-mot" in names:
        for label, sets in BAGEL_OPTIONS.items():
            for world in BAGEL_WORLDS:
                run(results, path, "bagel-7b-mot", world, sets)


def peak(results: dict, name: str, world: int, batch: int) -> tuple[int, dict]:
    """The larger of the objectives' peaks at `batch` (and that run's report)."""
    b0 = preset(name).data.batch_size
    rows = [results["runs"].get(key(name, world, s)) for s in objective_sets(name, None if batch == b0 else batch)]
    if any(r is None for r in rows):
        raise KeyError(f"{name} x{world} at batch {batch} not measured")
    top = max(rows, key=lambda r: r["peak_device_bytes"])
    return top["peak_device_bytes"], top


def points(results: dict, name: str, world: int) -> dict[int, int]:
    """batch -> peak for every batch measured at `world`."""
    out = {}
    for r in results["runs"].values():
        if r["preset"] == name and r["world_size"] == world and r["batch"] not in out:
            try:
                out[r["batch"]] = peak(results, name, world, r["batch"])[0]
            except KeyError:
                pass
    return out


def largest(results: dict, name: str, world: int, card: int) -> dict:
    """The largest batch under USABLE x card (`memreport.predict` on the batches measured at
    `world`; one measured there borrows the line of 1 rank (one process) or 8 (FSDP), moved to
    pass through its own point). `checked`: that batch was measured and fits."""
    b0 = preset(name).data.batch_size
    own = points(results, name, world)
    pts = own
    if len(own) < 2:
        ref = points(results, name, 1 if world == 1 else 8)
        pts = {b: p + own[b0] - ref[b0] for b, p in ref.items()}
    room = USABLE * card * GIB
    b = predict(pts, room)
    tokens = peak(results, name, world, b0)[1]["tokens_per_rank"]
    return {"batch": b, "tokens": round(tokens / b0 * b) if tokens else None,
            "checked": b in own and own[b] <= room}


def table(results: dict, names) -> list[str]:
    lines = ["| preset | micro-batch | ranks | peak GiB per rank | the peak | largest micro-batch under 90 % of "
             "80 / 48 / 40 GiB |", "|---|---|---|---|---|---|"]
    for name in names:
        b0 = preset(name).data.batch_size
        for world in WORLDS:
            try:
                p, r = peak(results, name, world, b0)
                fits = [largest(results, name, world, c) for c in CARDS]
            except KeyError:
                continue
            unit = " tokens" if r["tokens_per_rank"] else ""
            cells = [(f"{f['tokens']:,}" if f["tokens"] else str(f["batch"])) + ("*" if f["checked"] else "")
                     for f in fits]
            big = " / ".join(cells) + unit
            mb = f"{b0} ({r['tokens_per_rank']:,} tokens)" if r["tokens_per_rank"] else str(b0)
            lines.append(f"| {name} | {mb} | {world} | {p / GIB:.1f} | {r['where']} | {big} |")
    return lines


def options_table(results: dict) -> list[str]:
    heads = [f"{w} rank{'s' if w > 1 else ''}: device (host) GiB" for w in BAGEL_WORLDS]
    lines = ["| bagel-7b-mot | " + " | ".join(heads)
             + " |", "|---" * (len(BAGEL_WORLDS) + 1) + "|"]
    for label, sets in BAGEL_OPTIONS.items():
        cells = []
        for world in BAGEL_WORLDS:
            r = results["runs"].get(key("bagel-7b-mot", world, sets))
            if r is None:
                cells.append("-")
                continue
            host = r["peak_step_host_bytes"]
            cells.append(f"{r['peak_device_bytes'] / GIB:.1f}" + (f" ({host / GIB:.1f})" if host else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="JSON (default: benchmarks/results/memory_fake_<date>.json)")
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--verify", action="store_true", help="also measure the predicted largest batches (80 GiB)")
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args()
    names = [n for n in args.presets.split(",") if n]
    date = _dt.date.today().isoformat()
    path = Path(args.out or Path(__file__).parent / "results" / f"memory_fake_{date}.json")
    results = json.loads(path.read_text()) if path.exists() else {
        "kind": "reca bench memory: the training step on fake tensors on the CPU (FakeTensorMode + torch's memory "
                "trackers), not GPU measurements", "torch": torch.__version__, "date": date, "usable": USABLE,
        "cards_gib": list(CARDS), "runs": {}}
    if not args.table_only:
        measure_all(results, path, names, args.verify)
    print("\n".join(table(results, names)))
    print()
    print("\n".join(options_table(results)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
