"""The RecA training loop. One optimizer step flows: images -> objective's batch -> model(batch,
objective) -> loss -> backward -> clip -> AdamW. Read top to bottom: `train_step` is the whole
recipe (eager, or captured in a CUDA graph by `reca.engine.graph`), `next_batches` what feeds it,
`train` the run: setup, the loop, and the logger / previewer / checkpointer it calls. Nothing in
a step reads a value back to the host."""
from __future__ import annotations

import contextlib
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from reca.engine.build import Components, autocast, build, resolve_device, resolve_mode  # noqa: F401
from reca.engine.checkpoint import (CHECKPOINT, checkpoint_bytes, fingerprint_conflict, frozen_fingerprint,
                                    load_checkpoint, refuse_conflicts, restore, save_checkpoint)
from reca.engine.compile import blocks_checked
from reca.engine.config import RunConfig
from reca.engine.errors import UserError
from reca.engine.logger import Logger
from reca.engine.metrics import plot_loss
from reca.engine.optim import lr_factor
from reca.engine.preview import Previewer
from reca.engine.rundir import RunLock, check_free_space, check_run_dir, clean_orphans, read_run_config, replace_run


@dataclass
class MicroBatch:
    """One micro-batch on the device: the objective's name and the model's input for it
    (`ReconBatch`, `CaptionBatch`, ...)."""

    objective: str
    batch: Any


def train_step(c: Components, batches: list[MicroBatch]) -> dict[str, torch.Tensor]:
    """One optimizer step over the micro-batches: forward + backward each, clip, AdamW. A
    non-finite loss or gradient norm skips the update on the device (fused AdamW's `found_inf`,
    as GradScaler uses it: no host sync). Returns device scalars: `loss` (the mean over the
    micro-batches), `grad_norm`, `skip` (1.0 when skipped), and each objective's mean loss
    `loss/NAME` and model metrics `NAME/KEY`."""
    n = len(batches)
    counts = {b.objective: sum(x.objective == b.objective for x in batches) for b in batches}
    out: dict[str, torch.Tensor] = {"loss": torch.zeros((), device=c.device)}
    for b in batches:
        with autocast(c.cfg, c.device, cache=not c.cfg.train.cuda_graph):  # no cast cache inside a graph
            result = c.model(b.batch, b.objective, generator=c.generator)
        (result.loss / n).backward()
        loss = result.loss.detach().float()
        out["loss"] += loss / n
        per = {k if k.startswith(f"{b.objective}/") else f"{b.objective}/{k}": v for k, v in result.metrics.items()}
        if len(c.objectives) > 1:  # with one objective its loss is `loss`
            per[f"loss/{b.objective}"] = loss
        for name, value in per.items():
            out[name] = out.get(name, 0.0) + value.detach().float() / counts[b.objective]
    clip = c.cfg.optim.clip_grad
    grad_norm = torch.nn.utils.clip_grad_norm_(c.params, clip) if clip > 0 else torch.zeros((), device=c.device)
    skip = (~(out["loss"].isfinite() & grad_norm.isfinite())).float()
    c.optimizer.found_inf = skip
    c.optimizer.step()
    if c.ema is not None:  # one foreach lerp on the device; a skipped step leaves the weights, so lerps toward them
        c.ema.update()
    c.optimizer.zero_grad(set_to_none=not c.cfg.train.cuda_graph)  # a graph keeps its gradients, zeroed in place
    return {**out, "grad_norm": grad_norm.float(), "skip": skip}


def next_batches(c: Components) -> list[MicroBatch]:
    """The next optimizer step's `optim.grad_accum` micro-batches on the device (pinned,
    asynchronous copies). Micro-batch i of step s has objective mix.cycle[(s * accum + i) % len]."""
    accum, cycle = c.cfg.optim.grad_accum, c.cfg.mix.cycle
    step = c.scheduler.last_epoch  # optimizer steps taken so far (restored on resume)
    out = []
    for i in range(accum):
        name = cycle[(step * accum + i) % len(cycle)]
        objective = next(o for o in c.objectives if o.name == name)
        images = next(c.loaders[name])
        out.append(MicroBatch(name, objective.batch(c.builders[name], c.cfg, images, c.device)))
    return out


class Stopped(KeyboardInterrupt):
    """What `train()` raises after a stop request (SIGINT or SIGTERM) once the checkpoint of the
    last finished step is written and the run directory released: what Ctrl-C raises in Python,
    so code after `reca.train(cfg)` never mistakes a stopped run for a finished one. `step` is
    that step, `last` the last metrics row, `exit_status` what a shell expects (130 for SIGINT,
    143 for SIGTERM; the CLI exits with it)."""

    def __init__(self, signum: int, step: int, last: dict):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")
        self.signal, self.step, self.last = signum, step, last
        self.exit_status = 128 + signum


