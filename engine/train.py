"""The RecA training loop. One optimizer step flows: images -> objective's batch -> model(batch,
objective) -> loss -> backward -> clip -> AdamW. Read top to bottom: `train_step` is the whole
recipe (eager, or captured in a CUDA graph by `reca.engine.graph`), `next_batches` what feeds it,
`train` the run: setup, the loop, and the logger / previewer / checkpointer it calls. Nothing in
a step reads a value back to the host."""
from __future__ import annotations

import contextlib
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from reca.engine.build import Components, autocast, build, resolve_device, resolve_mode  # noqa: F401
from reca.engine.checkpoint import load_checkpoint, load_trainable, save_checkpoint, set_rng_state
from reca.engine.config import RunConfig
from reca.engine.errors import UserError
from reca.engine.logger import Logger
from reca.engine.optim import lr_factor
from reca.engine.preview import Previewer


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
        per = {f"{b.objective}/{k}": v for k, v in result.metrics.items()}
        if len(c.objectives) > 1:  # with one objective its loss is `loss`
            per[f"loss/{b.objective}"] = loss
        for name, value in per.items():
            out[name] = out.get(name, 0.0) + value.detach().float() / counts[b.objective]
    clip = c.cfg.optim.clip_grad
    grad_norm = torch.nn.utils.clip_grad_norm_(c.params, clip) if clip > 0 else torch.zeros((), device=c.device)
    skip = (~(out["loss"].isfinite() & grad_norm.isfinite())).float()
    c.optimizer.found_inf = skip
    c.optimizer.step()
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


def train(cfg: RunConfig, *, resume: bool = False, stop_after: int | None = None, quiet: bool = False) -> dict:
    """Run (or, with `resume`, continue) training into `cfg.output.dir`; returns the last metrics
    row. `stop_after` ends the run early after that many optimizer steps (with a checkpoint)."""
    run = Path(cfg.output.dir)
    if resume and not (run / "checkpoint.pt").exists():
        raise UserError(f"nothing to resume: {run / 'checkpoint.pt'} does not exist")
    if not resume and (run / "checkpoint.pt").exists() and not cfg.output.overwrite:
        raise UserError(f"{run} already holds a run; continue it with --resume {run}, "
                        "or replace it with --overwrite")
    c = build(cfg)
    # The run's own global RNG (dropout draws from it), restored to the caller's afterwards.
    with torch.random.fork_rng(devices=[c.device] if c.device.type == "cuda" else []):
        torch.manual_seed(c.cfg.train.seed + 2)
        checkpoints = Checkpointer(c, run)
        start = checkpoints.restore() if resume else 0
        _prepare_run_dir(c, run, resume, start, quiet)
        logger = Logger(c, run, start, resume=resume, quiet=quiet)
        previews = Previewer(c, run)
        try:
            last, final, stopped = _loop(c, start, stop_after, logger, previews, checkpoints)
        finally:
            logger.close()
            c.close()
        if final > start or not previews.exists(final):
            previews.draw(final)
    logger.plot()
    if stopped and not quiet:
        print(f"reca: interrupted after step {final}; continue with: reca train --resume {run}", flush=True)
    return last


def _loop(c: Components, start: int, stop_after: int | None, logger: Logger, previews: Previewer,
          checkpoints: "Checkpointer") -> tuple[dict, int, bool]:
    """Optimizer steps from `start` to the end (or `stop_after` steps, or a stop request) ->
    (last metrics row, last step, whether a stop request ended it)."""
    cfg = c.cfg
    end = cfg.train.steps if stop_after is None else min(cfg.train.steps, start + stop_after)
    stop, last, done = _StopFlag(), {}, start
    with stop.installed():
        for step in range(start, end):
            lr = cfg.optim.lr * lr_factor(step, cfg.optim, cfg.train.steps)  # a host float: no readback
            logger.push(step + 1, lr, c.update(c, next_batches(c)))
            c.scheduler.step()
            done = step + 1
            ckpt = done % cfg.output.ckpt_every == 0 or done == end or stop.requested
            if done % cfg.output.log_every == 0 or ckpt:
                last = logger.flush(wait=ckpt) or last
            if cfg.output.preview_every and done % cfg.output.preview_every == 0 and done != end:
                previews.draw(done)
            if ckpt:
                checkpoints.save(done)
            if stop.requested:
                break
    return last, done, stop.requested


def _prepare_run_dir(c: Components, run: Path, resume: bool, start: int, quiet: bool) -> None:
    run.mkdir(parents=True, exist_ok=True)
    if not resume:  # --overwrite: no picture of the replaced run may pass for this one's
        for old in run.glob("recon_step*.png"):
            old.unlink()
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


class Checkpointer:
    """RUN/checkpoint.pt: trainable weights, optimizer, schedule, data positions, RNG states
    (`reca.engine.checkpoint`: written atomically)."""

    def __init__(self, c: Components, run: Path):
        self.c, self.run = c, run

    def save(self, step: int) -> None:
        c = self.c
        save_checkpoint(self.run, step=step, model=c.model, optimizer=c.optimizer, scheduler=c.scheduler,
                        data=c.data_state(), generator=c.generator)

    def restore(self) -> int:
        """Load the run's checkpoint into the components -> the step it was written at."""
        c, ckpt = self.c, load_checkpoint(self.run)
        load_trainable(c.model, ckpt["model"])
        c.optimizer.load_state_dict(ckpt["optimizer"])
        c.scheduler.load_state_dict(ckpt["scheduler"])
        c.load_data_state(ckpt["data"])
        set_rng_state(ckpt["rng"], c.generator)
        return ckpt["step"]


class _StopFlag:
    """SIGINT/SIGTERM finish the current step, write a checkpoint and stop; a second SIGINT aborts."""

    def __init__(self):
        self.requested = False

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

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


