"""One training step of a run's config, measured by `reca bench memory` without a GPU: the
family's model code at the config's sizes, its micro-batch shapes, bf16 autocast, the activation
checkpointing configured, AdamW and the EMA, the backward and the optimizer step, on fake tensors
(`FakeTensorMode`: nothing allocated) with every tensor's bytes tracked (`reca.engine.bench.fake`).

    world size 1   the one-process run (`reca train` on one GPU): the whole model on the device
    N > 1          one rank of an FSDP2 job (`reca.engine.fsdp`: `fully_shard` per block, then the
                   root; bf16 gathered, fp32 gradients) over torch's fake process group of N ranks
                   (collectives move nothing); with `distributed.cpu_offload` also at N = 1

The optimizer state and the EMA exist before the measured step (one step of zero gradients, as
after the run's first), so the peak is the steady state's. `fake=False` runs the same step on
real CPU tensors under the same tracker (`--validate`: tiny presets only).
"""
from __future__ import annotations

import contextlib
import functools
import math
import time
import warnings
from dataclasses import dataclass, replace

import torch

from reca.engine.bench.fake import (CATEGORIES, FSDPStepTracker, StepTracker, cuda_like, in_recompute,
                                    untracked_propagation)
from reca.engine.config import RunConfig
from reca.engine.errors import UserError

CAPTION = "a photograph " * 512  # a caption longer than any max_answer_tokens: answers at their full length


@dataclass(frozen=True)
class _Rank:  # reca.engine.distributed.Rank's fields, for a rank of the fake group
    rank: int
    world_size: int
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def bench_config(cfg: RunConfig) -> RunConfig:
    """The config as a CUDA run resolves it: bf16 autocast (precision auto), eager (compile and
    CUDA graphs change what is saved, and are not measured), BAGEL's flex attention."""
    t = cfg.train
    train = replace(t, mode="custom", compile=False, cuda_graph=False, device="cpu",
                    precision="bf16" if t.precision == "auto" else t.precision)
    model = cfg.model
    if getattr(model, "attention", None) == "auto":  # BAGEL: flex on a GPU
        model = replace(model, attention="flex")
    return replace(cfg, train=train, model=model, output=replace(cfg.output, tensorboard=False))


def uses_fsdp(cfg: RunConfig, world_size: int) -> bool:
    return world_size > 1 or cfg.distributed.cpu_offload


def measure_step(cfg: RunConfig, world_size: int = 1, *, fake: bool = True, captured: bool | None = None) -> dict:
    """One steady-state optimizer step of `cfg` on one rank of `world_size` -> {"peak_device_bytes",
    "categories" (bytes per `CATEGORIES` at that peak), "where", "peak_step_host_bytes" (host
    memory the step holds: offloaded shards, the EMA on the host), "pack_tokens" (BAGEL: the
    longest pack of a micro-batch, else None), "seconds"}. `captured`: the step is a CUDA graph,
    whose checkpointed blocks with dropout save their random ops (default: what `cfg`'s
    train.mode resolves to on CUDA; give it for a config already through `bench_config`)."""
    from reca.engine.build import resolve_mode

    if captured is None:  # a CUDA graph's step saves its random ops in checkpointed blocks
        captured = resolve_mode(cfg, torch.device("cuda")).train.cuda_graph
    cfg = bench_config(cfg)
    if world_size > 1 and cfg.distributed.strategy != "fsdp":
        raise UserError("reca bench memory measures distributed.strategy=fsdp across ranks")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        # torch's ModTracker doubts its module stack when a checkpointed block recomputes; the
        # peaks do not depend on it (the tracker's own note: categories may mix, totals do not)
        warnings.filterwarnings("ignore", message="The module hierarchy tracking")
        return _measure(cfg, world_size, fake, t0, captured)


