"""A run's components, built from a `RunConfig`: device, mode, kernels, model (speed applied from
outside), one loader and prompt builder per objective, optimizer, schedule, generator, and the
step function (eager or a CUDA graph). `train()` and the benchmarks start here."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from reca.engine.compile import apply_checkpointing, apply_compile, compile_ops, set_attention
from reca.engine.config import RunConfig, with_code
from reca.engine.data import build_loader
from reca.engine.ema import EMA
from reca.engine.errors import UserError
from reca.engine.objectives import Objective, objectives_of
from reca.engine.optim import build_optimizer, build_scheduler
from reca.engine.sample import SampleBuilder
from reca.kernels import KernelOps, get_ops
from reca.models import build_model

MODES = ("custom", "fast", "reference")


@dataclass
class Components:
    """Everything a run is made of (tests and benchmarks reuse it)."""

    cfg: RunConfig  # resolved: `train.mode` applied
    device: torch.device
    model: torch.nn.Module
    ops: KernelOps
    objectives: list[Objective]  # the distinct entries of mix.cycle
    loaders: dict[str, object]  # objective name -> its loader
    builders: dict[str, SampleBuilder]  # objective name -> its prompt builder
    optimizer: torch.optim.Optimizer
    scheduler: object
    generator: torch.Generator  # the training noise (timesteps, masks, posterior samples)
    params: list[torch.nn.Parameter]
    update: Callable  # (Components, batches) -> dict of device scalars: train_step or a GraphStep
    ema: EMA | None = None  # `train.ema` > 0: the trained weights' moving average, updated in the step

    @property
    def loader(self):
        """The RecA images' loader (what throughput and data-wait are measured on)."""
        return self.loaders[self.objectives[0].name]

    @property
    def builder(self) -> SampleBuilder:
        return self.builders[self.objectives[0].name]

    def data_state(self) -> dict:
        return {o.state_key: self.loaders[o.name].state_dict() for o in self.objectives}

    def load_data_state(self, state: dict) -> None:
        for o in self.objectives:
            self.loaders[o.name].load_state_dict(state[o.state_key])

    def close(self) -> None:
        for loader in self.loaders.values():
            loader.close()


def build(cfg: RunConfig, *, rank: int = 0, world_size: int = 1,
          place: Callable[[RunConfig, KernelOps, torch.device], torch.nn.Module] | None = None) -> Components:
    """Components of a run; `cfg.train.mode` is resolved here (`Components.cfg` is the result).
    The caller's global RNG is left as it was: the model is initialised from `train.seed` inside
    `torch.random.fork_rng` (frozen weights are rebuilt from it on resume). Under torchrun
    (`reca.engine.distributed`) each objective's loader reads rank `rank`'s share of the stream,
    and `place` makes the model instead of `seeded_model` + `speed_up` (FSDP: built on the meta
    device, sharded, then filled from rank 0), so the optimizer and the EMA are built over the
    model as it trains."""
    device = resolve_device(cfg.train.device)
    cfg = with_code(with_release_tokenizer(resolve_mode(cfg, device)))  # config.json names the family's module
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        ops = get_ops(cfg.kernels.backend, device)
    except ValueError as e:
        raise UserError(str(e)) from None
    if cfg.train.compile:
        ops = compile_ops(ops)
    model = place(cfg, ops, device) if place is not None else speed_up(seeded_model(cfg, ops, device), cfg)
    model.train()
    objectives = objectives_of(cfg, model)
    # A step holds grad_accum batches at once: a CUDA decoder's fixed buffers rotate that many.
    loaders = {o.name: build_loader(o.data(cfg), o.views(model), rank=rank, world_size=world_size,
                                    hold=cfg.optim.grad_accum) for o in objectives}
    builders = {o.name: o.builder(model, cfg) for o in objectives}
    try:
        optimizer = build_optimizer(model, cfg.optim, device, capturable=cfg.train.cuda_graph and place is None,
                                    exempt=tuple(model.no_weight_decay_modules()))
    except ValueError as e:
        raise UserError(str(e)) from None
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    generator = torch.Generator(device).manual_seed(cfg.train.seed + 1)
    from reca.engine.train import train_step

    update = train_step
    if cfg.train.cuda_graph:
        from reca.engine.graph import GraphStep

        update = GraphStep(train_step)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.train.ema and cfg.train.ema_on_host and cfg.train.cuda_graph:
        raise UserError("train.ema_on_host copies the weights to the host inside the step, which a CUDA graph "
                        "cannot hold; turn off train.cuda_graph (or train.mode=fast) or train.ema_on_host")
    # after init_from: the EMA starts from those weights
    ema = EMA(model, cfg.train.ema, on_host=cfg.train.ema_on_host) if cfg.train.ema else None
    return Components(cfg, device, model, ops, objectives, loaders, builders, optimizer, scheduler, generator,
                      params, update, ema)


