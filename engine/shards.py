"""`train.init_from` under FSDP without a whole copy of the model anywhere: every rank reads its
own shards straight from the release's files (`distributed.init_from_shards`, on by default).

    every rank   the sharded model (meta build -> `fully_shard` -> `to_empty`, `reca.engine.fsdp`)
                 1. the family's loader run on a meta build inside `loading.mapped`: its checks
                    and its report as in a one-process run, every file tensor recorded by the
                    parameter it fills (`Mapped.sink`), nothing read
                 2. a second build on the CPU, seeded from `train.seed`, whose parameters are
                    meta except those no file supplies (they are drawn, as the family draws
                    them) and whose buffers are real; the loader again, which copies into the
                    real ones (a family that fills part of a tensor itself, Show-o's embedding
                    rows, does it here)
                 3. each parameter's shard: the rows this rank holds, read from the file
                    (`Mapped.read`) or taken from the drawn tensor, copied onto the device;
                    buffers whole (FSDP does not shard them)

Rank 0's host holds the drawn parameters, the buffers and one shard of one tensor at a time,
instead of the whole model (54.6 GiB for bagel-7b-mot, ~4 minutes of one-threaded random init
at every start and elastic restart). The tensors the files hold are those a whole copy would
hold, bit for bit; the drawn ones are the family's initialisation from `train.seed` drawn in a
build where no other parameter draws (a one-process run's differ), the same at every world size.
The frozen weights' fingerprint is summed shard by shard and all-reduced: the value
`guard.frozen_fingerprint` gives on the whole model.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from reca.engine.config import RunConfig
from reca.engine.errors import UserError


def streams(cfg: RunConfig, from_single: bool) -> bool:
    """Whether this job's ranks read their shards from `train.init_from` (`from_single`: it
    resumes a one-process checkpoint.pt, which goes through rank 0's whole copy)."""
    return (cfg.distributed.strategy == "fsdp" and bool(cfg.train.init_from)
            and cfg.distributed.init_from_shards and not from_single)


def fill_from_files(model: nn.Module, cfg: RunConfig) -> str:
    """Every rank: the sharded `model`'s parameters and buffers from `train.init_from` (see the
    module) -> the load's report. A refusal on any rank is raised on every rank."""
    error, report = None, ""
    try:
        report = _fill(model, cfg)
    except UserError as e:
        error = str(e)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise UserError(first)
    return report


def _fill(model: nn.Module, cfg: RunConfig) -> str:
    from reca.engine.build import load_init_from
    from reca.models import build_model
    from reca.models.loading import mapped

    with _registrations() as order, torch.device("meta"):
        probe = build_model(cfg.model)
    with mapped(probe) as m:
        load_init_from(probe, cfg)  # the refusals, and what the files supply
    names: dict[int, set[str]] = {}
    for n, p in probe.named_parameters(remove_duplicate=False):  # a tied weight: all its names
        names.setdefault(id(p), set()).add(n)
    # Parameters are told apart by the order the build registers them in
    keep = [bool(names.get(id(p))) and not (names[id(p)] & m.sink.keys()) for p in order]
    with torch.random.fork_rng(devices=[]), _registrations(keep):
        torch.manual_seed(cfg.train.seed)
        with torch.device("cpu"):
            source = build_model(cfg.model)  # only the parameters no file holds are drawn
    with mapped(source) as m:
        report = load_init_from(source, cfg)
        _copy_shards(model, source, m)
    return report


@contextlib.contextmanager
def _registrations(keep: list[bool] | None = None) -> Iterator[list]:
    """Inside, `nn.Module.register_parameter` records each parameter registered, in order; with
    `keep`, the k-th distinct one stays on the CPU if keep[k], else moves to the meta device (as
    accelerate's init_empty_weights does: the initialisers then run on nothing)."""
    seen: list = []
    moved: dict[int, nn.Parameter] = {}
    original = nn.Module.register_parameter

    def register(self, name, param):
        if param is not None and id(param) not in moved:
            k = len(seen)
            seen.append(param)
            new = param
            if keep is not None and not (k < len(keep) and keep[k]):
                new = type(param)(param.to("meta"), requires_grad=param.requires_grad)
            moved[id(param)] = moved[id(new)] = new  # registered again (tied weights): the same one
        original(self, name, moved.get(id(param), param) if param is not None else param)

    nn.Module.register_parameter = register
    try:
        yield seen
    finally:
        nn.Module.register_parameter = original


@torch.no_grad()
def _copy_shards(model: nn.Module, source: nn.Module, m) -> None:
    """Each of `model`'s parameters (DTensor shards) and buffers from the file (`m.sink`) or
    from `source`'s real tensors."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    theirs = {**dict(source.named_parameters(remove_duplicate=False)), **dict(source.named_buffers())}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        value = m.sink.get(name)
        if value is None:
            value = theirs.get(name)
            if value is None or value.is_meta:
                raise RuntimeError(f"{name}: neither a weight file nor the initialisation supplied it")
        if isinstance(t, DTensor):
            shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
            index = tuple(slice(o, o + n) for o, n in zip(offset, shape))
            t.to_local().copy_(m.read(value, index))
        else:
            t.copy_(m.read(value))


@torch.no_grad()
def sharded_fingerprint(model: nn.Module) -> dict[str, str]:
    """`guard.frozen_fingerprint` of the sharded model, every rank calling it: each rank sums its
    own rows at their positions in the whole tensor, and the sums are all-reduced over the
    ranks that shard it (exact: integer sums)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from reca.engine.checkpoint.guard import fingerprint_line, word_sums

    names, sums = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        if isinstance(p, DTensor):
            if any(pl.is_shard() and pl.dim != 0 for pl in p.placements):
                raise RuntimeError(f"{name}: sharded along dim != 0, which the fingerprint's positions do not follow")
            local = p.to_local()
            _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            start = offset[0] * math.prod(p.shape[1:]) if local.numel() else 0
            total = word_sums(local, start)
            group = p.device_mesh.get_group("shard") if "shard" in (p.device_mesh.mesh_dim_names or ()) else None
            dist.all_reduce(total, group=group)
        else:
            total = word_sums(p.detach(), 0)
        names.append((name, p))
        sums.append(total)
    values = torch.stack(sums).cpu().tolist() if sums else []
    return {name: fingerprint_line(p, a, b) for (name, p), (a, b) in zip(names, values)}
