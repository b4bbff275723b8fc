"""Scale-out: the memory projection of `reca info --world-size`, and (CPU, gloo, 2 processes)
DDP and FSDP2 runs under torchrun against one process at the same global batch, distributed
checkpoints resumed at another world size."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

from reca.engine.bench.info import describe
from reca.engine.bench.memory import USABLE, memory_per_rank
from reca.engine.presets import preset

GIB = 2**30


def reca(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "reca.engine", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


# --- memory projection ----------------------------------------------------------------------------

class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 24), nn.Linear(24, 8)


class _Toy(nn.Module):
    """Two trainable blocks, one frozen, a frozen root table: every term computable by hand."""

    capabilities = frozenset()
    num_visual_tokens, latent_grid = 4, 3

    def __init__(self):
        super().__init__()
        self.blocks_ = nn.ModuleList([_Block(), _Block()])
        self.frozen = nn.ModuleList([_Block(), _Block()])
        self.table = nn.Embedding(10, 8)
        for p in [*self.frozen.parameters(), *self.table.parameters()]:
            p.requires_grad_(False)


def _cfg(batch: int, every: int):
    cfg = preset("tiny")
    return replace(cfg, data=replace(cfg.data, batch_size=batch), sample=replace(cfg.sample, max_text_tokens=5),
                   train=replace(cfg.train, checkpoint_every=every))


def test_memory_terms_by_hand():
    model = _Toy()
    block = 8 * 24 + 24 + 24 * 8 + 8  # 424 parameters
    tokens = 4 + 5 + 3**2  # visual + instruction + generation tokens (no flop_plan)
    for every, act in ((0, 2 * 2 * 3 * tokens * (8 + 24 + 24 + 8)),  # both blocks save their Linears' ins/outs
                       (1, 2 * 2 * 3 * tokens * 8 + 2 * 3 * tokens * 64)):  # inputs only + one recompute
        rows = memory_per_rank(model, _cfg(3, every), (1, 4))["rows"]
        for r in rows:
            n = r["world_size"]
            assert r["parameters"] == pytest.approx(4 * (4 * block + 80) / n)
            assert r["gradients"] == pytest.approx(4 * 2 * block / n)
            assert r["optimizer"] == pytest.approx(8 * 2 * block / n)
            assert r["gathered"] == 2 * (80 + 2 * block)  # the root's table and two blocks, bf16
            assert r["activations"] == act
            assert r["total"] == pytest.approx(sum(r[k] for k in ("parameters", "gradients", "optimizer",
                                                                 "gathered", "activations")))


def test_flow_7b_fits_an_80gb_card_at_8_ranks_not_at_1():
    report = describe(preset("flow-7b"), 8)
    rows = {r["world_size"]: r for r in report["memory"]["rows"]}
    assert sorted(rows) == [1, 2, 4, 8]
    trainable = report["trainable"]
    assert rows[8]["optimizer"] == pytest.approx(8 * trainable / 8)  # fp32 moments, sharded 8 ways
    assert rows[8]["fits"] and rows[8]["total"] <= USABLE * 80 * GIB
    assert not rows[1]["fits"]  # 7.6B trainable: weights, gradients and AdamW alone pass 80 GiB
    assert rows[1]["parameters"] + rows[1]["gradients"] + rows[1]["optimizer"] > 80 * GIB
    # checkpointing every block is what keeps the activations small
    off = memory_per_rank_of("flow-7b", checkpoint_every=0)
    assert off["rows"][0]["activations"] > 3 * rows[1]["activations"]


def memory_per_rank_of(name: str, **train):
    from reca.models import build_model

    cfg = preset(name)
    cfg = replace(cfg, train=replace(cfg.train, **train))
    with torch.device("meta"):
        model = build_model(cfg.model)
    return memory_per_rank(model, cfg, (1,))


@pytest.mark.parametrize("name", ["flow-7b", "bagel-7b-mot"])
def test_info_world_size_prints_the_projection(name):
    proc = reca("info", "--preset", name, "--world-size", "8")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    row8 = next(line for line in lines if line.strip().startswith("8 ") and "<- --world-size" in line)
    assert row8.split()[7] == "yes"
    assert any(line.strip().startswith("fits an 80 GiB card from") for line in lines)
    report = json.loads(reca("info", "--preset", name, "--world-size", "8", "--json").stdout)
    assert [r["world_size"] for r in report["memory"]["rows"]] == [1, 2, 4, 8]


def test_info_world_size_refuses_zero():
    proc = reca("info", "--world-size", "0")
    assert proc.returncode == 2 and proc.stderr.strip() == "reca: error: --world-size must be at least 1"


# --- torchrun: 2 processes, gloo, CPU ------------------------------------------------------------

SETS = ["data.batch_size=2", "output.log_every=1", "optim.schedule=constant", "train.device=cpu"]
TOL = 1e-5  # relative: fp32 throughout; the ranks' gradients are summed in another order than here


def torchrun(nproc: int, *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", "0",
           "-m", "reca.engine", "train", "--quiet", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def simulated_ranks(sets: list[str], world: int, steps: int) -> list[float]:
    """The same global batch in one process, rank by rank: each rank's loader share and its own
    noise stream, gradients of the mean over the global batch, one clipped AdamW step."""
    from reca.engine.build import build
    from reca.engine.config import apply_overrides
    from reca.engine.train import next_batches

    cfg = apply_overrides(preset("tiny"), sets)
    cs = [build(cfg, rank=r, world_size=world) for r in range(world)]
    for r, c in enumerate(cs):
        c.generator.manual_seed(cfg.train.seed + 1 + (r << 32))
    out = []
    for _ in range(steps):
        total = 0.0
        for c in cs:
            batches = next_batches(c)
            for b in batches:
                loss = c.model(b.batch, b.objective, generator=c.generator).loss / (len(batches) * world)
                loss.backward()
                total += loss.item()
        lead = cs[0]
        for p, *others in zip(lead.params, *(c.params for c in cs[1:])):
            p.grad += sum(o.grad for o in others)
        torch.nn.utils.clip_grad_norm_(lead.params, cfg.optim.clip_grad)
        lead.optimizer.step()
        for c in cs:
            c.optimizer.zero_grad()
            c.scheduler.step()
        with torch.no_grad():
            for p, *others in zip(lead.params, *(c.params for c in cs[1:])):
                for o in others:
                    o.copy_(p)
        out.append(total)
    for c in cs:
        c.close()
    return out


@pytest.fixture(scope="module")
def reference_2x2():
    return simulated_ranks(SETS, 2, 4)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_at_the_global_batch(tmp_path, strategy, reference_2x2):
    run = tmp_path / strategy
    torchrun(2, "--preset", "tiny", "--steps", "4", "--out", str(run), *(f"--set={s}" for s in SETS),
             f"--set=distributed.strategy={strategy}")
    got = losses(run)
    assert got == pytest.approx(reference_2x2, rel=TOL)
    assert sorted(p.name for p in run.glob("step-*")) == ["step-4"]