def speed_up(model: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
    """Attention backend, activation checkpointing and per-block compile, applied from outside
    in torchtitan's order (checkpointing, compile, then any sharding) -> the same module."""
    set_attention(model, cfg.train.attention)
    apply_checkpointing(model, cfg.train.checkpoint_every, captured=cfg.train.cuda_graph)
    if cfg.train.compile:
        apply_compile(model)
    return model


TOKENIZER_PLACES = ("", "llm", "internvl", "phi", "tokenizer")  # where releases keep their tokenizer files


def with_release_tokenizer(cfg: RunConfig) -> RunConfig:
    """With `train.init_from` and no `model.tokenizer`: the tokenizer of the release directory
    as downloaded (BAGEL-7B-MoT's Qwen2 files beside ema.safetensors, a Qwen2.5 or InternVL3 or
    Phi-1.5 directory inside it), so a real checkpoint never meets reca's tiny tokenizer."""
    model = cfg.model
    if not cfg.train.init_from or getattr(model, "tokenizer", None) != "":
        return cfg
    from reca.models.tokenizer import is_tokenizer_dir

    root = Path(cfg.train.init_from)
    root = root if root.is_dir() else root.parent  # a checkpoint file: its directory
    for place in TOKENIZER_PLACES:
        if is_tokenizer_dir(str(root / place)):
            return replace(cfg, model=replace(model, tokenizer=str(root / place) if place else str(root)))
    return cfg


def seeded_model(cfg: RunConfig, ops: KernelOps, device: torch.device, *,
                 draw_on: torch.device | None = None) -> torch.nn.Module:
    """The run's model as every run and every reader of a run rebuilds it: initialised on
    `draw_on` (default: `device`) from `train.seed` inside `fork_rng` (the caller's RNG
    untouched; frozen weights that come from the seed are the same each time), then
    `train.init_from` loaded, on `device`. Faults are one-line errors.

    The random weights depend on the device type that draws them. Training draws them where the
    model lives: on the GPU for a one-GPU run and every ddp rank (drawing 2.5B parameters on the
    CPU takes ~40 s: torch's CPU generator is one thread), on the CPU for rank 0's copy under
    fsdp (`reca.engine.fsdp`); a step-N/ folder records which (`drawn_on`), and `reca sample` /
    `reca export` draw there again. With `train.init_from`, as every real run has, the frozen
    weights are the checkpoint's and any of these resumes into any other; with random weights a
    CUDA run and a sharded job differ, and a resume across them is refused in one line by the
    frozen fingerprint (`checkpoint.guard`)."""
    cfg = with_release_tokenizer(cfg)
    draw = draw_on or device
    with torch.random.fork_rng(devices=[draw] if draw.type == "cuda" else []):
        torch.manual_seed(cfg.train.seed)
        with torch.device(draw):
            try:
                model = build_model(cfg.model, ops)
            except ValueError as e:  # inconsistent model settings from the CLI
                raise UserError(f"model config: {e}") from None
    model.to(device)
    if cfg.train.init_from:
        model.init_from_report = load_init_from(model, cfg)
    return model


def load_init_from(model: torch.nn.Module, cfg: RunConfig) -> str:
    """`train.init_from` into `model` -> the report of what it supplied: tensors per file (and
    how many of a file the family does not use), then the modules no file supplied, which keep
    their initialisation. A tensor with no place in the model, or one a file lacks, is refused
    in one line (`reca.models.loading`); so is a family without the capability."""
    from reca.models.loading import recording

    if "init_from" not in model.capabilities:
        raise UserError(f"the {cfg.model.family} family cannot load --init-from weights")
    with recording() as record:
        try:
            model.load_pretrained(cfg.train.init_from)
        except (ValueError, OSError, RuntimeError) as e:  # RuntimeError: an unreadable torch file
            raise UserError(" ".join(str(e).split())[:500]) from None
    files = [f"{name} {n:,} tensors" + (f" ({skipped:,} not used)" if skipped else "")
             for name, (n, skipped) in record["files"].items()]
    left: dict[str, int] = {}
    for name, p in model.named_parameters():
        if id(p) not in record["set"]:
            top = name.split(".")[0]
            left[top] = left.get(top, 0) + p.numel()
    report = f"--init-from {cfg.train.init_from}: " + ("; ".join(files + record["notes"]) or "no tensors")
    if left:
        report += "; left at their initialisation: " + ", ".join(f"{k} ({v:,} parameters)" for k, v in left.items())
    return report


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