def train(cfg: RunConfig, *, resume: bool = False, stop_after: int | None = None, quiet: bool = False) -> dict:
    """Run (or, with `resume`, continue) training into `cfg.output.dir`; returns the last metrics
    row. `stop_after` ends the run early after that many optimizer steps (with a checkpoint).
    SIGINT/SIGTERM finish the current step, write its checkpoint and raise `Stopped`.

    The run directory is proven writable, then locked for the run's life (`rundir.RunLock`: a
    second process fails at once); temp files of a killed write are removed. A resume refuses,
    before anything is written, a damaged checkpoint, a changed seed or any field that decides
    the model or the data order (`checkpoint.guard`), frozen weights that differ from the
    run's, and `train.steps` below the run's step. A new run moves an earlier run's files
    aside (`rundir.replace_run`) before it writes anything."""
    run = Path(cfg.output.dir)
    if resume and not (run / CHECKPOINT).exists():
        raise UserError(f"nothing to resume: {run / CHECKPOINT} does not exist")
    check_run_dir(run)
    with RunLock(run):
        clean_orphans(run)
        ckpt = None
        if resume:
            ckpt = load_checkpoint(run)  # checksum verified before the model is built
            if cfg.train.steps < ckpt["step"]:
                raise UserError(f"{run} is at step {ckpt['step']}, past train.steps={cfg.train.steps}; give "
                                f"--steps {ckpt['step']} or more (the run is left as it was)")
        elif ((run / CHECKPOINT).exists() or _has_step_folders(run)) and not cfg.output.overwrite:
            raise UserError(f"{run} already holds a run; continue it with --resume {run}, "
                            "or replace it with --overwrite")
        c = build(cfg)
        try:
            last, final, stop = _run(c, run, ckpt, stop_after, quiet)
        finally:
            c.close()
        plot_loss(run)
    if stop.signum is not None:
        raise stopped(stop.signum, run, final, c.cfg.train.steps, last)
    return last


def stopped(signum: int, run: Path, step: int, steps: int, last: dict, *, say: bool = True) -> Stopped:
    """After a stop request's checkpoint: the line that says where the run stands (`say`: this
    process prints; under torchrun rank 0 alone) and the `Stopped` to raise."""
    if say and step < steps:
        _say(f"interrupted ({signal.Signals(signum).name}) after step {step}, its checkpoint written; "
             f"continue with: reca train --resume {run}")
    elif say:
        _say(f"stop requested ({signal.Signals(signum).name}) after the last step, {step}: the run is complete")
    return Stopped(signum, step, last)


def _run(c: Components, run: Path, ckpt: dict | None, stop_after: int | None,
         quiet: bool) -> tuple[dict, int, "StopFlag"]:
    """Restore or start, train, preview -> (last metrics row, last step, the stop flag). A stop
    request from here on ends in a checkpoint; one before the first step of a new run writes
    step 0's, so `--resume` always has what the message promises."""
    stop = StopFlag()
    with stop.installed(), torch.random.fork_rng(devices=[c.device] if c.device.type == "cuda" else []):
        torch.manual_seed(c.cfg.train.seed + 2)  # the run's own global RNG (dropout draws from it)
        checkpoints = Checkpointer(c, run, frozen_fingerprint(c.model))
        check_free_space(run, checkpoint_bytes(c.params))
        if ckpt is not None:
            start = checkpoints.restore(ckpt)
        else:
            start, moved = 0, replace_run(run)  # before anything new: no old checkpoint beside a new config
            if moved is not None:
                _say(f"the earlier run in {run} was moved to {moved}")
        _prepare_run_dir(c, run, ckpt is not None, start, quiet)
        logger = Logger(c, run, start, resume=ckpt is not None, quiet=quiet)
        previews = Previewer(c, run)
        try:
            last, final = _loop(c, start, stop_after, logger, previews, checkpoints, stop)
        finally:
            logger.close()
        if stop.signum is None and (final > start or not previews.exists(final)):
            previews.draw(final)
    return last, final, stop


