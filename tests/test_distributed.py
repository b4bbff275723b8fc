"""Scale-out: the memory projection of `reca info --world-size`, and (CPU, gloo) 2-process DDP
and FSDP2 runs under torchrun against one process at the same global batch, checkpoints resumed
at another world size (2 -> 1, 1 -> 2), and a rank killed under `torchrun --max-restarts 1`.

Run by torchrun (`__main__` below), this file is also the worker of the parity test: one launch
trains every (preset, strategy) pair, so the interpreter and torch are imported once."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from reca.engine.bench.info import describe
from reca.engine.bench.memory import USABLE, memory_per_rank
from reca.engine.presets import preset

GIB = 2**30


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
        report = memory_per_rank(model, _cfg(3, every), (1, 4))
        assert report["rank0_host_bytes"] == 4 * (4 * block + 80)  # the whole fp32 model: rank 0's build copy
        for r in report["rows"]:
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
def test_info_world_size_prints_the_projection(name, capsys):
    """`reca info --preset NAME --world-size 8` (`cli.main`, in this process: importing torch
    again in a subprocess costs more than the projection): the 8-rank row fits an 80 GiB card."""
    from reca.engine.cli import main

    main(["info", "--preset", name, "--world-size", "8"])
    lines = capsys.readouterr().out.splitlines()
    row8 = next(line for line in lines if line.strip().startswith("8 ") and "<- --world-size" in line)
    assert row8.split()[7] == "yes"
    assert any(line.strip().startswith("fits an 80 GiB card from") for line in lines)
    assert any(line.strip().startswith("rank 0's host holds the whole model once at the start") for line in lines)
    main(["info", "--preset", name, "--world-size", "8", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert [r["world_size"] for r in report["memory"]["rows"]] == [1, 2, 4, 8]


def test_info_world_size_refuses_zero(capsys):
    from reca.engine.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["info", "--world-size", "0"])
    assert stop.value.code == 2 and capsys.readouterr().err.strip() == "reca: error: --world-size must be at least 1"


# --- torchrun: 2 processes, gloo, CPU ------------------------------------------------------------

STEPS, HALF = 20, 10
SETS = ["data.batch_size=2", "output.log_every=1", "optim.schedule=constant", "train.device=cpu",
        f"train.steps={STEPS}", f"output.ckpt_every={HALF}", "output.tensorboard=false", "output.preview_images=0"]
PAIRS = [(name, strategy) for name in ("tiny", "harmon-tiny") for strategy in ("ddp", "fsdp")] + [("bagel-tiny", "fsdp")]
# Relative, per step's loss. fp32 throughout; what differs from the reference is only the order
# of floating-point sums (gloo's all-reduce of the two ranks' gradients and losses, FSDP's
# reduce-scatter, the gradient norm over shards), about 1e-7 relative per step. AdamW divides by
# sqrt(v) and so carries such differences forward rather than damping them; over 20 steps they
# stay below 1e-5, while any real slip (a micro-batch read twice, a lost AdamW moment, another
# noise draw, a wrong position after resume) moves the loss by 1e-3 or more.
TOL = 1e-5


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(*args: str, restarts: int = 0) -> list[str]:
    """`torchrun --standalone` (a free port of its own: `--master-port 0` hangs the workers)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
            "--max-restarts", str(restarts), *args]


