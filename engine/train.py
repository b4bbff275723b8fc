"""The RecA training loop. One batch flows: images -> sample builder -> model -> loss ->
backward -> clip -> AdamW step. Read top to bottom: `train_step` is the whole recipe,
`train` wires the components and runs the loop with logging, previews and checkpoints."""
from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from reca.engine.checkpoint import load_checkpoint, load_trainable, save_checkpoint, set_rng_state
from reca.engine.config import RunConfig
from reca.engine.data import build_loader
from reca.engine.errors import UserError
from reca.engine.metrics import MetricsWriter, plot_loss, save_grid
from reca.engine.optim import build_optimizer, build_scheduler
from reca.engine.sample import SampleBuilder, load_instructions
from reca.kernels import KernelOps, get_ops
from reca.models import build_model
from reca.models.adapter import LossOutput, PromptBatch


def train_step(model, ops: KernelOps, und: torch.Tensor, gen: torch.Tensor, prompt: PromptBatch,
               generator: torch.Generator | None = None) -> LossOutput:
    """One RecA micro-batch: the image's own understanding embeddings become the prompt of its
    regeneration. und [B, 3, Hu, Wu], gen [B, 3, Hg, Wg], prompt ids/mask [B, P]."""
    visual = model.encode_visual_prompt(und)  # [B, Nv/B, D]
    target = model.make_target(gen, generator)  # frozen VAE: no gradient
    embeds = ops.condition(prompt.input_ids, model.input_embeddings(), visual.flatten(0, 1),
                           model.image_token_id, model.visual_grad_scale)  # [B, P, D]
    return model.generation_loss(embeds, prompt, target, generator)


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"unknown device {spec!r} (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {spec!r} asked for, but no CUDA GPU is available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device {spec!r} asked for, but only {torch.cuda.device_count()} GPU(s) are present")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device {spec!r} (auto, cpu, cuda or cuda:N)")
    return device


def autocast(cfg: RunConfig, device: torch.device):
    """bf16 autocast on CUDA (or when asked for), fp32 on CPU by default."""
    precision = cfg.train.precision
    if precision not in ("auto", "bf16", "fp32"):
        raise UserError(f"train.precision must be auto, bf16 or fp32, got {precision!r}")
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


@dataclass
class Components:
    """Everything a run is made of, built from a `RunConfig` (tests reuse it)."""

    cfg: RunConfig
    device: torch.device
    model: torch.nn.Module
    ops: KernelOps
    builder: SampleBuilder
    loader: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    generator: torch.Generator


