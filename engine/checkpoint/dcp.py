"""Sharded checkpoints of a torchrun job: RUN/step-N/, written with `torch.distributed.checkpoint`.

    RUN/step-N/            a DCP folder: the trainable weights and AdamW state, each rank
                           writing its own shard (FSDP) or rank 0 the replicated tensors (DDP)
    RUN/step-N/extra.pt    the step, the schedule, and every rank's data position and RNG
                           states (`integrity.atomic_save`: checksummed)

A folder is written as `RUN/.step-N.tmp/` and renamed by rank 0 once every rank has finished,
so a `step-N/` folder is always whole: a job killed mid-save leaves only a temp folder, which
the next save removes. The newest `keep` folders are kept. Frozen parameters are not saved
(rebuilt from the seed or `train.init_from`, as in the single-file checkpoint).

Resharding: DCP loads into whatever layout this job has (another world size, DDP <-> FSDP).
The data position moves with the global stream (rank 0's next position is the number of
samples every rank has consumed together; `Loader.load_state_dict` moves it up to this rank's
share); at the same world size each rank gets its own RNG state back, at another one each rank's
training noise is reseeded from (seed, rank, step).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from reca.engine.checkpoint.integrity import atomic_save, fsync_dir, verified_load
from reca.engine.checkpoint.single import rng_state, set_rng_state
from reca.engine.errors import UserError

_STEP = re.compile(r"step-(\d+)")


def folders(run: str | Path) -> list[Path]:
    """RUN/step-N folders, oldest first."""
    run = Path(run)
    found = [(int(m.group(1)), p) for p in run.glob("step-*") if (m := _STEP.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest(run: str | Path) -> Path | None:
    found = folders(run)
    return found[-1] if found else None


def step_of(folder: Path) -> int:
    return int(_STEP.fullmatch(folder.name).group(1))


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True)


def save(run: str | Path, step: int, c, r, *, keep: int) -> Path:
    """Every rank: write step `step` of the components `c` into RUN/step-N/ (see the module)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    run = Path(run)
    tmp, final = run / f".step-{step}.tmp", run / f"step-{step}"
    if r.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model, optim = get_state_dict(c.model, c.optimizer, options=_options())
    state = {"model": model, "optim": optim}
    if c.ema is not None:  # each rank's shards of the shadows, as the weights
        state["ema"] = dict(zip(c.ema.names, c.ema.shadows))
    dcp.save(state, checkpoint_id=str(tmp))
    ranks: list = [None] * r.world_size
    dist.all_gather_object(ranks, {"data": c.data_state(), "rng": rng_state(c.generator)})
    if r.main:
        atomic_save({"step": step, "scheduler": c.scheduler.state_dict(), "world_size": r.world_size,
                     "ranks": ranks, "ema": c.ema.decay if c.ema is not None else None}, tmp / "extra.pt")
        shutil.rmtree(final, ignore_errors=True)  # a stop right after the same step's save
        os.replace(tmp, final)
        fsync_dir(run)
        for old in folders(run)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in run.glob(".step-*.tmp"):  # a killed job's half-written save
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    return final


def load(folder: str | Path, c, r) -> int:
    """Every rank: load RUN/step-N/ into the components `c` (any world size) -> N."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = Path(folder)
    extra = verified_load(folder / "extra.pt")
    model, optim = get_state_dict(c.model, c.optimizer, options=_options())
    state = {"model": model, "optim": optim}
    if c.ema is not None and extra.get("ema") is not None:  # loaded in place into this rank's shards
        state["ema"] = dict(zip(c.ema.names, c.ema.shadows))
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(c.model, c.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_options())
    c.scheduler.load_state_dict(extra["scheduler"])
    ranks, same = extra["ranks"], extra["world_size"] == r.world_size
    mine = ranks[r.rank] if same else ranks[0]
    data = {}
    for key, first in ranks[0]["data"].items():
        bad = sorted({tuple(b) for rank in ranks for b in rank["data"][key]["bad"]})
        data[key] = {**mine["data"][key], "position": first["position"], "bad": [list(b) for b in bad],
                     "skipped": len(bad)}
    c.load_data_state(data)
    if same:
        set_rng_state(mine["rng"], c.generator)
    else:
        reseed(c, r, extra["step"])
    return extra["step"]


def reseed(c, r, step: int) -> None:
    """At another world size no saved stream is this rank's: its training noise and dropout
    start again from (seed, rank, step), so a resharded resume is as reproducible as any run."""
    torch.manual_seed(c.cfg.train.seed + 2 + r.rank + (step << 16))
    c.generator.manual_seed(c.cfg.train.seed + 1 + (r.rank << 32) + (step << 16))


def load_single(run: Path, c) -> dict:
    """Every rank, before the model is sharded: a one-process run's RUN/checkpoint.pt into the
    whole model (`train.Checkpointer.restore`: verified, the same refusals) -> what
    `finish_single` needs once it is: the step, AdamW's state by parameter name, the schedule
    and the RNG states."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from reca.engine.checkpoint import frozen_fingerprint, load_checkpoint
    from reca.engine.train import Checkpointer

    ckpt = load_checkpoint(run)
    if ckpt["step"] > c.cfg.train.steps:
        raise UserError(f"{run} is at step {ckpt['step']}, past train.steps={c.cfg.train.steps}; give "
                        f"--steps {ckpt['step']} or more (the run is left as it was)")
    with torch.random.fork_rng(devices=[c.device] if c.device.type == "cuda" else []):  # RNGs are set later
        step = Checkpointer(c, run, frozen_fingerprint(c.model)).restore(ckpt)
    optim = get_optimizer_state_dict(c.model, c.optimizer, options=StateDictOptions(full_state_dict=True))
    return {"step": step, "optim": optim, "scheduler": ckpt["scheduler"], "rng": ckpt["rng"]}


def finish_single(full: dict, c, r) -> int:
    """Every rank, after sharding: AdamW's state and the schedule into the optimizer FSDP rebuilt
    (each rank keeps its shard), the RNG states (one rank: the saved ones) -> the step."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if c.cfg.distributed.strategy == "fsdp":
        set_optimizer_state_dict(c.model, c.optimizer, full["optim"], options=StateDictOptions(full_state_dict=True))
        c.scheduler.load_state_dict(full["scheduler"])
    if r.world_size == 1:
        set_rng_state(full["rng"], c.generator)
    else:
        reseed(c, r, full["step"])
    return full["step"]
