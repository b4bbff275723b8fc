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


def _options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def _check_loaded(folder: Path, state: dict) -> None:
    """What a resume read from `folder` is every tensor it needs, but one thing: AdamW keeps no
    state for a trainable parameter that never had a gradient (Harmon's MAR class table, which
    RecA never reaches), while a fresh optimizer's state dict lists one for every parameter
    (torch initialises it with a zero-gradient step): such a parameter, whose state the folder
    lacks whole, keeps that initial state, as it would have no state in an uninterrupted run
    (AdamW skips parameters without a gradient). Anything else missing is one line."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    saved = set(FileSystemReader(str(folder)).read_metadata().state_dict_metadata)
    flat, _ = flatten_state_dict(state)
    stateful = {k[len("optim.state."):].rsplit(".", 1)[0] for k in saved if k.startswith("optim.state.")}
    missing = []
    for key in flat:
        if key in saved:
            continue
        param = key[len("optim.state."):].rsplit(".", 1)[0] if key.startswith("optim.state.") else None
        if param is None or param in stateful:
            missing.append(key)
    if missing:
        raise UserError(f"cannot resume from {folder}: it lacks {len(missing)} tensor(s) the run needs, e.g. "
                        f"{sorted(missing)[0]} (a damaged or foreign step folder?)")


def _untied(model_state: dict, model) -> dict:
    """A model state dict with each tied tensor under its first name only (`tied_names`): saved
    once, and a folder written with both names still loads."""
    from reca.engine.checkpoint.single import tied_names

    for alias in tied_names(model):
        model_state.pop(alias, None)
    return model_state


def save(run: str | Path, step: int, c, r, *, keep: int, frozen: dict[str, str] | None = None) -> Path:
    """Every rank: write step `step` of the components `c` into RUN/step-N/ (see the module).
    `frozen`: rank 0's fingerprint of the frozen weights (`guard.frozen_fingerprint` of the whole
    model), kept in extra.pt so that a resume proves it rebuilt the same ones."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    run = Path(run)
    tmp, final = run / f".step-{step}.tmp", run / f"step-{step}"
    if r.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model, optim = get_state_dict(c.model, c.optimizer, options=_options())
    state = {"model": _untied(model, c.model), "optim": optim}
    if c.ema is not None:  # each rank's shards of the shadows, as the weights
        state["ema"] = dict(zip(c.ema.names, c.ema.shadows))
    dcp.save(state, checkpoint_id=str(tmp))
    ranks: list = [None] * r.world_size
    dist.all_gather_object(ranks, {"data": c.data_state(), "rng": rng_state(c.generator)})
    if r.main:
        atomic_save({"step": step, "scheduler": c.scheduler.state_dict(), "world_size": r.world_size,
                     "ranks": ranks, "ema": c.ema.decay if c.ema is not None else None, "frozen": frozen or {},
                     # where the random weights were drawn (`build.seeded_model`), for `reca sample`
                     "drawn_on": "cpu" if c.cfg.distributed.strategy == "fsdp" else c.device.type},
                    tmp / "extra.pt")
        shutil.rmtree(final, ignore_errors=True)  # a stop right after the same step's save
        os.replace(tmp, final)
        fsync_dir(run)
        for old in folders(run)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in run.glob(".step-*.tmp"):  # a killed job's half-written save
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    return final