def _loop(c: Components, start: int, stop_after: int | None, logger: Logger, previews: Previewer,
          checkpoints: "Checkpointer", stop: "StopFlag") -> tuple[dict, int]:
    """Optimizer steps from `start` to the end (or `stop_after` steps, or a stop request) ->
    (last metrics row, last step). The checkpoint of the last step is always written; a stop
    request is checked after every step, checkpoint and preview, and no preview starts after it."""
    cfg = c.cfg
    end = cfg.train.steps if stop_after is None else min(cfg.train.steps, start + stop_after)
    last, done = {}, start
    for step in range(start, end):
        if stop.signum is not None:  # arrived during the previous checkpoint or preview
            break
        lr = cfg.optim.lr * lr_factor(step, cfg.optim, cfg.train.steps)  # a host float: no readback
        with blocks_checked(c.model, cfg) if step == 0 else contextlib.nullcontext():  # each block ran its forward
            logger.push(step + 1, lr, c.update(c, next_batches(c)))
        c.scheduler.step()
        done = step + 1
        if done == end or stop.signum is not None:
            break
        ckpt = done % cfg.output.ckpt_every == 0
        if done % cfg.output.log_every == 0 or ckpt:
            last = logger.flush(wait=ckpt) or last
        if ckpt:
            checkpoints.save(done)
        if cfg.output.preview_every and done % cfg.output.preview_every == 0 and stop.signum is None:
            previews.draw(done)
    if checkpoints.step != done:
        last = logger.flush(wait=True) or last
        checkpoints.save(done)
    return last, done


def _has_step_folders(run: Path) -> bool:
    """Whether a torchrun job's checkpoints (RUN/step-N/, `checkpoint.dcp`) are in `run`."""
    from reca.engine.checkpoint.dcp import latest

    return latest(run) is not None


def _say(message: str) -> None:
    print(f"reca: {message}", file=sys.stderr, flush=True)


def _prepare_run_dir(c: Components, run: Path, resume: bool, start: int, quiet: bool) -> None:
    (run / "config.json").write_text(c.cfg.to_json())  # resolved: train.mode applied
    c.model.tokenizer.save(str(run / "tokenizer"))
    if quiet:
        return
    n_train = sum(p.numel() for p in c.params)
    n_all = sum(p.numel() for p in c.model.parameters())
    print(f"reca: resolved config (saved to {run / 'config.json'}):\n{c.cfg.to_json()}", flush=True)
    print(f"reca: {c.cfg.preset or c.cfg.model.family} on {c.device}: {n_all / 1e6:.2f}M parameters, "
          f"{n_train / 1e6:.2f}M trainable; mode={c.cfg.train.mode} (kernels={c.ops.backend}, "
          f"compile={c.cfg.train.compile}, cuda_graph={c.cfg.train.cuda_graph}); objectives "
          f"{','.join(c.cfg.mix.cycle)}; {'resuming at step ' + str(start) if resume else 'starting'} into {run}",
          flush=True)
    report = getattr(c.model, "init_from_report", None)
    if report:
        print(f"reca: {report}", flush=True)


class Checkpointer:
    """RUN/checkpoint.pt: trainable weights, optimizer, schedule, data positions, RNG states, the
    resolved config and the frozen weights' fingerprint (`reca.engine.checkpoint`: atomic,
    checksummed). `step` is the step the file on disk holds (None before a new run's first)."""

    def __init__(self, c: Components, run: Path, frozen: dict[str, str]):
        self.c, self.run, self.frozen, self.step = c, run, frozen, None

    def save(self, step: int) -> None:
        c = self.c
        save_checkpoint(self.run, step=step, model=c.model, optimizer=c.optimizer, scheduler=c.scheduler,
                        data=c.data_state(), generator=c.generator, config=c.cfg.to_dict(), frozen=self.frozen,
                        extra={"ema": c.ema.state_dict()} if c.ema is not None else None)
        self.step = step

    def restore(self, ckpt: dict) -> int:
        """Load a `load_checkpoint` dict into the components -> its step, after refusing (one
        line, nothing written) a changed field that decides the model or the data order, or
        frozen weights that differ from the run's. Both configs are resolved (`train.mode`
        applied), so they compare like with like."""
        c = self.c
        refuse_conflicts(ckpt["config"] or read_run_config(self.run), c.cfg.to_dict(), self.run)
        conflict = fingerprint_conflict(ckpt["frozen"], self.frozen)
        if conflict:
            raise UserError(f"cannot resume {self.run}: {conflict}")
        self.step = restore(ckpt, model=c.model, optimizer=c.optimizer, scheduler=c.scheduler,
                            generator=c.generator, source=str(self.run / CHECKPOINT))
        c.load_data_state(ckpt["data"])
        if c.ema is not None and "ema" in ckpt["extra"]:  # a run that turns EMA on at resume starts it there
            try:
                c.ema.load_state_dict(ckpt["extra"]["ema"])
            except ValueError as e:
                raise UserError(f"cannot resume {self.run}: {e}") from None
        return self.step


class StopFlag:
    """SIGINT/SIGTERM ask the loop (this one, and each rank's of `reca.engine.distributed`) to finish the current step, write its checkpoint and stop
    (`signum`: the first signal); a second SIGINT aborts at once (KeyboardInterrupt: the
    checkpoint write it cuts removes its temp file and keeps the previous checkpoint)."""

    def __init__(self):
        self.signum: int | None = None

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum

    @contextlib.contextmanager
    def installed(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)