def run_ok(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def rows(run: Path) -> list[dict]:
    """metrics.jsonl's loop rows as written (not merged: a step written twice would show)."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if "loss" in row]


def losses(run: Path) -> list[float]:
    return [row["loss"] for row in rows(run)]


def simulated(name: str, worlds: list[int]) -> list[float]:
    return simulate(name, worlds)[0]


def simulate(name: str, worlds: list[int], sets: list[str] = SETS) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The losses of `len(worlds)` steps in one process, step s at world size worlds[s], rank by
    rank (the run's config: the preset with `sets`): each rank's loader share and noise stream,
    gradients of the mean over the global batch, one clipped AdamW step. At a change of world size the state moves as a checkpoint
    moves it (`checkpoint.dcp`): weights, AdamW, EMA, schedule, rank 0's data position, and every
    rank's noise reseeded from (seed, rank, step). -> (losses, the EMA's shadows at the end:
    empty without `train.ema`)."""
    from reca.engine.build import build
    from reca.engine.config import apply_overrides
    from reca.engine.train import next_batches

    cfg = apply_overrides(preset(name), sets)
    cs, out = [], []
    for step, world in enumerate(worlds):
        if len(cs) != world:
            new = [build(cfg, rank=r, world_size=world) for r in range(world)]
            for r, c in enumerate(new):
                c.generator.manual_seed(cfg.train.seed + 1 + (r << 32) + (step << 16 if cs else 0))
                if cs:
                    c.model.load_state_dict(cs[0].model.state_dict())
                    c.optimizer.load_state_dict(cs[0].optimizer.state_dict())
                    c.scheduler.load_state_dict(cs[0].scheduler.state_dict())
                    c.load_data_state(cs[0].data_state())
                    if c.ema is not None:  # the shadows move with the checkpoint too
                        c.ema.load_state_dict(cs[0].ema.state_dict())
            for c in cs:
                c.close()
            cs = new
        total = 0.0
        for c in cs:
            batches = next_batches(c)
            for b in batches:
                loss = c.model(b.batch, b.objective, generator=c.generator).loss / (len(batches) * world)
                loss.backward()
                total += loss.item()
        lead = cs[0]
        for p, *others in zip(lead.params, *(c.params for c in cs[1:])):
            if p.grad is not None:  # None: a parameter no step reaches (Harmon's MAR class embedding)
                p.grad += sum(o.grad for o in others)
        torch.nn.utils.clip_grad_norm_(lead.params, cfg.optim.clip_grad)
        lead.optimizer.step()
        if lead.ema is not None:
            lead.ema.update()
        for c in cs:
            c.optimizer.zero_grad()
            with warnings.catch_warnings():  # the other ranks' optimizers never step: their schedules only count
                warnings.simplefilter("ignore", UserWarning)
                c.scheduler.step()
        with torch.no_grad():
            for p, *others in zip(lead.params, *(c.params for c in cs[1:])):
                for o in others:
                    o.copy_(p)
        out.append(total)
    ema = dict(zip(cs[0].ema.names, cs[0].ema.shadows)) if cs[0].ema is not None else {}
    for c in cs:
        c.close()
    return out, ema


@pytest.fixture(scope="module")
def parity_runs(tmp_path_factory) -> Path:
    """One torchrun launch of this file: 20 steps of every (preset, strategy) in PAIRS, and of
    the README's adapter (`--preset my_adapter:preset`, fsdp) into ROOT/readme-fsdp."""
    from readme_example import write_example

    root = tmp_path_factory.mktemp("parity")
    write_example(root / "project")
    run_ok(torchrun(__file__, str(root)))
    return root


@pytest.fixture(scope="module")
def simulations():
    return {name: simulate(name, [2] * STEPS) for name in ("tiny", "harmon-tiny", "bagel-tiny")}


@pytest.fixture(scope="module")
def reference(simulations):
    return {name: losses for name, (losses, _) in simulations.items()}


@pytest.mark.parametrize("name,strategy", PAIRS)
def test_two_ranks_match_one_process_at_the_global_batch(parity_runs, reference, name, strategy):
    """The first 20 losses of 2 ranks at 2 images each equal one process at 4 (the simulated
    ranks: each rank's noise stream is its own, so one plain process would draw other noise)
    within TOL, 1e-5 relative: fp32, only the order of the cross-rank sums differs (see TOL)."""
    run = parity_runs / f"{name}-{strategy}"
    assert [row["step"] for row in rows(run)] == list(range(1, STEPS + 1))
    assert losses(run) == pytest.approx(reference[name], rel=TOL)
    assert sorted(p.name for p in run.glob("step-*")) == [f"step-{HALF}", f"step-{STEPS}"]
    assert not list(run.glob(".step-*"))


def test_bagel_ema_is_sharded_and_checkpointed(parity_runs, simulations, tmp_path):
    """bagel-tiny (EMA 0.999) under FSDP: each rank's shards of the shadows, saved in step-20/,
    gather to the one-process EMA of the same steps (TOL: the weights it averages carry it)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    want = simulations["bagel-tiny"][1]
    dcp_to_torch_save(parity_runs / "bagel-tiny-fsdp" / f"step-{STEPS}", tmp_path / "whole.pt")
    whole = torch.load(tmp_path / "whole.pt", weights_only=False)
    got = whole["ema"]
    assert want and sorted(got) == sorted(want)
    for name, shadow in want.items():
        torch.testing.assert_close(got[name], shadow, rtol=TOL, atol=1e-7)
    assert any(not torch.allclose(got[n], whole["model"][n]) for n in got)  # an average, not the weights


def test_a_stop_request_ends_a_torchrun_job_like_a_one_process_run(parity_runs, tmp_path, monkeypatch):
    """SIGTERM during a step (here in a group of one): that step finishes, its step-N/ is
    written, and `Stopped` (exit status 143 from the CLI) is raised, as `train()` does."""
    import reca.engine.train as train_module
    from reca.engine.config import load_config
    from reca.engine.distributed import train_distributed

    run = tmp_path / "run"
    shutil.copytree(parity_runs / "tiny-fsdp", run)
    shutil.rmtree(run / f"step-{STEPS}")
    real, calls = train_module.next_batches, []

    def batches_then_stop(c):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGTERM)  # the handler only flags it: this step still runs
        return real(c)

    monkeypatch.setattr(train_module, "next_batches", batches_then_stop)
    saved = load_config(run / "config.json")
    cfg = replace(saved, output=replace(saved.output, dir=str(run)))
    with pytest.raises(train_module.Stopped) as stop:
        train_distributed(cfg, resume=True, quiet=True)
    assert stop.value.exit_status == 143 and stop.value.step == HALF + 3
    assert sorted(p.name for p in run.glob("step-*")) == [f"step-{HALF}", f"step-{HALF + 3}"]
    assert [row["step"] for row in rows(run)] == list(range(1, HALF + 4))


def test_export_gathers_a_torchrun_run(parity_runs, tmp_path, capsys):
    """`reca export RUN` of a torchrun run (no checkpoint.pt): the newest step-N/ gathered whole
    in one process, in the family's layout; bagel-tiny's EMA beside it as ema.safetensors."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from reca.engine.cli import main

    for name, files in (("tiny", ["model.safetensors"]), ("bagel-tiny", ["ema.safetensors", "model.safetensors"])):
        run, out = parity_runs / f"{name}-fsdp", tmp_path / name
        main(["export", str(run), "--to", str(out)])
        assert sorted(p.name for p in out.iterdir()) == files
        dcp_to_torch_save(run / f"step-{STEPS}", tmp_path / f"{name}.pt")
        whole = torch.load(tmp_path / f"{name}.pt", weights_only=False)
        if name == "tiny":  # the flow family exports by reca name
            exported = load_file(str(out / "model.safetensors"))
            assert whole["model"] and all(torch.equal(exported[n], t) for n, t in whole["model"].items())
    assert capsys.readouterr().out.count("safetensors") == 3


def test_a_tied_torchrun_run_is_sampled_and_exported_by_plain_reca(parity_runs, tmp_path):
    """Tied weights (an LM head sharing the embedding table: the README's adapter, Harmon's
    Qwen2.5) in a 2-rank fsdp job: the step-N/ folder holds the tensor once, under its first
    name, and plain `reca sample` / `reca export` (another folder, nothing on PYTHONPATH) load it
    (before: the folder held both names and the load refused lm_head.weight). The README run
    imports its family's module again from config.json's code.modules."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint import FileSystemReader

    env = {k: v for k, v in _env().items() if k != "PYTHONPATH"}

    def reca(*args) -> str:
        proc = subprocess.run([sys.executable, "-m", "reca.engine", *map(str, args)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    for name, head, embed in (("readme", "lm_head.weight", "embed.weight"),
                              ("harmon-tiny", "llm.lm_head.weight", "llm.model.embed_tokens.weight")):
        run = parity_runs / f"{name}-fsdp"
        saved = FileSystemReader(str(run / f"step-{STEPS}")).read_metadata().state_dict_metadata
        assert f"model.{embed}" in saved and f"model.{head}" not in saved, name
        out = reca("sample", run, "--prompt", "a red bus", "--out", tmp_path / name, "--steps", 2)
        assert [Path(p).name for p in out.split()] == ["text_00.png"], name
    assert json.loads((parity_runs / "readme-fsdp" / "config.json").read_text())["code"]["modules"] == ["my_adapter"]
    reca("export", parity_runs / "readme-fsdp", "--to", tmp_path / "export")
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert torch.equal(exported["lm_head.weight"], exported["embed.weight"])


def test_a_torchrun_run_is_never_silently_replaced(parity_runs, tmp_path, capsys):
    """A plain `reca train --out RUN` into a torchrun job's run (step-N/ folders, no
    checkpoint.pt) is refused in one line, as for a one-process run; nothing is touched."""
    from reca.engine.cli import main

    run = tmp_path / "run"
    shutil.copytree(parity_runs / "tiny-fsdp", run)
    before = sorted(p.name for p in run.iterdir() if p.name != ".lock")
    with pytest.raises(SystemExit) as e:  # (the run-directory lock, .lock, is taken first)
        main(["train", "--quiet", "--preset", "tiny", "--out", str(run), "--set=train.device=cpu"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "--resume" in err and "--overwrite" in err, err
    assert sorted(p.name for p in run.iterdir() if p.name != ".lock") == before


def test_a_locked_run_is_refused_by_a_torchrun_job(parity_runs, tmp_path, capsys):
    """Rank 0 locks the run directory as `train()` does: while another process holds it, a
    resume (here in a group of one) is one line naming the holder, and nothing is written."""
    from reca.engine.cli import main
    from reca.engine.rundir import RunLock

    run = tmp_path / "run"
    shutil.copytree(parity_runs / "tiny-fsdp", run)
    shutil.rmtree(run / f"step-{STEPS}")
    before = (run / "metrics.jsonl").read_bytes()
    with RunLock(run), pytest.raises(SystemExit) as e:
        main(["train", "--quiet", "--resume", str(run)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and f"pid {os.getpid()}" in err, err
    assert (run / "metrics.jsonl").read_bytes() == before and not (run / f"step-{STEPS}").exists()


@pytest.mark.parametrize("name,strategy", PAIRS)
def test_resume_two_ranks_in_one_process(parity_runs, tmp_path, name, strategy):
    """2 -> 1: each run's step-10/ continued by a plain `reca train --resume` (a process group
    of one), against one process that switches world size at step 10. BAGEL and Harmon cover
    frozen parameters (rebuilt, not in the folder) and a trainable one that never had a
    gradient (Harmon's MAR class table: no AdamW state in the folder)."""
    run = tmp_path / "run"
    shutil.copytree(parity_runs / f"{name}-{strategy}", run)
    shutil.rmtree(run / f"step-{STEPS}")
    from reca.engine.cli import main

    main(["train", "--quiet", "--resume", str(run)])  # in this process: a Python and torch start costs more
    assert not (run / "checkpoint.pt").exists()  # the run stays a torchrun run: step-N/ folders
    assert [row["step"] for row in rows(run)] == list(range(1, STEPS + 1))
    assert losses(run)[HALF:] == pytest.approx(simulated(name, [2] * HALF + [1] * HALF)[HALF:], rel=TOL)
    assert (run / f"step-{STEPS}").is_dir()


JANUS_SETS = [*SETS, "distributed.strategy=fsdp", "data.batch_size=1", f"train.steps={STEPS}"]


def test_janus_fsdp_resume_is_exact_and_the_run_samples(parity_runs, tmp_path, capsys):
    """janus-tiny (transformers' JanusForConditionalGeneration, its lm_head tied to the embedding
    table, SigLIP and the VQ model frozen) on 2 gloo ranks under FSDP: the job resumed by
    torchrun from its step-10/ writes the uninterrupted job's losses and step-20 weights bit for
    bit (the same world size: the same sums in the same order, each rank's noise restored: the
    unconditional rows among them); `reca sample` and `reca export` read the torchrun run."""
    from reca.engine.cli import main
    from reca.engine.generate import run_weights

    whole, resumed = parity_runs / "janus-tiny-fsdp", parity_runs / "janus-tiny-fsdp-resumed"
    assert [row["step"] for row in rows(resumed)] == list(range(1, STEPS + 1))
    assert losses(resumed) == losses(whole)
    assert any(row["recon/unconditional"] > 0 for row in rows(whole))  # some rows trained unconditional
    a, b = run_weights(whole)["model"], run_weights(resumed)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    main(["sample", str(whole), "--prompt", "a red bus", "--out", str(tmp_path / "s")])
    main(["export", str(whole), "--to", str(tmp_path / "release")])
    from transformers import JanusForConditionalGeneration

    hf = JanusForConditionalGeneration.from_pretrained(str(tmp_path / "release")).state_dict()
    for key, value in a.items():  # the trained tensors, by the release's names
        assert torch.equal(hf[key.removeprefix("janus.")], value), key
    assert (tmp_path / "s" / "text_00.png").is_file()


def test_a_step_folder_lacking_a_tensor_is_refused(parity_runs, tmp_path, capsys):
    """A folder whose metadata lacks a tensor the run needs (not a never-stepped parameter's
    whole AdamW state) is one line, nothing written."""
    import pickle

    from reca.engine.cli import main

    run = tmp_path / "run"
    shutil.copytree(parity_runs / "harmon-tiny-fsdp", run)
    shutil.rmtree(run / f"step-{STEPS}")
    meta_path = run / f"step-{HALF}" / ".metadata"
    meta = pickle.loads(meta_path.read_bytes())
    gone = next(k for k in meta.state_dict_metadata if k.endswith(".exp_avg_sq") and "mar.encoder_blocks" in k)
    del meta.state_dict_metadata[gone]
    meta_path.write_bytes(pickle.dumps(meta))
    _reseal(meta_path.parent)  # a foreign folder, not a damaged one: its checksums fit
    before = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(SystemExit) as e:
        main(["train", "--quiet", "--resume", str(run)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and gone in err, err
    assert (run / "metrics.jsonl").read_bytes() == before


def _reseal(folder: Path) -> None:
    """SHA256SUMS and extra.pt's record of it made to fit the folder's files as they are now."""
    from reca.engine.checkpoint import atomic_save, verified_load
    from reca.engine.checkpoint.sums import SUMS, file_sha256, write_sums

    names = [line.split("  ", 1)[1] for line in (folder / SUMS).read_text().splitlines()]
    extra = verified_load(folder / "extra.pt")
    extra["sums"] = write_sums(folder, {n: file_sha256(folder / n) for n in names})
    atomic_save(extra, folder / "extra.pt")


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_resume_one_process_in_two_ranks(tmp_path, strategy):
    """1 -> 2: a one-process run's checkpoint.pt continued by `torchrun ... --resume`, its AdamW
    state spread over FSDP's shards (fsdp: rank 0 reads it) or loaded by every rank (ddp),
    against one process that switches world size at step 10."""
    from reca.engine.cli import main

    run = tmp_path / "run"
    main(["train", "--quiet", "--preset", "tiny", "--out", str(run), *(f"--set={s}" for s in SETS),
          f"--set=train.steps={HALF}"])
    run_ok(torchrun("-m", "reca.engine", "train", "--quiet", "--resume", str(run), "--steps", str(STEPS),
                    "--set", f"distributed.strategy={strategy}"))
    assert [row["step"] for row in rows(run)] == list(range(1, STEPS + 1))
    want = simulated("tiny", [1] * HALF + [2] * HALF)
    assert losses(run) == pytest.approx(want, rel=TOL)
    assert sorted(p.name for p in run.glob("step-*")) == [f"step-{STEPS}"]


def test_resume_one_process_with_ema_in_two_ranks(tmp_path):
    """1 -> 2 for bagel-tiny (EMA 0.999): rank 0 reads checkpoint.pt into its CPU copy of the
    model, and the trainable weights, AdamW's state and the EMA's shadows reach each rank's
    shards from there (no other rank reads the file); losses and the final EMA equal one process
    that switches world size at step 10."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from reca.engine.cli import main

    run = tmp_path / "run"
    main(["train", "--quiet", "--preset", "bagel-tiny", "--out", str(run), *(f"--set={s}" for s in SETS),
          f"--set=train.steps={HALF}"])
    run_ok(torchrun("-m", "reca.engine", "train", "--quiet", "--resume", str(run), "--steps", str(STEPS)))
    want, ema = simulate("bagel-tiny", [1] * HALF + [2] * HALF)
    assert losses(run) == pytest.approx(want, rel=TOL)
    dcp_to_torch_save(run / f"step-{STEPS}", tmp_path / "whole.pt")
    got = torch.load(tmp_path / "whole.pt", weights_only=False)["ema"]
    assert ema and sorted(got) == sorted(ema)
    for name, shadow in ema.items():
        torch.testing.assert_close(got[name], shadow, rtol=TOL, atol=1e-7)


def test_a_torchrun_resume_proves_its_frozen_weights(parity_runs, tmp_path, capsys):
    """step-N/extra.pt keeps rank 0's fingerprint of the frozen weights (those of the model one
    process builds) and where they were drawn; a resume, or an export, that rebuilds other frozen
    weights (here: the fingerprint the run recorded is another's) is refused in one line naming
    the tensor, and nothing is written."""
    from reca.engine.build import seeded_model
    from reca.engine.checkpoint import atomic_save, frozen_fingerprint
    from reca.engine.checkpoint.integrity import verified_load
    from reca.engine.cli import main
    from reca.engine.config import apply_overrides
    from reca.kernels import get_ops

    run = tmp_path / "run"
    shutil.copytree(parity_runs / "bagel-tiny-fsdp", run)  # its ViT and understanding expert are frozen
    shutil.rmtree(run / f"step-{STEPS}")
    extra = verified_load(run / f"step-{HALF}" / "extra.pt")
    cfg = apply_overrides(preset("bagel-tiny"), SETS)
    assert extra["frozen"] and extra["frozen"] == frozen_fingerprint(seeded_model(cfg, get_ops("torch"), torch.device("cpu")))
    assert extra["drawn_on"] == "cpu"  # fsdp: rank 0's copy, on the CPU whatever the device
    name = sorted(extra["frozen"])[0]
    extra["frozen"][name] = extra["frozen"][name].rsplit(" ", 1)[0] + " 0"
    atomic_save(extra, run / f"step-{HALF}" / "extra.pt")
    before = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(SystemExit) as e:
        main(["train", "--quiet", "--resume", str(run)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and f"frozen parameter {name} differs" in err, err
    assert (run / "metrics.jsonl").read_bytes() == before and not (run / f"step-{STEPS}").exists()
    with pytest.raises(SystemExit) as e:
        main(["export", str(run), "--to", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and f"frozen parameter {name} differs" in err, err
    assert not (tmp_path / "out").exists()


def test_bench_step_under_torchrun_reports_scaling(tmp_path):
    """`reca bench step` under torchrun: rank 0's one-device baseline, then both ranks; the
    report's aggregate is N x per GPU and the efficiency per GPU / one rank (CPU: the figures
    only have to be consistent; absolute ones come from GPUs, benchmarks/results/PENDING.md)."""
    out = tmp_path / "scaling.json"
    proc = run_ok(torchrun("-m", "reca.engine", "bench", "step", "--preset", "tiny", "--steps", "2", "--warmup", "1",
                           "--data", "synthetic", "--modes", "reference", "--out", str(out),
                           "--set", "data.batch_size=2", "--set", "train.device=cpu", "--set", "distributed.strategy=ddp"))
    report = json.loads(out.read_text())
    row, one = report["ranks"], report["one_rank"]
    assert report["benchmark"] == "step_scaling" and row["world_size"] == 2 and row["strategy"] == "ddp"
    assert row["images_per_s"] == pytest.approx(2 * row["images_per_s_per_gpu"])
    assert row["scaling_efficiency"] == pytest.approx(row["images_per_s_per_gpu"] / one["images_per_s"])
    assert row["mfu"] == pytest.approx(row["tflops_per_gpu"] / report["peak_tflops"])
    assert report["device"] and report["date"] and report["versions"]["torch"]
    assert "scaling efficiency" in proc.stdout and proc.stdout.count("2 ranks:") == 1  # rank 0 alone prints
    assert row["build_s"] > 0 and row["build_peak_memory_gb_max_rank"] is None  # no device memory on CPU
    assert 0.1 < row["host_peak_rss_gb_rank0"] < 24 and proc.stdout.count("build (ddp):") == 1


def _workers(agent: int) -> dict[int, int]:
    """rank -> pid of the processes torchrun's agent `agent` started."""
    out = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if int(proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1]) != agent:
                continue
            env = proc.joinpath("environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        rank = next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)
        if rank is not None:
            out[rank] = int(proc.name)
    return out


def test_a_killed_rank_restarts_from_the_last_checkpoint(reference, tmp_path):
    """SIGKILL to rank 1 after step 11 under `torchrun --max-restarts 1`: torchrun starts both
    ranks again, they resume from step-10/ on their own, and the job finishes with every step
    once in metrics.jsonl and the losses of the uninterrupted run (step 11 is taken again)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from reca.engine.checkpoint import verified_load

    run = tmp_path / "run"
    cmd = torchrun("-m", "reca.engine", "train", "--quiet", "--preset", "tiny", "--out", str(run),
                   *(f"--set={s}" for s in SETS), "--set=distributed.strategy=fsdp", restarts=1)
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    try:
        deadline = time.monotonic() + 240
        while not ((run / "metrics.jsonl").exists() and len(rows(run)) > HALF):
            assert job.poll() is None and time.monotonic() < deadline, "the job ended before the kill"
            time.sleep(0.05)
        os.kill(_workers(job.pid)[1], signal.SIGKILL)
        out, _ = job.communicate(timeout=240)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, out[-3000:]
    assert "exitcode: -9" in out  # torchrun saw the kill ...
    assert f"reca: torchrun restart 1 after a failed rank: resuming at step {HALF} in {run}" in out  # ... and rank 0 resumed
    assert [row["step"] for row in rows(run)] == list(range(1, STEPS + 1))
    assert losses(run) == pytest.approx(reference["tiny"], rel=TOL)
    assert not list(run.glob(".step-*"))
    for folder in sorted(run.glob("step-*")):  # every kept checkpoint whole and loadable
        extra = verified_load(folder / "extra.pt")
        assert extra["step"] == int(folder.name[5:]) and extra["world_size"] == 2
        dcp_to_torch_save(folder, tmp_path / "whole.pt")
        state = torch.load(tmp_path / "whole.pt", weights_only=False)
        assert state["model"] and all(t.isfinite().all() for t in state["model"].values())
    assert sorted(p.name for p in run.glob("step-*")) == [f"step-{HALF}", f"step-{STEPS}"]


def _workers_of(run: Path, launcher: int) -> list[int]:
    """PIDs of the processes training into `run` (their command line names it), the launcher aside."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == launcher:
            continue
        try:
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if str(run).encode() in cmdline and b"torch.distributed.run" not in cmdline:
            found.append(int(d.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find the workers")
def test_a_killed_launcher_leaves_no_worker_running(tmp_path):
    """torchrun starts its workers in sessions of their own: killing torchrun's process group
    (SIGKILL: nothing forwarded) used to leave both training, holding the run's lock. Each
    worker now notices its parent's death, stops as a stop request does, and writes that step's
    step-N/ folder, within a few seconds."""
    import signal
    import time

    run = tmp_path / "run"
    sets = [s for s in SETS if not s.startswith(("train.steps", "output.ckpt_every"))]
    proc = subprocess.Popen(torchrun("-m", "reca.engine", "train", "--quiet", "--preset", "tiny", "--out", str(run),
                                     *(f"--set={s}" for s in sets), "--set=train.steps=100000",
                                     "--set=output.ckpt_every=100000"),
                            start_new_session=True, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not ((run / "metrics.jsonl").exists()
                                               and len((run / "metrics.jsonl").read_text().splitlines()) >= 3):
            assert proc.poll() is None, "torchrun ended before training"
            time.sleep(0.5)
        assert len(_workers_of(run, proc.pid)) == 2
        os.killpg(proc.pid, signal.SIGKILL)
        deadline = time.time() + 20
        while time.time() < deadline and _workers_of(run, proc.pid):
            time.sleep(0.5)
        assert _workers_of(run, proc.pid) == []
        assert [p.name for p in run.glob("step-*")]  # the stop's checkpoint
    finally:
        for pid in _workers_of(run, proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=10)


if __name__ == "__main__":  # under torchrun: the parity runs (see parity_runs)
    import torch.distributed as dist

    from reca.engine.config import apply_overrides
    from reca.engine.distributed import train_distributed

    root = Path(sys.argv[1])
    for name, strategy in PAIRS:
        cfg = apply_overrides(preset(name), [*SETS, f"distributed.strategy={strategy}",
                                             f"output.dir={root / f'{name}-{strategy}'}"])
        train_distributed(cfg, quiet=True)
    sys.path.insert(0, str(root / "project"))  # where `reca train --preset my_adapter:preset` runs
    cfg = apply_overrides(preset("my_adapter:preset"), [*SETS, "distributed.strategy=fsdp",
                                                        f"output.dir={root / 'readme-fsdp'}"])
    train_distributed(cfg, quiet=True)
    # janus-tiny under FSDP (JANUS_SETS), then the same job resumed by torchrun from its step-10/
    whole, resumed = root / "janus-tiny-fsdp", root / "janus-tiny-fsdp-resumed"
    cfg = apply_overrides(preset("janus-tiny"), [*JANUS_SETS, f"output.dir={whole}"])
    train_distributed(cfg, quiet=True)
    if dist.get_rank() == 0:
        shutil.copytree(whole, resumed)
        shutil.rmtree(resumed / f"step-{STEPS}")
    dist.barrier()
    train_distributed(replace(cfg, output=replace(cfg.output, dir=str(resumed))), resume=True, quiet=True)
    dist.destroy_process_group()  # before exit: a gloo group torn down with the statics can abort the rank (-6)
