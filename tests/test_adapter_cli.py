"""The README's complete adapter (tests/readme_example.py takes it from the README), used as a
user of another repository uses it: `reca train --preset my_adapter:preset` in its folder, then
`reca train --resume`, `reca sample`, `reca export` from elsewhere, with plain `reca`; under
`train.compile` with its token-by-token sampler; `reca bench step` without a `flop_plan`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from readme_example import captioned_images, write_example


def reca_cli(*args, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # plain `reca`: nothing but the installed package on sys.path
    return subprocess.run([sys.executable, "-m", "reca.engine", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


SETS = ["--set", "output.tensorboard=false", "--set", "output.log_every=1", "--set", "output.preview_images=2",
        "--set", "data.batch_size=4", "--set", "optim.warmup_steps=2", "--set", "train.device=cpu"]


def test_the_readme_adapter_resumes_samples_and_exports_through_plain_reca(tmp_path):
    """A `--preset my_adapter:preset` run (recon and captions, frozen parts, a tied LM head)
    continued, sampled and exported by plain `reca` from another folder: config.json's
    `code.modules` names my_adapter and reca imports it again (before: "unknown model family
    'toy'"). A module that is gone is one line naming it."""
    project, elsewhere, run = tmp_path / "project", tmp_path / "elsewhere", tmp_path / "run"
    write_example(project)
    elsewhere.mkdir()
    captions = captioned_images(tmp_path / "captions")
    ok(reca_cli("train", "--quiet", "--preset", "my_adapter:preset", "--out", run, "--steps", 30, *SETS,
                "--set", "mix.cycle=recon,caption", "--set", f"mix.caption_source={captions}", cwd=project))
    saved = json.loads((run / "config.json").read_text())
    assert saved["code"]["modules"] == ["my_adapter"] and saved["code"]["paths"] == [str(project)]
    assert saved["preset"] == "my_adapter:preset" and saved["model"]["family"] == "toy"
    first = rows(run)
    recon = [r["loss/recon"] for r in first if "loss/recon" in r]  # odd steps recon, even ones captions
    caption = [r["loss/caption"] for r in first if "loss/caption" in r]
    assert len(recon) == len(caption) == 15
    assert sum(recon[-4:]) < 0.8 * sum(recon[:4]) and sum(caption[-4:]) < 0.8 * sum(caption[:4]), (recon, caption)
    assert "caption/tokens" in first[-1] and not any("caption/caption" in k for k in first[-1])
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert "embed.weight" in ckpt["model"] and "lm_head.weight" not in ckpt["model"]  # the tied tensor once
    assert not any(k.startswith(("vision.", "codebook.")) for k in ckpt["model"])  # frozen: rebuilt, not saved

    ok(reca_cli("train", "--quiet", "--resume", run, "--steps", 34, cwd=elsewhere))
    assert [r["step"] for r in rows(run)] == list(range(1, 35))
    out = ok(reca_cli("sample", run, "--prompt", "a red picture", "--num", 2, "--out", tmp_path / "text", cwd=elsewhere))
    assert [Path(p).name for p in out.split()] == ["text_00.png", "text_01.png"]
    out = ok(reca_cli("sample", run, "--image", captions / "0.png", "--out", tmp_path / "image", cwd=elsewhere))
    assert [Path(p).name for p in out.split()] == ["0.png"]
    ok(reca_cli("export", run, "--to", tmp_path / "export", cwd=elsewhere))
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert torch.equal(exported["lm_head.weight"], exported["embed.weight"])
    assert torch.equal(exported["embed.weight"], ckpt["model"]["embed.weight"])

    (project / "my_adapter.py").rename(project / "moved.py")
    proc = reca_cli("sample", run, "--prompt", "x", "--out", tmp_path / "gone", cwd=elsewhere)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "my_adapter" in err, err


def test_the_readme_adapter_compiles_and_samples_token_by_token(tmp_path):
    """`train.compile` compiles its blocks for the step's fixed shapes; the final preview's
    token-by-token sampler calls them with a longer sequence every token and runs them eagerly
    (before: FailOnRecompileLimitHit after training, exit 1)."""
    project, run = tmp_path / "project", tmp_path / "run"
    write_example(project)
    ok(reca_cli("train", "--quiet", "--preset", "my_adapter:preset", "--out", run, "--steps", 3, *SETS,
                "--set", "train.compile=true", cwd=project))
    assert (run / "recon_step3.png").is_file() and [r["step"] for r in rows(run)] == [1, 2, 3]
    assert json.loads((run / "config.json").read_text())["train"]["compile"] is True


HELD = '''
import dataclasses

import torch
import torch.nn as nn

from my_adapter import ToyConfig, ToyUMM, preset as toy_preset
from reca.models import register_family


@dataclasses.dataclass(kw_only=True)
class HeldConfig(ToyConfig):
    family: str = "toy-held"


class Held(ToyUMM):
    """The README's adapter with its layers in a container that blocks() names, but whose own
    forward never runs: the model indexes into it, as a VQ encoder calls down[i].block[j]."""

    def __init__(self, cfg, ops=None):
        super().__init__(cfg, ops)
        self.holder = nn.Module()
        self.holder.pair = self.layers
        del self.layers

    def blocks(self):
        return [self.holder]

    def run(self, x, keep):
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).tril()
        for block in self.holder.pair:
            x = block(x, causal & keep[:, None, :])
        return self.norm(x)


register_family("toy-held", HeldConfig, Held)


def preset():
    return dataclasses.replace(toy_preset(), model=HeldConfig())
'''


def test_a_block_whose_own_forward_never_runs_stops_the_first_step(tmp_path, monkeypatch):
    """Activation checkpointing (and compile, and FSDP) wrap a block's forward: a block whose
    submodules run without it is one line naming it at the first step (before: checkpointing
    silently did nothing; FSDP failed on "mixed torch.Tensor and DTensor")."""
    project = tmp_path / "project"
    write_example(project)
    (project / "held.py").write_text(HELD, encoding="utf-8")
    proc = reca_cli("train", "--quiet", "--preset", "held:preset", "--out", tmp_path / "run", "--steps", 2, *SETS,
                    "--set", "train.checkpoint_every=1", cwd=project)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert "block holder never ran its own forward" in err and "holder.pair.0" in err, err

    # FSDP: a torchrun job's ranks meet it the same way (here a group of one, in this process)
    import importlib

    import torch.distributed as dist

    from reca.engine.config import apply_overrides
    from reca.engine.distributed import train_distributed
    from reca.engine.errors import UserError
    from reca.engine.presets import preset

    monkeypatch.syspath_prepend(str(project))
    importlib.import_module("held")
    cfg = apply_overrides(preset("held:preset"), [f"output.dir={tmp_path / 'fsdp'}", "output.tensorboard=false",
                                                  "train.steps=1", "data.batch_size=2", "distributed.strategy=fsdp"])
    try:
        with pytest.raises(UserError, match="block holder never ran its own forward"):
            train_distributed(cfg, quiet=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


TIED_ACROSS = '''
import dataclasses

from my_adapter import ToyConfig, ToyUMM, preset as toy_preset
from reca.models import register_family


@dataclasses.dataclass(kw_only=True)
class TiedConfig(ToyConfig):
    family: str = "toy-tied-across"


class TiedAcross(ToyUMM):
    """The README's adapter with its final norm tied to a parameter of its first block."""

    def __init__(self, cfg, ops=None):
        super().__init__(cfg, ops)
        self.norm.weight = self.layers[0].norm1.weight


register_family("toy-tied-across", TiedConfig, TiedAcross)


def preset():
    return dataclasses.replace(toy_preset(), model=TiedConfig())
'''


def test_a_tensor_tied_across_fsdp_units_is_one(tmp_path, monkeypatch):
    """FSDP shards each block as a unit: a block holding a tensor tied to a module outside it
    (here the final norm to the first block's) is left to the root's unit, which holds the
    tensor once (FSDP refused: "shared with a parameter already managed by another FSDP
    group"); the run samples with the tie kept. A group of one, in this process."""
    import importlib

    import torch.distributed as dist

    from reca.engine.config import apply_overrides
    from reca.engine.distributed import train_distributed
    from reca.engine.generate import load_model, sample
    from reca.engine.presets import preset

    project, run = tmp_path / "project", tmp_path / "run"
    write_example(project)
    (project / "tied_across.py").write_text(TIED_ACROSS, encoding="utf-8")
    monkeypatch.syspath_prepend(str(project))
    importlib.import_module("tied_across")
    cfg = apply_overrides(preset("tied_across:preset"), [f"output.dir={run}", "output.tensorboard=false",
                                                         "train.steps=2", "data.batch_size=2", "distributed.strategy=fsdp"])
    try:
        train_distributed(cfg, quiet=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    cfg, model = load_model(run=str(run), device="cpu")
    assert model.norm.weight is model.layers[0].norm1.weight
    assert [p.name for p in sample(model, cfg, out=str(tmp_path / "s"), prompt="a cat", steps=1)] == ["text_00.png"]
