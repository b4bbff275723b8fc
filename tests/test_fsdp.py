"""FSDP2 as `reca.engine.fsdp` builds it (CPU, gloo): the model is built on the meta device on
every rank and filled from rank 0's CPU copy, so no rank but 0 ever builds it whole, and every
family's sharded weights and buffers gather to the one-process model bit for bit. HSDP
(`distributed.replicate`) on 4 ranks matches one process at the global batch and resumes at 2.

Run by torchrun (`__main__` below), this file is also the worker of the meta-build test: one
launch builds every family, so the interpreter and torch are imported once."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from reca.engine.presets import preset

FAMILIES = ("tiny", "harmon-tiny", "bagel-tiny", "openuni-tiny", "showo-tiny")


def _torchrun(n: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--standalone", *args]


def _run_ok(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _cpu(name: str):
    cfg = preset(name)
    return replace(cfg, train=replace(cfg.train, device="cpu"))


def _worker(out: Path) -> None:
    """Each rank: every family built by `build_on_ranks`' FSDP placement; rank 0 writes what it
    gathered, every rank which devices its model builds ran on and the share it holds."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    import reca.engine.build as build
    import reca.models as models
    from reca.engine.distributed import init_process_group, whole_on_rank0
    from reca.engine.fsdp import sharded_model
    from reca.kernels import get_ops

    r, device = init_process_group()
    calls: list[str] = []
    real = models.build_model

    def spy(*args, **kwargs):
        calls.append(str(torch.get_default_device()))
        return real(*args, **kwargs)

    build.build_model = models.build_model = spy  # seeded_model's name and sharded_model's import
    report = {}
    for name in FAMILIES:
        cfg, calls[:] = _cpu(name), []
        whole = whole_on_rank0(cfg, r)
        model = sharded_model(cfg, get_ops("torch"), device, r=r, whole=whole)
        local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())
        total = sum(p.numel() for p in model.parameters())  # a DTensor's numel is the global one
        state = {n: (t.full_tensor() if isinstance(t, DTensor) else t) for n, t in model.state_dict().items()}
        buffers = {n: b for n, b in model.named_buffers()}
        report[name] = {"calls": list(calls), "local": local, "total": total,
                        "meta_left": [n for n, t in {**state, **buffers}.items() if t.is_meta]}
        torch.save({"state": state, "buffers": buffers}, out / f"{name}-rank{r.rank}.pt")  # buffers: whole on each
        del whole, model
    (out / f"rank{r.rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def meta_builds(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("meta")
    _run_ok(_torchrun(2, __file__, str(out)))
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_only_rank0_builds_the_whole_model_and_each_rank_keeps_half(meta_builds, name):
    """Rank 1 builds the model once, on the meta device (no weights); rank 0 builds its CPU copy
    and the meta model. After sharding each rank holds about half of every parameter."""
    ranks = [json.loads((meta_builds / f"rank{i}.json").read_text())[name] for i in range(2)]
    assert ranks[0]["calls"] == ["cpu", "meta"]
    assert ranks[1]["calls"] == ["meta"]
    for rank in ranks:
        assert rank["meta_left"] == []
        # dim-0 shards: a parameter of odd first dimension leaves one row more on rank 0
        assert 0.4 * rank["total"] < rank["local"] < 0.6 * rank["total"]
    assert ranks[0]["local"] + ranks[1]["local"] == ranks[0]["total"]


@pytest.mark.parametrize("name", FAMILIES)
def test_sharded_weights_gather_to_the_one_process_model_bit_for_bit(meta_builds, name):
    """Every tensor of the state dict (trainable, frozen, persistent buffers) and every buffer
    outside it (rotary frequencies, position ids), gathered from the shards, equals the model a
    one-process run builds (`seeded_model`) exactly."""
    from reca.engine.build import seeded_model
    from reca.kernels import get_ops

    want = seeded_model(_cpu(name), get_ops("torch"), torch.device("cpu"))
    state, buffers = want.state_dict(), dict(want.named_buffers())
    assert set(buffers) - set(state), "every family has a buffer outside its state dict: the broadcast is tested"
    for rank in range(2):
        got = torch.load(meta_builds / f"{name}-rank{rank}.pt", weights_only=True)
        assert set(got["state"]) == set(state) and set(got["buffers"]) == set(buffers)
        for n, t in {**state, **buffers}.items():
            other = got["state"].get(n, got["buffers"].get(n))
            assert other.dtype == t.dtype and torch.equal(other, t), (rank, n)


def test_cpu_offload_on_the_cpu_is_one_line(tmp_path):
    """distributed.cpu_offload moves shards to an accelerator and back: on a CPU-only job it is
    refused before any shard is made, in one line (not FSDP's 'Cannot access accelerator')."""
    from reca.engine.config import apply_overrides
    from reca.engine.distributed import Rank
    from reca.engine.errors import UserError
    from reca.engine.fsdp import fully_shard_model

    cfg = apply_overrides(_cpu("tiny"), ["distributed.cpu_offload=true"])
    with pytest.raises(UserError, match="cpu_offload needs CUDA"):
        fully_shard_model(torch.nn.Linear(2, 2), cfg, Rank(0, 2, 0), torch.device("cpu"))


def test_hsdp_on_four_ranks_matches_one_process_and_resumes_on_two(tmp_path):
    """4 ranks as 2 replicas x 2 shards (HSDP): 6 steps match one process at the global batch
    (the ranks simulated, as tests/test_distributed.py does) within its TOL; the step-3/ folder
    resumed by 2 ranks of plain FSDP (another mesh, another world size) continues as one process
    that switches from 4 ranks to 2 at step 3."""
    from test_distributed import SETS, TOL, losses, rows, simulated

    steps = 6
    sets = [s for s in SETS if not s.startswith(("train.steps", "output.ckpt_every"))]
    sets += [f"train.steps={steps}", "output.ckpt_every=3"]
    run = tmp_path / "run"
    args = ["-m", "reca.engine", "train", "--quiet", "--preset", "tiny", "--out", str(run), *(f"--set={s}" for s in sets)]
    _run_ok(_torchrun(4, *args, "--set=distributed.replicate=2"))
    assert [row["step"] for row in rows(run)] == list(range(1, steps + 1))
    assert losses(run) == pytest.approx(simulated("tiny", [4] * steps), rel=TOL)

    shutil.rmtree(run / "step-6")
    _run_ok(_torchrun(2, "-m", "reca.engine", "train", "--quiet", "--resume", str(run)))
    assert [row["step"] for row in rows(run)] == list(range(1, steps + 1))
    assert losses(run)[3:] == pytest.approx(simulated("tiny", [4] * 3 + [2] * 3)[3:], rel=TOL)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
