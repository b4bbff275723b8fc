"""The run's metrics: per-step device scalars read back once per log interval, without stalling
the GPU, into RUN/metrics.jsonl (and TensorBoard), with throughput, data wait, skipped images
and skipped updates; the progress bar; `loss.png` at the end."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from reca.engine.metrics import MetricsWriter, plot_loss, read_metrics


class Readback:
    """Per-step metrics stay on the device. Each log interval is copied to the host at once (one
    pinned buffer per distinct set of names, non_blocking, an event on CUDA) and becomes rows at
    the next interval, when the copy has long finished: logging never drains the GPU queue.
    `collect(wait=True)` (checkpoints, the end) returns everything now. The step's `skip` flag is
    counted into `nonfinite` (skipped updates of the run), which the last row of an interval carries."""

    def __init__(self, device: torch.device, nonfinite: int = 0):
        self.cuda = device.type == "cuda"
        self.pending: list[tuple[int, float, tuple[str, ...], torch.Tensor]] = []  # this interval
        self.inflight: list[tuple] = []  # (rows meta, [(names, host values)], event, extra)
        self.nonfinite = nonfinite

    def push(self, step: int, lr: float, values: dict[str, torch.Tensor]) -> None:
        names = tuple(values)
        self.pending.append((step, lr, names, torch.stack([values[k].float() for k in names])))

    def submit(self, **extra) -> None:
        if not self.pending:  # nothing since the last flush (a stop right after a log or checkpoint step)
            return
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, (_, _, names, _) in enumerate(self.pending):
            groups.setdefault(names, []).append(i)
        copies, event = [], None
        for names, rows in groups.items():
            values = torch.stack([self.pending[i][3] for i in rows])
            if self.cuda:
                host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
                host.copy_(values, non_blocking=True)
                values = host
            copies.append((names, rows, values))
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        meta = [(step, lr) for step, lr, _, _ in self.pending]
        self.inflight.append((meta, copies, event, extra))
        self.pending = []

    def collect(self, wait: bool) -> list[dict]:
        rows = []
        while self.inflight and (wait or len(self.inflight) > 1):
            meta, copies, event, extra = self.inflight.pop(0)
            if event is not None:
                event.synchronize()
            out = [{"step": step} for step, _ in meta]
            for names, idx, values in copies:
                for i, vals in zip(idx, values.tolist()):
                    out[i].update(zip(names, vals))
            for row, (_, lr) in zip(out, meta):
                self.nonfinite += int(row.pop("skip", 0.0))
                row["lr"] = lr
            out[-1].update(extra, nonfinite=self.nonfinite)
            rows += out
        return rows


class Logger:
    """The loop's metrics: `push` every step, `flush` at log intervals and checkpoints (-> the
    last row written, or None), `close` at the end, `plot` for loss.png."""

    def __init__(self, c, run: Path, start: int, *, resume: bool, quiet: bool):
        self.c, self.run = c, run
        self.writer = MetricsWriter(run, c.cfg.output.tensorboard, resume_step=start)
        self.readback = Readback(c.device, nonfinite=_nonfinite_before(run, start) if resume else 0)
        self.images_per_step = c.cfg.optim.grad_accum * c.cfg.data.batch_size
        self.t, self.wait, self.steps = time.perf_counter(), self._wait(), 0
        self.bar = tqdm(total=c.cfg.train.steps, initial=start, disable=quiet, desc="reca train", unit="step",
                        dynamic_ncols=True, mininterval=1.0, file=sys.stderr)

    def _wait(self) -> float:
        return sum(loader.wait_seconds for loader in self.c.loaders.values())

    def push(self, step: int, lr: float, values: dict[str, torch.Tensor]) -> None:
        self.readback.push(step, lr, values)
        self.steps += 1
        self.bar.update(1)

    def flush(self, wait: bool) -> dict | None:
        now, waited = time.perf_counter(), self._wait()
        span = max(now - self.t, 1e-9)
        self.readback.submit(images_per_s=round(self.steps * self.images_per_step / span, 2),
                             data_wait=round((waited - self.wait) / span, 4),
                             skipped=sum(loader.skipped for loader in self.c.loaders.values()))
        self.t, self.wait, self.steps = now, waited, 0
        rows = self.readback.collect(wait=wait)  # the previous interval's rows: long computed, no stall
        if not rows:
            return None
        self.writer.write(rows)
        last = rows[-1]
        self.bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{last['images_per_s']:.1f}",
                             skipped=last["skipped"], nonfinite=last["nonfinite"])
        return last

    def close(self) -> None:
        self.bar.close()
        self.writer.close()

    def plot(self) -> None:
        plot_loss(self.run)


def _nonfinite_before(run: Path, start: int) -> int:
    """Skipped updates the run counted up to `start` (its metrics lines survive a resume)."""
    rows = [r for r in read_metrics(run) if r["step"] <= start and "nonfinite" in r]
    return rows[-1]["nonfinite"] if rows else 0