def build(cfg: RunConfig) -> Components:
    device = resolve_device(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        ops = get_ops(cfg.kernels.backend, device)
    except ValueError as e:
        raise UserError(str(e)) from None
    torch.manual_seed(cfg.train.seed)  # frozen weights are rebuilt from this on resume
    with torch.device(device):
        try:
            model = build_model(cfg.model, ops)
        except ValueError as e:  # inconsistent model settings from the CLI
            raise UserError(f"model config: {e}") from None
    if cfg.train.init_from:
        if not hasattr(model, "load_pretrained"):
            raise UserError(f"the {cfg.model.family} family cannot load --init-from weights")
        try:
            model.load_pretrained(cfg.train.init_from)
        except (ValueError, OSError) as e:
            raise UserError(str(e)) from None
    model.train()
    builder = SampleBuilder(
        model.tokenizer, model.template, model.num_visual_tokens, load_instructions(cfg.sample.prompts),
        fixed_instruction=cfg.sample.fixed_instruction, fixed_prob=cfg.sample.fixed_prob,
        max_text_tokens=cfg.sample.max_text_tokens, seed=cfg.data.seed,
    )
    loader = build_loader(cfg.data, model.views)
    optimizer = build_optimizer(model, cfg.optim, device)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    generator = torch.Generator(device).manual_seed(cfg.train.seed + 1)
    return Components(cfg, device, model, ops, builder, loader, optimizer, scheduler, generator)


def train(cfg: RunConfig, *, resume: bool = False, stop_after: int | None = None, quiet: bool = False) -> dict:
    """Run (or, with `resume`, continue) training into `cfg.output.dir`; returns the last metrics.
    `stop_after` ends the run early after that many optimizer steps (with a checkpoint)."""
    run = Path(cfg.output.dir)
    if resume and not (run / "checkpoint.pt").exists():
        raise UserError(f"nothing to resume: {run / 'checkpoint.pt'} does not exist")
    if not resume and (run / "checkpoint.pt").exists() and not cfg.output.overwrite:
        raise UserError(f"{run} already holds a run; continue it with --resume {run}, "
                        "or replace it with --overwrite")
    c = build(cfg)
    model, opt = c.model, c.optimizer
    start = 0
    if resume:
        ckpt = load_checkpoint(run)
        load_trainable(model, ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        c.scheduler.load_state_dict(ckpt["scheduler"])
        c.loader.load_state_dict(ckpt["data"])
        set_rng_state(ckpt["rng"], c.generator)
        start = ckpt["step"]
    run.mkdir(parents=True, exist_ok=True)
    if not resume:  # --overwrite: no picture of the replaced run may pass for this one's
        for old in run.glob("recon_step*.png"):
            old.unlink()
    (run / "config.json").write_text(cfg.to_json())
    model.tokenizer.save(str(run / "tokenizer"))
    if not quiet:
        print(f"reca: resolved config (saved to {run / 'config.json'}):\n{cfg.to_json()}", flush=True)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        print(f"reca: {cfg.preset or cfg.model.family} on {c.device}: {n_all / 1e6:.2f}M parameters, "
              f"{n_train / 1e6:.2f}M trainable; kernels={c.ops.backend}; "
              f"{'resuming at step ' + str(start) if resume else 'starting'} into {run}", flush=True)

    metrics = MetricsWriter(run, cfg.output.tensorboard, resume_step=start)
    preview = _preview_batch(c)
    params = [p for p in model.parameters() if p.requires_grad]
    accum, end = cfg.optim.grad_accum, cfg.train.steps
    if stop_after is not None:
        end = min(end, start + stop_after)
    stop = _StopFlag()
    pending: list[tuple] = []  # (step, loss, grad_norm, lr) as device tensors: read back at log time
    last: dict = {}
    t_log, wait_log, n_log = time.perf_counter(), c.loader.wait_seconds, 0
    bar = tqdm(total=cfg.train.steps, initial=start, disable=quiet, desc="reca train", unit="step",
               dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
    with stop.installed():
        for step in range(start, end):
            lr = c.scheduler.get_last_lr()[0]
            loss = torch.zeros((), device=c.device)
            for _ in range(accum):
                images = next(c.loader)
                prompt = c.builder.build(images.positions).to(c.device)
                with autocast(cfg, c.device):
                    out = train_step(model, c.ops, images.und.to(c.device, non_blocking=True),
                                     images.gen.to(c.device, non_blocking=True), prompt, c.generator)
                (out.loss / accum).backward()
                loss += out.loss.detach() / accum
            if cfg.optim.clip_grad > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad)
            else:
                grad_norm = torch.zeros((), device=c.device)
            opt.step()
            c.scheduler.step()
            opt.zero_grad(set_to_none=True)
            pending.append((step + 1, loss, grad_norm, lr))
            n_log += 1
            bar.update(1)

            done = step + 1
            if done % cfg.output.log_every == 0 or done == end or stop.requested:
                now, wait = time.perf_counter(), c.loader.wait_seconds
                speed = n_log * accum * cfg.data.batch_size / max(now - t_log, 1e-9)
                last = _flush(metrics, pending, speed, (wait - wait_log) / max(now - t_log, 1e-9), c.loader.skipped)
                bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{speed:.1f}", skipped=last["skipped"])
                t_log, wait_log, n_log = now, wait, 0
            if cfg.output.preview_every and done % cfg.output.preview_every == 0 and done != end:
                _write_preview(c, preview, done)
            if done % cfg.output.ckpt_every == 0 or done == end or stop.requested:
                save_checkpoint(run, step=done, model=model, optimizer=opt, scheduler=c.scheduler,
                                loader=c.loader, generator=c.generator)
            if stop.requested:
                break
    bar.close()
    c.loader.close()
    final = start if not last else last["step"]
    if final > start or not (run / f"recon_step{final}.png").exists():
        _write_preview(c, preview, final)
    plot_loss(run)
    metrics.close()
    if stop.requested and not quiet:
        print(f"reca: interrupted after step {final}; continue with: reca train --resume {run}", flush=True)
    return last


def _flush(metrics: MetricsWriter, pending: list[tuple], images_per_s: float, wait_frac: float, skipped: int) -> dict:
    """One host sync for all steps since the last log: their losses become metrics.jsonl lines."""
    values = torch.stack([torch.stack([l.float(), g.float()]) for _, l, g, _ in pending]).tolist()
    rows = [{"step": s, "loss": v[0], "grad_norm": v[1], "lr": lr} for (s, _, _, lr), v in zip(pending, values)]
    rows[-1].update(images_per_s=round(images_per_s, 2), data_wait=round(wait_frac, 4), skipped=skipped)
    metrics.write(rows)
    pending.clear()
    return rows[-1]


def _preview_batch(c: Components):
    """A fixed set of uncropped, unflipped images whose reconstructions are drawn over the run."""
    k = c.cfg.output.preview_images
    if k <= 0:
        return None
    data = dataclasses.replace(c.cfg.data, batch_size=k, crop_scale=1.0, hflip=False, num_workers=0)
    loader = build_loader(data, c.model.views)
    try:
        batch = next(loader)
    finally:
        loader.close()
    return batch


@torch.no_grad()
def _write_preview(c: Components, batch, step: int) -> None:
    """RUN/recon_step{N}.png: input | image sampled from its visual prompt alone (fixed instruction)."""
    if batch is None:
        return
    model = c.model
    was_training = model.training
    model.eval()
    prompt = c.builder.build(list(range(batch.und.shape[0])), fixed=True).to(c.device)
    with autocast(c.cfg, c.device):
        visual = model.encode_visual_prompt(batch.und.to(c.device))
        embeds = c.ops.condition(prompt.input_ids, model.input_embeddings(), visual.flatten(0, 1),
                                 model.image_token_id, 1.0)
        images = model.sample(embeds, prompt, c.cfg.output.preview_steps,
                              generator=torch.Generator(c.device).manual_seed(0))
    model.train(was_training)
    save_grid([batch.gen, images.float().cpu()], Path(c.cfg.output.dir) / f"recon_step{step}.png")


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
