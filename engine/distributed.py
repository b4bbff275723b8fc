"""Several processes under `torchrun`: PyTorch's own runtime, nothing home-made.

    torchrun --nproc-per-node 2 -m reca.engine train --preset tiny --set distributed.strategy=ddp

`launched()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); `train_distributed`
joins the process group (NCCL on CUDA, gloo on CPU), takes the device from LOCAL_RANK, builds
the run's components with this rank's share of the data (`build_loader(rank=, world_size=)`:
rank r of w reads stream positions r, r + w, ..., so the w micro-batches of a step are exactly
the positions one process reads at a w times larger batch), and applies the strategy from
outside the model, after activation checkpointing and compile (torchtitan's order):

    ddp   torch's DistributedDataParallel: every rank holds the model and AdamW state, the
          gradients are all-reduced (averaged) in the backward of the last micro-batch only
    fsdp  FSDP2's `fully_shard` on every block of `find_blocks`, then the root, with the model
          built on the meta device and filled from rank 0's CPU copy, so it never exists whole
          on any rank's device (`reca.engine.fsdp`): parameters, gradients, AdamW state and the
          EMA sharded; bf16 compute, fp32 reduce; optional CPU offload; HSDP with
          `distributed.replicate` > 1

The loss of a step is the mean over ranks of each rank's mean (equal micro-batches: the mean
over the global batch). The non-finite skip needs no agreement of its own: it reads the
gradient norm, computed from the all-reduced gradients, so every rank decides alike. The stop
request (SIGINT/SIGTERM on any rank) is all-reduced once per step on the host. Only rank 0
prints and writes metrics, config and previews; checkpoints are `reca.engine.checkpoint.dcp`
(every rank writes its shard).

A resume (`--resume RUN`, or by itself after torchrun's elastic restart) continues from the
newest RUN/step-N/ at any world size, else from a one-process run's RUN/checkpoint.pt. Outside
torchrun, `reca train --resume` of a run with step-N/ folders comes here, as a group of one.
"""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from reca.engine.config import RunConfig
from reca.engine.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class Rank:
    rank: int
    world_size: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Whether this process was started by torchrun (even as its only rank: a job of one
    resumes a job of several from its RUN/step-N/ checkpoints)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def elastic_restart() -> bool:
    """Whether torchrun started this rank again after a failure (`--max-restarts`)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def init_process_group() -> tuple[Rank, torch.device]:
    """Join torchrun's group -> (this rank, its device: cuda:LOCAL_RANK when CUDA is present).
    Outside torchrun, a group of one in memory: `reca train --resume` of a run with step-N/
    folders continues it in one process through the same code."""
    if launched():
        r = Rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    else:
        r = Rank(0, 1, 0)
    if torch.cuda.is_available():
        device = torch.device("cuda", r.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "TORCHELASTIC_RESTART_COUNT" in os.environ:
            dist.init_process_group(backend, store=_attempt_store(r), rank=r.rank, world_size=r.world_size)
        elif launched():
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return r, device


def _attempt_store(r: Rank):
    """torchrun's store under a prefix of its own for each attempt. After an elastic restart
    torchrun (2.13, --standalone) hands the new workers the same store, still holding the dead
    workers' gloo addresses under the same keys: the new group would connect to them (refused)."""
    from datetime import timedelta

    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # else rank 0 hosts the store
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), r.world_size,
                          is_master=not agent and r.rank == 0, timeout=timedelta(minutes=10))
    global job_store
    job_store = store  # shared by every attempt: a refusal is remembered across restarts (`reca.engine.ending`)
    return dist.PrefixStore(f"reca/attempt-{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)


job_store = None  # torchrun's store without an attempt's prefix, once this rank has joined


def build_on_ranks(cfg: RunConfig, r: Rank, whole: torch.nn.Module | None, stream: bool = False):
    """Every rank: the run's components, with this rank's share of the data. Under fsdp the
    model is built on the meta device, sharded and filled from `whole`, rank 0's copy on the CPU
    (`reca.engine.fsdp`; None on the other ranks, and under ddp, where every rank builds it), or
    with `stream` by every rank from `train.init_from`'s files (`reca.engine.shards`)."""
    from reca.engine.build import build

    place = None
    if cfg.distributed.strategy == "fsdp":
        from reca.engine.fsdp import sharded_model

        place = functools.partial(sharded_model, r=r, whole=whole, stream=stream)
    return build(cfg, rank=r.rank, world_size=r.world_size, place=place)


def whole_on_rank0(cfg: RunConfig, r: Rank) -> torch.nn.Module | None:
    """Under fsdp, rank 0's whole model on the CPU (`fsdp.whole_copy`), else None; every rank
    calls it (a model-config error on rank 0 ends every rank with it)."""
    if cfg.distributed.strategy != "fsdp":
        return None
    from reca.engine.fsdp import on_rank0, whole_copy

    return on_rank0(lambda: whole_copy(cfg), r)


def apply_strategy(c, r: Rank):
    """The Components the step runs with: the model as the step calls it, its gradients reduced
    across ranks in the backward of the last micro-batch of a step. ddp wraps the whole model
    (`c.model` stays unwrapped: its names are the checkpoint's); under fsdp `c.model` is already
    sharded (`build_on_ranks`), and the optimizer and EMA were built over its shards."""
    accum = c.cfg.optim.grad_accum
    if c.cfg.distributed.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # A family may hold trainable parameters a step never reaches (Harmon's MAR class
        # embedding), and a mix of objectives reaches another set on each micro-batch.
        ddp = DistributedDataParallel(c.model, device_ids=[c.device.index] if c.device.type == "cuda" else None,
                                      find_unused_parameters=True)
        return replace(c, model=_SyncOnLast(ddp, accum, lambda on: setattr(ddp, "require_backward_grad_sync", on)))
    from reca.engine.fsdp import set_gradient_sync

    every = 1 if c.cfg.distributed.reduce_every_micro_batch else accum  # 1: each micro-batch reduces
    return replace(c, model=_SyncOnLast(c.model, every, functools.partial(set_gradient_sync, c.model)))


class _SyncOnLast:
    """The model as the step calls it; gradients are reduced across ranks in the backward of
    the last of every `accum` micro-batches only (the others accumulate locally)."""

    def __init__(self, module, accum: int, set_sync):
        self.module, self.accum, self.set_sync, self.calls = module, accum, set_sync, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if torch.is_grad_enabled():
            self.set_sync(self.calls % self.accum == 0)
        return self.module(*args, **kwargs)


def mean_over_ranks(values: dict[str, torch.Tensor], world_size: int) -> dict[str, torch.Tensor]:
    """Each metric averaged over the ranks, in one all-reduce on the device (no host sync)."""
    from torch.distributed.tensor import DTensor

    names = sorted(values)  # under fsdp the gradient norm (and the skip flag from it) is a DTensor
    full = [v.full_tensor() if isinstance(v, DTensor) else v for v in (values[k] for k in names)]
    stacked = torch.stack([v.float() for v in full])
    dist.all_reduce(stacked)
    stacked /= world_size
    return dict(zip(names, stacked.unbind()))


def agreed(fn: Callable[[], T], r: Rank) -> T:
    """`fn()` on every rank; a `UserError` on any rank is raised on every rank (the lowest
    rank's), so that the job's ranks refuse together at this point and none is left waiting in a
    later collective (`reca.engine.ending`: the line is then printed once, every rank exits 2)."""
    out, msg = None, None
    try:
        out = fn()
    except UserError as e:
        msg = str(e)
    msgs: list = [None] * r.world_size
    dist.all_gather_object(msgs, msg)
    first = next((m for m in msgs if m is not None), None)
    if first is not None:
        raise UserError(first)
    return out


def any_rank(flag: bool, group) -> bool:
    """Whether `flag` holds on some rank (a host all-reduce over the gloo group `group`)."""
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def watch_launcher(interval: float = 1.0) -> None:
    """torchrun starts its workers in sessions of their own: killing torchrun's process group
    (a closed terminal, a scheduler's kill of the job script) would leave them training with no
    one to supervise them, holding the run's lock. A daemon thread notices the launcher's death
    (this process's parent changes) and sends this worker SIGTERM, which ends the job as a stop
    request does: every rank agrees at the next step, that step's step-N/ is written."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="reca-launcher-watch", daemon=True).start()


def train_distributed(cfg: RunConfig, *, resume: bool = False, stop_after: int | None = None,
                      quiet: bool = False) -> dict:
    """`reca train` on one rank of a torchrun job (or a group of one); returns the last metrics
    row (rank 0's). A resume continues from the newest RUN/step-N/ folder, else from a one-process
    run's RUN/checkpoint.pt, at any world size. After an elastic restart (torchrun
    `--max-restarts`) the job resumes from its own newest step-N/ on its own, `--resume` or not.
    Rank 0 proves the run directory writable and locks it for the job's life (`rundir.RunLock`:
    a second job or process on it fails at once, every rank with the same one line). Refusals
    are agreed by every rank (`agreed`, `fsdp.on_rank0`) where they can be, and otherwise end the
    job through `reca.engine.ending`, as do the ranks a lost rank leaves behind."""
    from reca.engine.fsdp import on_rank0
    from reca.engine.rundir import RunLock, check_run_dir

    r, device = init_process_group()
    if launched():
        watch_launcher()
    if elastic_restart():
        from reca.engine.ending import REFUSED, earlier_refusal, end

        earlier = earlier_refusal()
        if earlier is not None:  # torchrun restarts on any failure: a refused job stays refused, said once
            end(f"reca: error: {earlier}", REFUSED, say=False)
    run = Path(cfg.output.dir)
    # a busy or unwritable run directory: refused on every rank alike (`on_rank0`), not only on rank 0
    lock = on_rank0(lambda: (check_run_dir(run), RunLock(run))[1], r)
    try:
        return _train_ranks(cfg, r, device, run, resume, stop_after, quiet)
    finally:
        if lock is not None:
            lock.close()


def _train_ranks(cfg: RunConfig, r: Rank, device: torch.device, run: Path, resume: bool, stop_after: int | None,
                 quiet: bool) -> dict:
    from reca.engine.build import resolve_mode
    from reca.engine.checkpoint import dcp
    from reca.engine.compile import blocks_checked
    from reca.engine.checkpoint.guard import frozen_fingerprint, refuse_conflicts
    from reca.engine.fsdp import on_rank0
    from reca.engine.logger import Logger
    from reca.engine.optim import lr_factor
    from reca.engine.rundir import read_run_config, replace_run
    from reca.engine.shards import sharded_fingerprint, streams
    from reca.engine.train import StopFlag, next_batches, write_config

    cfg = replace(cfg, train=replace(cfg.train, device=str(device)))
    folder, single = dcp.latest(run), (run / "checkpoint.pt").is_file()
    if elastic_restart() and folder is not None:
        resume = True  # our own first attempt's checkpoint: the steps after it are taken again
    fresh = not resume and not elastic_restart()

    def check() -> None:
        if resume and folder is None and not single:
            raise UserError(f"nothing to resume: {run} holds no step-N/ folder and no checkpoint.pt")
        if resume and folder is not None and dcp.step_of(folder) > cfg.train.steps:
            raise UserError(f"{run} is at step {dcp.step_of(folder)}, past train.steps={cfg.train.steps}; give "
                            f"--steps {dcp.step_of(folder)} or more (the run is left as it was)")
        if fresh and (folder is not None or single) and not cfg.output.overwrite:
            raise UserError(f"{run} already holds a run; continue it with --resume {run}, or replace it with "
                            "--overwrite")
        if resume and folder is not None and not (folder / ".metadata").is_file():  # DCP would log pages first
            raise UserError(f"cannot resume from {folder}: its .metadata is missing (a damaged or half-copied "
                            f"step folder){_older(folder)}")
        if resume:  # before anything is loaded: a changed model would otherwise fail on a tensor's shape
            refuse_conflicts(read_run_config(run), resolve_mode(cfg, device).to_dict(), run)

    agreed(check, r)  # every rank reads the run; should one read it otherwise, they still end alike
    extra = dcp.verify(folder, r) if resume and folder is not None else None  # every file's sha256, first
    stream = streams(cfg, from_single=resume and folder is None)  # each rank its shards from the files
    whole = None if stream else whole_on_rank0(cfg, r)
    full = None  # a one-process checkpoint.pt: under fsdp into rank 0's copy, before sharding
    if resume and folder is None and cfg.distributed.strategy == "fsdp":
        full = on_rank0(lambda: dcp.single_into_copy(run, whole, cfg), r)
    frozen = frozen_fingerprint(whole) if whole is not None else None
    c = build_on_ranks(cfg, r, whole, stream)
    whole = None  # the shards are filled: rank 0's host copy goes
    if stream:
        frozen = sharded_fingerprint(c.model)  # every rank: its shards' sums, all-reduced
    cfg = c.cfg
    if resume and folder is None and cfg.distributed.strategy == "ddp":
        full = dcp.load_single(run, c)  # every rank holds the whole model: loaded as one process does
    if frozen is None and r.main:
        frozen = frozen_fingerprint(c.model)
    dcp.check_space(run, c, r, keep=cfg.distributed.keep_checkpoints, fresh=fresh)
    if r.main and fresh and cfg.output.overwrite:
        moved = replace_run(run)  # old step-N/ folders too: never `latest` beside a new run
        if moved is not None and not quiet:
            print(f"reca: the earlier run in {run} was moved to {moved}", flush=True)
    dist.barrier()
    step_c = apply_strategy(c, r)
    host = dist.new_group(backend="gloo")  # the stop request is agreed on the host
    stop, last = StopFlag(), {}  # a second Ctrl-C aborts at once, as in one process
    with stop.installed(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        # Each rank draws its own training noise and dropout; rank 0's streams are the one-process run's.
        c.generator.manual_seed(cfg.train.seed + 1 + (r.rank << 32))
        torch.manual_seed(cfg.train.seed + 2 + r.rank)
        if folder is not None and resume:
            start = _load(folder, c, r, frozen, extra)
        elif resume:
            start = dcp.finish_single(full, c, r)
        else:
            start = 0
        logger = None
        if r.main and elastic_restart():  # even with --quiet: the job lost steps and takes them again
            print(f"reca: torchrun restart {os.environ['TORCHELASTIC_RESTART_COUNT']} after a failed rank: "
                  f"{f'resuming at step {start}' if start else 'starting again'} in {run}", file=sys.stderr, flush=True)
        if r.main:
            run.mkdir(parents=True, exist_ok=True)
            write_config(run, cfg)  # rank 0 alone: a refusal here reaches the others through `reca.engine.ending`
            logger = Logger(c, run, start, resume=start > 0, quiet=quiet)
            if not quiet:
                print(f"reca: {cfg.preset or cfg.model.family}: {r.world_size} ranks, "
                      f"distributed.strategy={cfg.distributed.strategy}, {cfg.data.batch_size} images per rank "
                      f"and micro-batch; {'resuming at step ' + str(start) if resume else 'starting'} into {run}",
                      flush=True)
        end = cfg.train.steps if stop_after is None else min(cfg.train.steps, start + stop_after)
        done, stopping = start, False
        try:
            for step in range(start, end):
                lr = cfg.optim.lr * lr_factor(step, cfg.optim, cfg.train.steps)
                first = blocks_checked(c.model, cfg, sharded=cfg.distributed.strategy == "fsdp") if step == 0 else None
                with first or contextlib.nullcontext():  # each wrapped block ran its own forward
                    values = mean_over_ranks(c.update(step_c, next_batches(c)), r.world_size)
                c.scheduler.step()
                done = step + 1
                if logger is not None:
                    logger.push(done, lr, values)
                stopping = any_rank(stop.signum is not None, host)
                ckpt_now = done % cfg.output.ckpt_every == 0 or done == end or stopping
                if logger is not None and (done % cfg.output.log_every == 0 or ckpt_now):
                    last = logger.flush(wait=ckpt_now) or last
                if ckpt_now:
                    dcp.save(run, done, c, r, keep=cfg.distributed.keep_checkpoints, frozen=frozen)
                if stopping:
                    break
        finally:
            if logger is not None:
                logger.close()
            c.close()
    dist.barrier()
    dist.destroy_process_group(host)  # its gloo threads: a process that trains again makes another
    if not launched():
        dist.destroy_process_group()  # the group of one: a later run in this process makes its own
    if stopping:
        from reca.engine.train import stopped

        signum = stop.signum or signal.SIGTERM  # another rank's request: as a scheduler stops a job
        raise stopped(signum, run, done, cfg.train.steps, last, say=r.main)
    return last


def _older(folder: Path) -> str:
    from reca.engine.checkpoint.dcp import folders

    older = [f for f in folders(folder.parent) if f != folder]
    return f"; move it aside to resume from {older[-1]}" if older else ""


def _load(folder: Path, c, r: Rank, frozen, extra: dict | None = None) -> int:
    """`dcp.load`, a file of the folder missing said in one line: DCP raises it on every rank
    alike (its exception gathers each rank's failure), so every rank refuses together."""
    from torch.distributed.checkpoint.api import CheckpointException

    from reca.engine.checkpoint import dcp

    try:
        return dcp.load(folder, c, r, frozen, extra)
    except CheckpointException as e:
        failures = [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]  # (exception, trace)
        gone = sorted({Path(f.filename).name for f in failures if isinstance(f, FileNotFoundError) and f.filename})
        if gone:
            raise UserError(f"cannot resume from {folder}: {gone[0]} is missing (a damaged or half-copied step "
                            f"folder){_older(folder)}") from None
        raise