def _measure(cfg: RunConfig, world_size: int, fake: bool, t0: float, captured: bool = False) -> dict:
    group = world_size if uses_fsdp(cfg, world_size) else 0
    with _fake_mode(fake), _fake_group(group), cuda_like() as packs:
        c, r = _components(cfg, world_size, captured)
        _prime_optimizer(c)
        host = _host_categories(cfg)
        if r is None:
            tracker = StepTracker(host)
            tracker.track_external(c.model, c.optimizer)
        else:
            tracker = FSDPStepTracker(c.model, c.optimizer, host)
        if c.ema is not None:
            tracker.track_ema(c.ema.shadows)
        with tracker:
            step = _instrumented(c, r, tracker)
            batches = _batches(c)  # created inside: the images count as activations
            from reca.engine.train import train_step

            train_step(step, batches)
        del batches, step
    return {"peak_device_bytes": tracker.device_peak, "categories": dict(tracker.device_snap),
            "where": tracker.where, "peak_step_host_bytes": tracker.host_peak,
            "pack_tokens": max(packs, default=None), "seconds": time.perf_counter() - t0}


def startup_host_bytes(cfg: RunConfig) -> int:
    """Rank 0's host memory for the whole model it builds on the CPU to fill every rank's shards
    (`reca.engine.fsdp.whole_copy`): every parameter and buffer in the dtype it is built in (the
    initialisers' temporaries, one tensor at a time, are not counted)."""
    from reca.models import build_model

    with torch.device("meta"):
        model = build_model(bench_config(cfg).model)
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def largest_shard_bytes(cfg: RunConfig, world_size: int) -> int:
    """The most host memory a rank's `--init-from` read holds at once (`reca.engine.shards`): its
    rows of the largest tensor (in the model's dtype), besides the buffers."""
    from reca.models import build_model

    with torch.device("meta"):
        model = build_model(bench_config(cfg).model)
    largest = max(-(-p.shape[0] // world_size) * math.prod(p.shape[1:]) * p.element_size() if p.dim()
                  else p.element_size() for p in model.parameters())
    return largest + sum(b.numel() * b.element_size() for b in model.buffers())


# --- building the step ------------------------------------------------------------------------

@contextlib.contextmanager
def _fake_mode(fake: bool):
    if not fake:
        yield None
        return
    from torch._subclasses.fake_tensor import FakeTensorMode

    # the prompts are built as real (small) tensors outside the mode and meet fake ones inside it
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, untracked_propagation():
        yield mode


@contextlib.contextmanager
def _fake_group(world_size: int):
    """torch's fake process group of `world_size` ranks (0: none), as rank 0 of it."""
    if not world_size:
        yield
        return
    import torch.distributed as dist

    if dist.is_initialized():
        raise UserError("reca bench memory runs outside torchrun (it makes its own fake process group)")
    dist.init_process_group("fake", store=dist.HashStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _components(cfg: RunConfig, world_size: int, captured: bool = False):
    """(`build.Components` on the CPU, as the CUDA run builds them; the fake rank or None)."""
    from reca.engine.build import Components
    from reca.engine.compile import apply_checkpointing, find_blocks, set_attention
    from reca.engine.ema import EMA
    from reca.engine.objectives import objectives_of
    from reca.engine.optim import build_optimizer, build_scheduler
    from reca.engine.train import train_step
    from reca.kernels import get_ops
    from reca.models import build_model

    device, ops = torch.device("cpu"), get_ops("torch")
    r = _Rank(0, world_size) if uses_fsdp(cfg, world_size) else None
    fake = torch._guards.active_fake_mode() is not None
    try:  # on fake tensors: built on meta outside the mode (initialisers may read values back), then given storage
        with torch.device("meta" if r is not None or fake else device), _real():
            model = build_model(cfg.model, ops)
    except ValueError as e:
        raise UserError(f"model config: {e}") from None
    set_attention(model, cfg.train.attention)
    for _, block in find_blocks(model):
        block.forward = in_recompute(block.forward)
    apply_checkpointing(model, cfg.train.checkpoint_every, device_type="cuda", captured=captured)
    if r is not None:
        from reca.engine.fsdp import fully_shard_model

        with _real():  # the device mesh reads its rank table back: a real tensor
            fully_shard_model(model, cfg, r, device, as_device="cuda")
        model.to_empty(device=device)
    elif fake:
        _storage_for(model, device)
    model.train()
    objectives = objectives_of(cfg, model)
    builders = {o.name: o.builder(model, cfg) for o in objectives}
    try:
        optimizer = build_optimizer(model, cfg.optim, device, exempt=tuple(model.no_weight_decay_modules()))
    except ValueError as e:
        raise UserError(str(e)) from None
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    generator = torch.Generator(device).manual_seed(cfg.train.seed + 1)
    params = [p for p in model.parameters() if p.requires_grad]
    ema = EMA(model, cfg.train.ema, on_host=cfg.train.ema_on_host) if cfg.train.ema else None
    c = Components(cfg, device, model, ops, objectives, {}, builders, optimizer, scheduler, generator, params,
                   train_step, ema)
    return c, r


def _storage_for(model: torch.nn.Module, device: torch.device) -> None:
    """`to_empty` that keeps tied parameters tied (meta -> fake swaps each module's parameter
    for a new one: a tied LM head would count twice)."""
    new, old = {}, []
    for mod in model.modules():
        for name, p in mod._parameters.items():
            if p is not None:
                if id(p) not in new:
                    old.append(p)  # alive until the end: its id stays its own
                    new[id(p)] = torch.nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
                mod._parameters[name] = new[id(p)]
        for name, b in mod._buffers.items():
            if b is not None:
                mod._buffers[name] = torch.empty_like(b, device=device)


def _real():
    """Outside the fake mode, if one is active."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    return unset_fake_temporarily()


def _host_categories(cfg: RunConfig) -> frozenset:
    host = set()
    if cfg.distributed.cpu_offload:  # FSDP2's CPUOffloadPolicy: shards, their gradients, AdamW state
        host |= {"parameters", "gradients", "optimizer", "ema"}  # the EMA clones the (host) shards
    if cfg.train.ema_on_host:
        host.add("ema")
    return frozenset(host)


@torch.no_grad()
def _prime_optimizer(c) -> None:
    """AdamW's moments exist before the measured step (created lazily by its first step)."""
    for p in c.params:
        p.grad = torch.zeros_like(p)
    c.optimizer.step()
    c.optimizer.zero_grad(set_to_none=True)


def _instrumented(c, r, tracker):
    """The components as the step sees them: the model call names the micro-batch for the
    tracker (and, under FSDP, reduces gradients on the last one only, as `apply_strategy` does)."""
    from reca.engine.distributed import apply_strategy

    step = apply_strategy(c, r) if r is not None else c
    inner, accum, calls = step.model, c.cfg.optim.grad_accum, [0]

    def call(*args, **kwargs):
        calls[0] += 1
        tracker.enter_phase(f"micro-batch {calls[0]} of {accum}")
        tracker.reset_mod_stats()  # the tracker refuses a second call of the root otherwise
        return inner(*args, **kwargs)

    if c.ema is not None:
        update = c.ema.update

        @functools.wraps(update)
        def ema_update():
            tracker.enter_phase("the EMA update")
            update()

        c.ema.update = ema_update
    return replace(step, model=call)


def _batches(c) -> list:
    """The step's micro-batches: images of the model's view sizes (fake under `mode`), prompts and
    captions built as the loader's are (real: small integer tensors)."""
    from reca.engine.data.loader import ImageBatch
    from reca.engine.train import MicroBatch

    cfg = c.cfg
    b, accum, cycle = cfg.data.batch_size, cfg.optim.grad_accum, cfg.mix.cycle
    out = []
    for i in range(accum):
        name = cycle[i % len(cycle)]
        objective = next(o for o in c.objectives if o.name == name)
        views = objective.views(c.model)
        und = torch.rand(b, 3, views.und_size, views.und_size) * 2 - 1
        gen = und if views.same_pixels(cfg.data.und_downscale) else \
            torch.rand(b, 3, views.gen_size, views.gen_size) * 2 - 1
        with _real():
            positions = torch.arange(i * b, (i + 1) * b)
        images = ImageBatch(und, gen, [str(p) for p in range(b)], positions, [CAPTION] * b)
        with _real():
            batch = objective.batch(c.builders[name], cfg, images, c.device)
        out.append(MicroBatch(name, batch))
    return out


def categories_sum(categories: dict[str, int]) -> int:
    return sum(categories[k] for k in CATEGORIES)
