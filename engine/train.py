"""The RecA training loop. One batch flows: images -> sample builder -> model -> loss ->
backward -> clip -> AdamW step. Read top to bottom: `train_step` is the whole recipe,
`optimizer_update` one optimizer step over the micro-batches (eager, or captured in a CUDA
graph by `reca.engine.graph`), `train` wires the components and runs the loop with logging,
previews and checkpoints. Nothing in a step reads a value back to the host."""
from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from reca.engine.checkpoint import load_checkpoint, load_trainable, save_checkpoint, set_rng_state
from reca.engine.config import RunConfig
from reca.engine.data import build_loader
from reca.engine.errors import UserError
from reca.engine.compile import apply_checkpointing, apply_compile, compile_ops, set_attention
from reca.engine.metrics import MetricsWriter, plot_loss, read_metrics, save_grid
from reca.engine.optim import build_optimizer, build_scheduler
from reca.engine.sample import SampleBuilder, load_instructions
from reca.kernels import KernelOps, get_ops
from reca.models import build_model
from reca.models.adapter import LossOutput, PromptBatch


def train_step(model, ops: KernelOps, und: torch.Tensor, gen: torch.Tensor, prompt: PromptBatch,
               generator: torch.Generator | None = None) -> LossOutput:
    """One RecA micro-batch: the image's own understanding embeddings become the prompt of its
    regeneration. und [B, 3, Hu, Wu], gen [B, 3, Hg, Wg], prompt ids/mask [B, P]."""
    if hasattr(model, "encode_views"):  # a family that shares work between the two (`und is gen`)
        visual, target = model.encode_views(und, gen, generator)
    else:
        visual = model.encode_visual_prompt(und)  # [B, Nv/B, D]
        target = model.make_target(gen, generator)  # frozen VAE: no gradient
    embeds = ops.condition(prompt.input_ids, model.input_embeddings(), visual.flatten(0, 1),
                           model.image_token_id, model.visual_grad_scale)  # [B, P, D]
    return model.generation_loss(embeds, prompt, target, generator)


def caption_step(model, ops: KernelOps, und: torch.Tensor, prompt: PromptBatch, answer_ids: torch.Tensor,
                 answer_mask: torch.Tensor) -> LossOutput:
    """One image-to-text micro-batch (mixed with RecA, e.g. Harmon's 2 : 2): the same visual
    prompt, then cross-entropy on the caption's tokens only. answer ids/mask [B, A]."""
    visual = model.encode_visual_prompt(und)
    embeds = ops.condition(prompt.input_ids, model.input_embeddings(), visual.flatten(0, 1),
                           model.image_token_id, model.visual_grad_scale)
    return model.caption_loss(embeds, prompt.mask, answer_ids, answer_mask)


@dataclass
class MicroBatch:
    """One micro-batch on the device. kind "recon": und, gen, prompt; kind "caption": und,
    prompt, answer ids/mask [B, A] (gen unused)."""

    kind: str
    und: torch.Tensor
    gen: torch.Tensor | None
    prompt: PromptBatch
    answer_ids: torch.Tensor | None = None
    answer_mask: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor, in a fixed order (a CUDA graph copies into static twins)."""
        gen = None if self.gen is self.und else self.gen  # shared views: one tensor
        parts = [self.und, gen, self.prompt.input_ids, self.prompt.mask, self.answer_ids, self.answer_mask]
        return [t for t in parts if t is not None]


def optimizer_update(c: "Components", batches: list[MicroBatch]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step over micro-batches: forward + backward each, clip, AdamW. A non-finite
    loss or gradient norm skips the update on the device (fused AdamW's `found_inf`, as
    GradScaler uses it: no host sync). Returns device scalars (loss, grad_norm, skipped)."""
    loss = torch.zeros((), device=c.device)
    for b in batches:
        with autocast(c.cfg, c.device, cache=not c.cfg.train.cuda_graph):  # no cast cache inside a graph
            if b.kind == "recon":
                out = train_step(c.model, c.ops, b.und, b.gen, b.prompt, c.generator)
            else:
                out = caption_step(c.model, c.ops, b.und, b.prompt, b.answer_ids, b.answer_mask)
        (out.loss / len(batches)).backward()
        loss += out.loss.detach().float() / len(batches)
    clip = c.cfg.optim.clip_grad
    grad_norm = torch.nn.utils.clip_grad_norm_(c.params, clip) if clip > 0 else torch.zeros((), device=c.device)
    skipped = (~(loss.isfinite() & grad_norm.isfinite())).float()
    c.optimizer.found_inf = skipped
    c.optimizer.step()
    c.optimizer.zero_grad(set_to_none=not c.cfg.train.cuda_graph)  # a graph keeps its gradients, zeroed in place
    return loss, grad_norm.float(), skipped


