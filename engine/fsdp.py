"""FSDP2 for a torchrun job, with the model never whole on any rank's device.

    every rank   build on the meta device (no memory, no init) -> `speed_up` (checkpointing,
                 compile) -> `fully_shard` per block of `find_blocks`, then the root ->
                 `to_empty` (storage for its own shards only) -> filled from rank 0, or with
                 `train.init_from` from the weight files, each rank reading its own shards
                 (`reca.engine.shards`; `distributed.init_from_shards`, on by default)
    rank 0       without that, also builds the whole model on the CPU as a one-process run does
                 (`seeded_model`: the seed's weights, `train.init_from`; a resumed one-process
                 checkpoint's trainable weights go into it too) and streams it one tensor at a
                 time: `set_model_state_dict(..., broadcast_from_rank0=True)` sends each whole
                 tensor and every rank keeps its shard. The buffers a state dict leaves out
                 (rotary frequencies, position ids) are broadcast whole, as FSDP keeps them.

Peak memory: on each device its shards and one whole tensor in flight; on rank 0's host the one
copy a one-process run also builds, dropped once the shards are filled. The weights equal a
one-process CPU run's bit for bit at any world size (random ones drawn on a GPU differ:
`build.seeded_model`), so runs reshard across world sizes, and the frozen weights' fingerprint
is taken on that copy.

Mixed precision: parameters cast to bf16 for compute on CUDA (fp32 on CPU or with
train.precision=fp32), gradients reduced in fp32; `distributed.cpu_offload` keeps shards,
gradients and AdamW state on the host (`CPUOffloadPolicy`); `distributed.replicate` > 1 shards
within groups of N / replicate ranks and replicates across them (HSDP, a 2-D mesh).
"""
from __future__ import annotations

from typing import Callable, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from reca.engine.config import RunConfig
from reca.engine.errors import UserError

T = TypeVar("T")


def on_rank0(fn: Callable[[], T], r) -> T | None:
    """`fn()` on rank 0 only (None elsewhere). A `UserError` there is raised on every rank, so
    the job ends at once with the same one line instead of leaving the others in a collective."""
    out, msg = None, [None]
    if r.main:
        try:
            out = fn()
        except UserError as e:
            msg = [str(e)]
    dist.broadcast_object_list(msg, src=0)
    if msg[0] is not None:
        raise UserError(msg[0])
    return out


def whole_copy(cfg: RunConfig) -> nn.Module:
    """Rank 0's whole model on the CPU: the one-process run's weights (`seeded_model`)."""
    from reca.engine.build import seeded_model
    from reca.kernels import get_ops

    return seeded_model(cfg, get_ops("torch"), torch.device("cpu"))  # a source of weights: never run


def sharded_model(cfg: RunConfig, ops, device: torch.device, *, r, whole: nn.Module | None,
                  stream: bool = False) -> nn.Module:
    """`build`'s `place` under FSDP: the model built on meta, sharded, and filled from `whole`
    (rank 0's copy; None on the other ranks), or with `stream` from `train.init_from`'s files by
    every rank (`reca.engine.shards`). See the module."""
    from reca.engine.build import speed_up
    from reca.models import build_model

    with torch.device("meta"):
        try:
            model = build_model(cfg.model, ops)
        except ValueError as e:  # rank 0 met it first, building its copy
            raise UserError(f"model config: {e}") from None
    speed_up(model, cfg)
    fully_shard_model(model, cfg, r, device)
    if cfg.distributed.cpu_offload:
        # shards on the host; buffers are not FSDP's to move, and the forward runs on the GPU
        # (torchtitan's buffer_device)
        model.to_empty(device=torch.device("cpu"))
        for mod in model.modules():
            for name, buf in mod._buffers.items():
                if buf is not None:
                    mod._buffers[name] = buf.to(device)
    else:
        model.to_empty(device=device)
    if stream:
        from reca.engine.shards import fill_from_files

        model.init_from_report = fill_from_files(model, cfg)
        _no_meta_left(model)
    else:
        fill_from_rank0(model, whole, r)
    return model


