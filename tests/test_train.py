"""End-to-end training on the tiny preset: it learns, it overfits one batch, it resumes exactly."""
import json

import pytest
import torch

from reca.engine.checkpoint import load_checkpoint
from reca.engine.config import apply_overrides
from reca.engine.metrics import read_metrics
from reca.engine.presets import tiny
from reca.engine.train import build, train
from reca.models.adapter import ReconBatch


def _cfg(tmp_path, name="run", **sets):
    cfg = apply_overrides(tiny(), [f"output.dir={tmp_path / name}", "output.tensorboard=false",
                                   "output.preview_every=0", "output.preview_images=2",
                                   "output.preview_steps=2"] + [f"{k}={v}" for k, v in sets.items()])
    return cfg


def test_overfits_one_fixed_batch(tmp_path):
    """Same images, prompts, timesteps and noise every step: loss must fall below 10% of its start."""
    c = build(_cfg(tmp_path, **{"optim.warmup_steps": 5, "optim.schedule": "constant", "optim.lr": 2e-3}))
    images = next(c.loader)
    prompt = c.builder.build(images.positions)
    params = [p for p in c.model.parameters() if p.requires_grad]
    losses = []
    for _ in range(120):
        gen = torch.Generator().manual_seed(0)
        out = c.model(ReconBatch(images.und, images.gen, prompt), "recon", generator=gen)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        c.optimizer.step()
        c.scheduler.step()
        c.optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])


def test_resume_is_exact(tmp_path):
    """20 steps straight == 10 steps, stop, resume, 10 steps: identical parameters, optimizer
    state and EMA."""
    sets = {"train.steps": 20, "output.ckpt_every": 5, "output.log_every": 5, "train.ema": 0.9}
    straight = _cfg(tmp_path, "straight", **sets)
    train(straight, quiet=True)
    split = _cfg(tmp_path, "split", **sets)
    train(split, quiet=True, stop_after=10)
    assert load_checkpoint(split.output.dir)["step"] == 10
    train(split, resume=True, quiet=True)
    a, b = load_checkpoint(straight.output.dir), load_checkpoint(split.output.dir)
    assert a["step"] == b["step"] == 20
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for (ka, sa), (kb, sb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items()):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert a["data"] == b["data"]
    assert a["extra"]["ema"]["shadows"].keys() == a["model"].keys()
    for name, shadow in a["extra"]["ema"]["shadows"].items():
        assert torch.equal(shadow, b["extra"]["ema"]["shadows"][name]), name
    la = [r["loss"] for r in read_metrics(straight.output.dir)]
    lb = [r["loss"] for r in read_metrics(split.output.dir)]
    assert la == lb and len(la) == 20


def test_ema_is_updated_in_the_step(tmp_path):
    """train.ema=d: after a step the shadow is d * before + (1 - d) * after, for every trained
    parameter and no frozen one; without it no EMA exists."""
    from reca.engine.train import next_batches

    assert build(_cfg(tmp_path, "none")).ema is None
    c = build(_cfg(tmp_path, **{"train.ema": 0.75}))
    before = [p.detach().clone() for p in c.params]
    c.update(c, next_batches(c))
    assert len(c.ema.shadows) == len(c.params) > 0
    moved = 0
    for b, p, s in zip(before, c.params, c.ema.shadows):
        torch.testing.assert_close(s, 0.75 * b + 0.25 * p.detach(), rtol=0, atol=1e-6)
        moved += not torch.equal(b, p)
    assert moved > 0  # the step changed weights, so the check above could fail


def test_run_writes_what_a_user_looks_at(tmp_path):
    cfg = _cfg(tmp_path, **{"train.steps": 6, "output.log_every": 3, "output.preview_every": 3})
    train(cfg, quiet=True)
    run = tmp_path / "run"
    for name in ("config.json", "checkpoint.pt", "metrics.jsonl", "loss.png", "recon_step3.png", "recon_step6.png",
                 "tokenizer/tokenizer.json"):
        assert (run / name).exists(), name
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(r["loss"] > 0 for r in rows)
    assert rows[-1]["skipped"] == 0 and rows[-1]["images_per_s"] > 0 and 0 <= rows[-1]["data_wait"] <= 1
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["steps"] == 6 and saved["model"]["family"] == "flow"
    from PIL import Image

    grid = Image.open(run / "recon_step6.png")
    assert grid.width > grid.height / 2  # two columns: input | reconstruction