MODES = ("custom", "fast", "reference")


def resolve_mode(cfg: RunConfig, device: torch.device) -> RunConfig:
    """The config a `train.mode` stands for. reference: eager, SDPA, torch kernels, Pillow, no
    graph (the baseline benchmarks print). fast: per-block compile, kernels auto (Triton on
    CUDA), CUDA graph on CUDA. custom: the fields as set."""
    t = cfg.train
    if t.mode not in MODES:
        raise UserError(f"train.mode must be one of {', '.join(MODES)}, got {t.mode!r}")
    if t.mode == "reference":
        cfg = replace(cfg, train=replace(t, compile=False, cuda_graph=False, attention="sdpa"),
                      kernels=replace(cfg.kernels, backend="torch"), data=replace(cfg.data, decoder="pil"))
    elif t.mode == "fast":
        cfg = replace(cfg, train=replace(t, compile=True, cuda_graph=device.type == "cuda"),
                      kernels=replace(cfg.kernels, backend="auto"))
    if cfg.train.cuda_graph and device.type != "cuda":
        raise UserError("train.cuda_graph needs CUDA")
    return cfg


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


def autocast(cfg: RunConfig, device: torch.device, cache: bool = True):
    """bf16 autocast on CUDA (or when asked for), fp32 on CPU by default."""
    precision = cfg.train.precision
    if precision not in ("auto", "bf16", "fp32"):
        raise UserError(f"train.precision must be auto, bf16 or fp32, got {precision!r}")
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=cache)


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
    params: list[torch.nn.Parameter]
    update: Callable  # (Components, batches) -> (loss, grad_norm, skipped): optimizer_update or a GraphStep
    caption_loader: object = None  # captioned images, when mix.cycle holds "caption"
    caption_builder: SampleBuilder | None = None

    def data_state(self) -> dict:
        state = {"images": self.loader.state_dict()}
        if self.caption_loader is not None:
            state["captions"] = self.caption_loader.state_dict()
        return state

    def load_data_state(self, state: dict) -> None:
        self.loader.load_state_dict(state["images"])
        if self.caption_loader is not None:
            self.caption_loader.load_state_dict(state["captions"])