def load(folder: str | Path, c, r, frozen: dict[str, str] | None = None) -> int:
    """Every rank: load RUN/step-N/ into the components `c` (any world size) -> N, after
    refusing (every rank, one line) frozen weights other than the ones the run trained with
    (`frozen`: rank 0's fingerprint of this job's; a folder written before it was kept has none)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from reca.engine.checkpoint.guard import fingerprint_conflict
    from reca.engine.fsdp import on_rank0

    folder = Path(folder)
    extra = verified_load(folder / "extra.pt")

    def check():
        conflict = fingerprint_conflict(extra.get("frozen") or {}, frozen or {})
        if conflict:
            raise UserError(f"cannot resume {folder.parent}: {conflict}")

    on_rank0(check, r)
    model, optim = get_state_dict(c.model, c.optimizer, options=_options())
    state = {"model": _untied(model, c.model), "optim": optim}
    if c.ema is not None and extra.get("ema") is not None:  # loaded in place into this rank's shards
        state["ema"] = dict(zip(c.ema.names, c.ema.shadows))
    dcp.load(state, checkpoint_id=str(folder), planner=DefaultLoadPlanner(allow_partial_load=True))
    _check_loaded(folder, state)
    # frozen parameters are rebuilt, not loaded (set_state_dict's strict check would want them)
    set_state_dict(c.model, c.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_options(strict=False))
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
    """Every rank, under ddp (the whole model on each): a one-process run's RUN/checkpoint.pt
    into the model (`train.Checkpointer.restore`: verified, the same refusals) -> what
    `finish_single` needs: the step and the RNG states."""
    from reca.engine.checkpoint import frozen_fingerprint, load_checkpoint
    from reca.engine.train import Checkpointer

    ckpt = load_checkpoint(run)
    _check_steps(run, ckpt, c.cfg)
    with torch.random.fork_rng(devices=[c.device] if c.device.type == "cuda" else []):  # RNGs are set later
        step = Checkpointer(c, run, frozen_fingerprint(c.model)).restore(ckpt)
    return {"step": step, "rng": ckpt["rng"]}


def single_into_copy(run: Path, whole: torch.nn.Module, cfg) -> dict:
    """Rank 0, under fsdp, before sharding: a one-process run's RUN/checkpoint.pt into rank 0's
    whole copy of the model (`fsdp.whole_copy`, which then fills every rank's shards) -> what
    `finish_single` sends on: the step, AdamW's state by parameter name (through an optimizer over
    the copy, on the CPU), the schedule, data positions, RNG states and EMA. The refusals are the
    one-process resume's (checksum, frozen weights, tensor names and shapes, optimizer state)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from reca.engine.checkpoint import fingerprint_conflict, frozen_fingerprint, load_checkpoint
    from reca.engine.checkpoint.single import CHECKPOINT, load_trainable
    from reca.engine.optim import build_optimizer

    ckpt = load_checkpoint(run)
    _check_steps(run, ckpt, cfg)
    conflict = fingerprint_conflict(ckpt["frozen"], frozen_fingerprint(whole))
    if conflict:
        raise UserError(f"cannot resume {run}: {conflict}")
    source = str(Path(run) / CHECKPOINT)
    load_trainable(whole, ckpt["model"], source=source)
    optimizer = build_optimizer(whole, cfg.optim, torch.device("cpu"), capturable=False,
                                exempt=tuple(whole.no_weight_decay_modules()))
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{source}: its optimizer state does not fit this run ({e})") from None
    ema = ckpt["extra"].get("ema")
    if ema is not None:
        trained = {n: p.shape for n, p in whole.named_parameters() if p.requires_grad}
        shapes = {n: t.shape for n, t in ema["shadows"].items()}
        if shapes != trained:
            raise UserError(f"cannot resume {run}: its EMA does not match the trained parameters")
    return {"step": ckpt["step"], "scheduler": ckpt["scheduler"], "data": ckpt["data"], "rng": ckpt["rng"],
            "ema": ema, "optim": get_optimizer_state_dict(whole, optimizer,
                                                          options=StateDictOptions(full_state_dict=True))}


def _check_steps(run: Path, ckpt: dict, cfg) -> None:
    if ckpt["step"] > cfg.train.steps:
        raise UserError(f"{run} is at step {ckpt['step']}, past train.steps={cfg.train.steps}; give "
                        f"--steps {ckpt['step']} or more (the run is left as it was)")


def finish_single(full: dict | None, c, r) -> int:
    """Every rank, once the strategy is applied: the rest of a one-process checkpoint -> its step.
    Under fsdp `full` is rank 0's (`single_into_copy`; None elsewhere): AdamW's state goes out one
    tensor at a time (each rank keeps its shard), the EMA shadows likewise, the small rest
    (schedule, data positions) to every rank. The RNG states: a job of one takes the saved ones,
    more ranks reseed (see `reseed`)."""
    if c.cfg.distributed.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        optim = full.pop("optim") if r.main else {}
        set_optimizer_state_dict(c.model, c.optimizer, optim,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        ema = full.pop("ema") if r.main else None
        box = [full if r.main else None, ema is not None]
        dist.broadcast_object_list(box, src=0)
        full, has_ema = box
        c.scheduler.load_state_dict(full["scheduler"])
        c.load_data_state(full["data"])
        if c.ema is not None and has_ema:
            _scatter_ema(ema, c.ema, r)
    if r.world_size == 1:
        set_rng_state(full["rng"], c.generator)
    else:
        reseed(c, r, full["step"])
    return full["step"]


@torch.no_grad()
def _scatter_ema(state: dict | None, ema, r) -> None:
    """Rank 0's whole EMA shadows (`state`) into every rank's shards of them."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, shadow in zip(ema.names, ema.shadows):
        whole = state["shadows"][name] if r.main else torch.empty(shadow.shape, dtype=shadow.dtype)
        whole = whole.to(shadow.device)
        if isinstance(shadow, DTensor):
            whole = distribute_tensor(whole, shadow.device_mesh, shadow.placements, src_data_rank=0)
        else:  # a parameter FSDP left whole: the same on every rank
            dist.broadcast(whole, src=0)
        shadow.copy_(whole)
    if r.main:
        ema.decay = state["decay"]
    box = [ema.decay]
    dist.broadcast_object_list(box, src=0)
    ema.decay = box[0]