@torch.no_grad()
def fill_from_rank0(model: nn.Module, whole: nn.Module | None, r) -> None:
    """Every rank: the sharded `model`'s parameters and buffers from rank 0's `whole` copy."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state = whole.state_dict() if r.main else {}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    # Buffers outside the state dict are whole on every rank (FSDP does not shard buffers).
    kept = set(model.state_dict())
    mine = {n: b for n, b in model.named_buffers() if n not in kept}
    theirs = dict(whole.named_buffers()) if r.main else {}
    for name, buf in sorted(mine.items()):
        if r.main:
            buf.copy_(theirs[name])
        dist.broadcast(buf, src=0)
    _no_meta_left(model)


def _no_meta_left(model: nn.Module) -> None:
    left = [f"{m}.{k}" for m, mod in model.named_modules() for k, v in vars(mod).items()
            if isinstance(v, torch.Tensor) and v.is_meta]
    if left:  # a tensor held as a plain attribute: no FSDP API sees it; the family must register it
        raise RuntimeError(f"tensors left on the meta device after sharding (register them as buffers): {left[:3]}")


def fully_shard_model(model: nn.Module, cfg: RunConfig, r, device: torch.device, *,
                      as_device: str | None = None) -> None:
    """`fully_shard` on every block of `find_blocks`, then the root (see the module). `as_device`:
    the mixed precision and offload of that device type on `device` (`reca bench memory` shards
    fake CPU tensors as a CUDA job does; pinning needs an accelerator, and moves no bytes)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    from reca.engine.compile import find_blocks

    kind = as_device or device.type
    if cfg.distributed.cpu_offload and kind != "cuda":  # FSDP2's offload moves shards to an accelerator
        raise UserError("distributed.cpu_offload needs CUDA devices (on the CPU every shard is in host memory already)")
    rep = cfg.distributed.replicate
    if r.world_size % rep:
        raise UserError(f"distributed.replicate={rep} does not divide the {r.world_size} ranks")
    if rep > 1:
        mesh = init_device_mesh(device.type, (rep, r.world_size // rep), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (r.world_size,), mesh_dim_names=("shard",))
    bf16 = kind == "cuda" and cfg.train.precision != "fp32"
    kw = {"mesh": mesh, "mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                                          reduce_dtype=torch.float32)}
    if cfg.distributed.cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    for _, block in find_blocks(model):
        if not _shares_outside(model, block):  # a tensor tied across units: the root's unit holds it once
            fully_shard(block, **kw)
    fully_shard(model, **kw)


def _shares_outside(model: nn.Module, block: nn.Module) -> bool:
    """Whether a parameter of `block` is also a parameter of a module outside it (tied weights:
    a head sharing an embedding table that the block holds). Sharded with the block, the outside
    module would hold an untied copy, or a resharded tensor by the time it runs."""
    inside = {id(m) for m in block.modules()}
    mine = {id(p) for p in block.parameters()}
    return any(id(p) in mine for m in model.modules() if id(m) not in inside for p in m._parameters.values()
               if p is not None)


def set_gradient_sync(model: nn.Module, on: bool) -> None:
    """`set_requires_gradient_sync(on)` on the sharded model, but never off for a block whose
    parameters are all frozen: FSDP2 (torch 2.13) fails in the backward of an accumulated
    micro-batch on a block that has never run a forward, such as a VAE decoder in training
    ("'FSDPParam' object has no attribute '_unsharded_param'"), while its reducing path skips
    such a block; a frozen block has no gradient to reduce either way."""
    from torch.distributed.fsdp import FSDPModule

    model.set_requires_gradient_sync(on)
    if not on:
        for m in model.modules():
            if isinstance(m, FSDPModule) and m is not model and not any(p.requires_grad for p in m.parameters()):
                m.set_requires_gradient_sync(True, recurse=False)