def build(cfg: RunConfig) -> Components:
    """Components of a run; `cfg.train.mode` is resolved here (`Components.cfg` is the result)."""
    device = resolve_device(cfg.train.device)
    cfg = resolve_mode(cfg, device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        ops = get_ops(cfg.kernels.backend, device)
    except ValueError as e:
        raise UserError(str(e)) from None
    if cfg.train.compile:
        ops = compile_ops(ops)
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
    set_attention(model, cfg.train.attention)
    apply_checkpointing(model, cfg.train.checkpoint_every)
    if cfg.train.compile:
        apply_compile(model)
    model.train()
    builder = SampleBuilder(
        model.tokenizer, model.template, model.num_visual_tokens, load_instructions(cfg.sample.prompts),
        fixed_instruction=cfg.sample.fixed_instruction, fixed_prob=cfg.sample.fixed_prob,
        max_text_tokens=cfg.sample.max_text_tokens, seed=cfg.data.seed,
    )
    caption_builder = SampleBuilder(
        model.tokenizer, getattr(model, "caption_template", model.template), model.num_visual_tokens,
        load_instructions(cfg.sample.prompts), max_text_tokens=cfg.sample.max_text_tokens, seed=cfg.data.seed)
    # A step holds grad_accum batches at once: a CUDA decoder's fixed buffers rotate that many.
    loader = build_loader(cfg.data, model.views, hold=cfg.optim.grad_accum)
    caption_loader = _caption_loader(cfg, model)
    try:
        optimizer = build_optimizer(model, cfg.optim, device, capturable=cfg.train.cuda_graph)
    except ValueError as e:
        raise UserError(str(e)) from None
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    generator = torch.Generator(device).manual_seed(cfg.train.seed + 1)
    update = optimizer_update
    if cfg.train.cuda_graph:
        from reca.engine.graph import GraphStep

        update = GraphStep(optimizer_update)
    params = [p for p in model.parameters() if p.requires_grad]
    return Components(cfg, device, model, ops, builder, loader, optimizer, scheduler, generator, params, update,
                      caption_loader, caption_builder)


def _caption_loader(cfg: RunConfig, model):
    kinds = set(cfg.mix.cycle)
    if not kinds or kinds - {"recon", "caption"}:
        raise UserError(f"mix.cycle takes 'recon' and 'caption' entries, got {cfg.mix.cycle!r}")
    if "caption" not in kinds:
        return None
    if not hasattr(model, "caption_loss"):
        raise UserError(f"the {cfg.model.family} family has no image-to-text objective; drop 'caption' from mix.cycle")
    if not cfg.mix.caption_source:
        raise UserError(f"mix.cycle {','.join(cfg.mix.cycle)} has captioning micro-batches: name the captioned "
                        "images with --set mix.caption_source=DIR (NAME.txt beside each image), "
                        "or train RecA alone with --set mix.cycle=recon")
    # whole images, unflipped: a caption may speak of any corner, or of left and right
    data = replace(cfg.data, source=cfg.mix.caption_source, crop_scale=1.0, hflip=False)
    return build_loader(data, getattr(model, "caption_views", model.views), hold=cfg.optim.grad_accum)


def next_batches(c: Components) -> list[MicroBatch]:
    """The next optimizer step's `optim.grad_accum` micro-batches on the device (pinned,
    asynchronous copies). Micro-batch i of step s has objective mix.cycle[(s * accum + i) % len]."""
    accum, cycle = c.cfg.optim.grad_accum, c.cfg.mix.cycle
    step = c.scheduler.last_epoch  # optimizer steps taken so far (restored on resume)
    out = []
    for i in range(accum):
        kind = cycle[(step * accum + i) % len(cycle)]
        if kind == "recon":
            images = next(c.loader)
            p = c.builder.build(images.positions)
            und = _to(images.und, c.device)
            gen = und if images.gen is images.und else _to(images.gen, c.device)  # shared views: one copy
            out.append(MicroBatch("recon", und, gen, _prompt_to(p, c.device)))
        else:
            images = next(c.caption_loader)
            p, ids, mask = c.caption_builder.build_caption(c.model.tokenizer, images.captions, c.cfg.mix.caption_prompt,
                                                   c.cfg.mix.max_answer_tokens)
            out.append(MicroBatch("caption", _to(images.und, c.device), None, _prompt_to(p, c.device),
                                  _to(ids, c.device), _to(mask, c.device)))
    return out


def _prompt_to(p: PromptBatch, device: torch.device) -> PromptBatch:
    return PromptBatch(_to(p.input_ids, device), _to(p.mask, device))


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()  # pageable host memory would make the copy synchronous
    return t.to(device, non_blocking=True)


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
        c.load_data_state(ckpt["data"])
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
              f"{n_train / 1e6:.2f}M trainable; mode={cfg.train.mode} (kernels={c.ops.backend}, "
              f"compile={c.cfg.train.compile}, cuda_graph={c.cfg.train.cuda_graph}); "
              f"{'resuming at step ' + str(start) if resume else 'starting'} into {run}", flush=True)

    metrics = MetricsWriter(run, cfg.output.tensorboard, resume_step=start)
    readback = _Readback(c.device, nonfinite=_nonfinite_before(run, start) if resume else 0)
    preview = _preview_batch(c)
    accum, end = cfg.optim.grad_accum, cfg.train.steps
    if stop_after is not None:
        end = min(end, start + stop_after)
    stop = _StopFlag()
    last: dict = {}
    t_log, wait_log, n_log = time.perf_counter(), c.loader.wait_seconds, 0
    bar = tqdm(total=cfg.train.steps, initial=start, disable=quiet, desc="reca train", unit="step",
               dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
    with stop.installed():
        for step in range(start, end):
            lr = c.scheduler.get_last_lr()[0]
            loss, grad_norm, skipped = c.update(c, next_batches(c))
            c.scheduler.step()
            readback.push(step + 1, lr, torch.stack([loss, grad_norm, skipped]))
            n_log += 1
            bar.update(1)

            done = step + 1
            ckpt = done % cfg.output.ckpt_every == 0 or done == end or stop.requested
            if done % cfg.output.log_every == 0 or ckpt:
                now, wait = time.perf_counter(), c.loader.wait_seconds
                speed = n_log * accum * cfg.data.batch_size / max(now - t_log, 1e-9)
                readback.submit(images_per_s=round(speed, 2), data_wait=round((wait - wait_log) / max(now - t_log, 1e-9), 4),
                                skipped=c.loader.skipped)
                rows = readback.collect(wait=ckpt)  # the previous interval's rows: long computed, no stall
                if rows:
                    metrics.write(rows)
                    last = rows[-1]
                    bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{last['images_per_s']:.1f}",
                                    skipped=last["skipped"], nonfinite=last["nonfinite"])
                t_log, wait_log, n_log = now, wait, 0
            if cfg.output.preview_every and done % cfg.output.preview_every == 0 and done != end:
                _write_preview(c, preview, done)
            if ckpt:
                save_checkpoint(run, step=done, model=model, optimizer=opt, scheduler=c.scheduler,
                                data=c.data_state(), generator=c.generator)
            if stop.requested:
                break
    bar.close()
    c.loader.close()
    if c.caption_loader is not None:
        c.caption_loader.close()
    final = start if not last else last["step"]
    if final > start or not (run / f"recon_step{final}.png").exists():
        _write_preview(c, preview, final)
    plot_loss(run)
    metrics.close()
    if stop.requested and not quiet:
        print(f"reca: interrupted after step {final}; continue with: reca train --resume {run}", flush=True)
    return last