@pytest.mark.slow
def test_loss_halves_on_the_demo(tmp_path):
    """The demo's promise, shortened: mean of the last 10 losses <= half the first 10."""
    cfg = _cfg(tmp_path, **{"train.steps": 150, "output.log_every": 50, "output.ckpt_every": 1000})
    train(cfg, quiet=True)
    losses = [r["loss"] for r in read_metrics(cfg.output.dir)]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last <= 0.5 * first, (first, last)


def test_broken_images_are_skipped_and_counted_in_metrics(tmp_path):
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for i in range(5):
        Image.new("RGB", (40 + i, 48), (40 * i, 100, 200 - 30 * i)).save(data / f"ok{i}.png")
    (data / "empty.jpg").write_bytes(b"")
    (data / "page.png").write_text("<html><body>not an image</body></html>")
    good = (data / "ok0.png").read_bytes()
    (data / "cut.png").write_bytes(good[: len(good) // 2])
    cfg = _cfg(tmp_path, **{"data.source": data, "data.batch_size": 4, "train.steps": 4, "output.log_every": 2})
    train(cfg, quiet=True)
    rows = [r for r in read_metrics(cfg.output.dir) if "skipped" in r]
    assert rows[-1]["skipped"] >= 3  # each broken file met at least once in 16 samples of 8 files
    assert all(r["loss"] > 0 for r in read_metrics(cfg.output.dir))


def test_weight_decay_groups():
    from reca.engine.optim import param_groups

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(4, 4)
            self.norm = torch.nn.LayerNorm(4)
            self.head = torch.nn.Linear(4, 4)
            self.frozen = torch.nn.Linear(4, 4).requires_grad_(False)

        def no_weight_decay_modules(self):
            return ("head.",)

    m = M()
    decay, plain = param_groups(m, 0.1, exempt=tuple(m.no_weight_decay_modules()))
    assert decay["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(m.body.weight)}
    assert {id(p) for p in plain["params"]} == {id(m.body.bias), id(m.norm.weight), id(m.norm.bias),
                                                id(m.head.weight), id(m.head.bias)}


def test_loss_plot_is_skipped_without_matplotlib(tmp_path, monkeypatch, caplog):
    """The GPU image runs the checkout uninstalled and may lack matplotlib: the run still ends."""
    import builtins

    from reca.engine.metrics import plot_loss

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    real = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert plot_loss(tmp_path) is None and not (tmp_path / "loss.png").exists()
    assert "matplotlib is not installed" in caplog.text


def test_export_writes_the_ema_beside_the_weights(tmp_path):
    """A run with train.ema exports its EMA in the family's layout too (flow: TO/ema/
    model.safetensors), holding the checkpoint's shadows, and the model keeps its own weights."""
    from safetensors.torch import load_file

    from reca.engine.generate import export, load_model, run_weights

    cfg = _cfg(tmp_path, **{"train.steps": 3, "train.ema": 0.5})
    train(cfg, quiet=True)
    ema = run_weights(cfg.output.dir)["ema"]
    saved = load_checkpoint(cfg.output.dir)["extra"]["ema"]["shadows"]
    assert ema.keys() == saved.keys() and all(torch.equal(ema[n], t) for n, t in saved.items())
    run_cfg, model = load_model(run=cfg.output.dir, device="cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    paths = export(model, run_cfg, str(tmp_path / "out"), ema=ema)
    assert [p.relative_to(tmp_path / "out").as_posix() for p in paths] == ["model.safetensors", "ema/model.safetensors"]
    weights, averaged = load_file(str(paths[0])), load_file(str(paths[1]))
    differs = 0
    for name, shadow in ema.items():
        assert torch.equal(averaged[name], shadow) and torch.equal(weights[name], before[name]), name
        differs += not torch.equal(shadow, before[name])
    assert differs  # the EMA is not the weights: the check above could fail
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
