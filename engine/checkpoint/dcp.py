"""Sharded checkpoints of a torchrun job: RUN/step-N/, written with `torch.distributed.checkpoint`.

    RUN/step-N/            a DCP folder: the trainable weights and AdamW state in each rank's
                           files (__R_K.distcp: its shards under FSDP; under DDP DCP shares the
                           replicated tensors out between the ranks) and .metadata
    RUN/step-N/SHA256SUMS  the sha256 of every one of those files (`sums`)
    RUN/step-N/extra.pt    the step, the schedule, every rank's data position and RNG states,
                           and SHA256SUMS's own sha256 (`integrity.atomic_save`: checksummed)

A folder is written as `RUN/.step-N.tmp/` and renamed by rank 0 once every rank has written its
files and read them back against the digests taken while writing (`sums`: what "verified"
means), so a `step-N/` folder is always whole: a job killed mid-save leaves only a temp folder,
which the next save removes. The newest `keep` folders are kept; an older one goes only after
a newer one is in place, verified. A save that fails on any rank (a full disk, a file that does
not read back) removes its temp folder and is one line on every rank, the earlier folders left
as they were. A load verifies every file before DCP reads any (`verify`), and refuses weights,
AdamW moments or EMA shadows holding NaN or inf. Frozen parameters are not saved (rebuilt from
the seed or `train.init_from`, as in the single-file checkpoint). At start `check_space` wants
room for `keep` + 1 folders, less those already there.

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

from reca.engine.checkpoint.integrity import atomic_save, first_nonfinite, fsync_dir, nonfinite_line
from reca.engine.checkpoint.single import rng_state, set_rng_state
from reca.engine.errors import UserError, os_reason

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
    model), kept in extra.pt so that a resume proves it rebuilt the same ones. A failure on any
    rank (a full disk, a file that does not read back) removes the temporary folder and is the
    same one-line `UserError` on every rank; the earlier folders are left as they were."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from reca.engine.checkpoint import sums
    from reca.engine.fsdp import on_rank0

    run = Path(run)
    tmp, final = run / f".step-{step}.tmp", run / f"step-{step}"

    def prepare():
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as e:
            raise UserError(_save_failed(run, step, os_reason(e), tmp)) from None

    on_rank0(prepare, r)  # every rank waits for the folder
    model, optim = get_state_dict(c.model, c.optimizer, options=_options())
    state = {"model": _untied(model, c.model), "optim": optim}
    if c.ema is not None:  # each rank's shards of the shadows, as the weights
        state["ema"] = dict(zip(c.ema.names, c.ema.shadows))
    writer, error, mine, fault = sums.writer(tmp), None, {}, None
    try:
        dcp.save(state, storage_writer=writer)  # every rank raises alike on a failure on any
        mine = sums.read_back(tmp, r.rank, writer)
    except (CheckpointException, OSError, sums.Fault) as e:
        fault = sums.save_fault(writer, e)
        error = e if fault is None else None  # not the file system's doing: a bug, raised as it is
    ranks: list = [None] * r.world_size
    dist.all_gather_object(ranks, {"data": c.data_state(), "rng": rng_state(c.generator), "sums": mine,
                                   "fault": fault, "error": error is not None})

    def finish():
        failed = [(k, x["fault"]) for k, x in enumerate(ranks) if x["fault"] is not None]
        if failed or any(x["error"] for x in ranks):
            shutil.rmtree(tmp, ignore_errors=True)
            if failed:
                k, why = failed[0]
                raise UserError(_save_failed(run, step, f"{why} on rank {k}" if r.world_size > 1 else why, tmp))
            return
        try:
            digest = sums.write_sums(tmp, {n: d for x in ranks for n, d in x["sums"].items()})
            atomic_save({"step": step, "scheduler": c.scheduler.state_dict(), "world_size": r.world_size,
                         "ranks": [{"data": x["data"], "rng": x["rng"]} for x in ranks],
                         "ema": c.ema.decay if c.ema is not None else None, "frozen": frozen or {},
                         # where the random weights were drawn (`build.seeded_model`), for `reca sample`
                         "drawn_on": "cpu" if c.cfg.distributed.strategy == "fsdp" else c.device.type,
                         "sums": digest}, tmp / sums.EXTRA)
            shutil.rmtree(final, ignore_errors=True)  # a stop right after the same step's save
            os.replace(tmp, final)
            fsync_dir(run)
        except (OSError, UserError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            why = os_reason(e) if isinstance(e, OSError) else str(e).split(": ", 1)[-1].split(";")[0]
            raise UserError(_save_failed(run, step, why, tmp)) from None
        # The new folder was read back whole on every rank (`sums.read_back`): only now may an
        # older one go, so the newest verified folder is never rotated out for an unverified one.
        for old in folders(run)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in run.glob(".step-*.tmp"):  # a killed job's half-written save
            shutil.rmtree(stale, ignore_errors=True)

    on_rank0(finish, r)
    if error is not None:
        raise error
    return final


def _save_failed(run: Path, step: int, why: str, tmp: Path) -> str:
    kept = [f.name for f in folders(run)]
    if len(kept) == 1:
        left = f"{kept[0]} is kept as it was"
    elif kept:
        left = f"{', '.join(kept)} are kept as they were"
    else:
        left = "no earlier step-N/ folder exists"
    return (f"cannot write step-{step} of {run}: {why}; its temporary folder {tmp.name} is removed, {left}; "
            f"continue with: reca train --resume {run}")


def folder_bytes(c) -> int:
    """About how many bytes one RUN/step-N/ takes, all ranks together: the trainable weights,
    AdamW's two moments and the EMA's shadows (fp32, `checkpoint_bytes`), and 1 MiB for the
    .metadata, extra.pt and SHA256SUMS. A DTensor counts whole (its global numel)."""
    from reca.engine.checkpoint.single import checkpoint_bytes

    ema = sum(4 * p.numel() for p in c.params) if c.ema is not None else 0
    return checkpoint_bytes(c.params) + ema + (1 << 20)


def check_space(run: Path, c, r, *, keep: int, fresh: bool) -> None:
    """Every rank, at start: refuse (one line, every rank) a run directory without room for the
    step folders this job will hold at once: `keep` kept and the one a save writes before the
    oldest goes, less those already there (none for a new run: an earlier run's are moved aside)."""
    from reca.engine.fsdp import on_rank0
    from reca.engine.rundir import check_free_space

    size = folder_bytes(c)
    have = 0 if fresh else min(len(folders(run)), keep)

    def check():
        n = max(1, keep + 1 - have)
        check_free_space(run, n * size, what=f"a save with distributed.keep_checkpoints={keep} ({keep + 1} step-N/ "
                         f"folders at once, the next written before the oldest goes: {n} more of about "
                         f"{size / 2**30:.2f} GiB)")

    on_rank0(check, r)


def load(folder: str | Path, c, r, frozen: dict[str, str] | None = None, extra: dict | None = None) -> int:
    """Every rank: load RUN/step-N/ into the components `c` (any world size) -> N, after
    refusing (every rank, one line) frozen weights other than the ones the run trained with
    (`frozen`: rank 0's fingerprint of this job's; a folder written before it was kept has none)
    and a weight, AdamW moment or EMA shadow holding NaN or inf. `extra`: the folder's extra.pt
    from `verify` (every file checked); None: verified here first."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from reca.engine.checkpoint.guard import fingerprint_conflict
    from reca.engine.fsdp import on_rank0

    folder = Path(folder)
    if extra is None:
        extra = verify(folder, r)

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
    _refuse_nonfinite(folder, state, r)
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


def verify(folder: str | Path, r) -> dict:
    """Every rank: every file of RUN/step-N/ checked against its sha256 before anything reads
    it (`sums.verify`) -> its extra.pt; a fault is one line on every rank."""
    from reca.engine.checkpoint import sums

    folder = Path(folder)
    return sums.verify(folder, r, what=f"cannot resume {folder.parent}")


def _refuse_nonfinite(folder: Path, state: dict, r) -> None:
    """A NaN or inf in what a resume loaded (this rank's shards), agreed across ranks."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    flat, _ = flatten_state_dict(state)
    found: list = [None] * r.world_size
    dist.all_gather_object(found, first_nonfinite(flat))
    name = next((n for n in found if n is not None), None)
    if name is not None:
        earlier = [f.name for f in folders(folder.parent) if step_of(f) < step_of(folder)]
        hint = f"; move {folder.name} out of {folder.parent} to resume from {earlier[-1]}" if earlier else ""
        raise UserError(nonfinite_line(f"cannot resume {folder.parent}: {folder.name}", name) + hint)


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
    from reca.engine.checkpoint.single import CHECKPOINT, load_trainable, refuse_nonfinite_state
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
    refuse_nonfinite_state(ckpt, whole, optimizer, source)
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
        # strict=False: a parameter that never had a gradient (Harmon's MAR class table) has no
        # AdamW state in the file and keeps the fresh one, as `_check_loaded` explains; the rest of
        # the state was proven to fit on rank 0 (`single_into_copy`'s load_state_dict)
        set_optimizer_state_dict(c.model, c.optimizer, optim, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True, strict=False))
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