class _Readback:
    """Per-step (loss, grad_norm, skipped) stay on the device. Each log interval is copied to the
    host at once (pinned buffer, non_blocking, an event on CUDA) and becomes metrics rows at the
    next interval, when the copy has long finished: logging never drains the GPU queue.
    `collect(wait=True)` (checkpoints, the end) returns everything now. `nonfinite` counts the
    skipped updates of the run; the log rows carry it."""

    def __init__(self, device: torch.device, nonfinite: int = 0):
        self.cuda = device.type == "cuda"
        self.meta: list[tuple] = []  # (step, lr) of the current interval
        self.values: list[torch.Tensor] = []
        self.inflight: list[tuple] = []  # (meta, host values, event, extra)
        self.nonfinite = nonfinite

    def push(self, step: int, lr, values: torch.Tensor) -> None:
        self.meta.append((step, lr))
        self.values.append(values)

    def submit(self, **extra) -> None:
        values = torch.stack(self.values).float()
        event = None
        if self.cuda:
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            values = host
        self.inflight.append((self.meta, values, event, extra))
        self.meta, self.values = [], []

    def collect(self, wait: bool) -> list[dict]:
        rows = []
        while self.inflight and (wait or len(self.inflight) > 1):
            meta, values, event, extra = self.inflight.pop(0)
            if event is not None:
                event.synchronize()
            for (step, lr), (loss, grad_norm, skipped) in zip(meta, values.tolist()):
                self.nonfinite += int(skipped)
                rows.append({"step": step, "loss": loss, "grad_norm": grad_norm, "lr": float(lr)})
            rows[-1].update(extra, nonfinite=self.nonfinite)
        return rows


def _nonfinite_before(run: Path, start: int) -> int:
    """Skipped updates the run counted up to `start` (its metrics lines survive a resume)."""
    rows = [r for r in read_metrics(run) if r["step"] <= start and "nonfinite" in r]
    return rows[-1]["nonfinite"] if rows else 0


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
