"""The adapter boundary: a model from another repository (a toy, not one of ours) plugs in with a
page of code and trains through `reca.train`; models never import the engine; the engine
calls the model through its forward only."""
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reca
from reca.engine.config import apply_overrides
from reca.engine.metrics import read_metrics
from reca.models import (Conditioning, LossOutput, PromptTemplate, RecaModule, ViewSpec, build_model,
                         register_family)
from reca.models.tokenizer import load_tokenizer


# --- the page of code another repository writes --------------------------------------------------
@dataclass(kw_only=True)
class ToyConfig:
    family: str = "toy"
    width: int = 64
    side: int = 16  # both views, pixels; 4 x 4 patches -> 16 target tokens


class ToyUMM(RecaModule):
    """Understanding: a patch conv. Generation: 16 query tokens after the prompt regress the
    image's 4 x 4 patches (a stand-in for any native generation loss)."""

    objectives = frozenset({"recon", "sample"})

    def __init__(self, cfg: ToyConfig, ops=None):
        super().__init__()
        self.tokenizer = load_tokenizer(None, 512)
        self.template = PromptTemplate(text="<|im_start|>{image}{instruction}<|im_end|>")
        self.views = ViewSpec(und_size=cfg.side, und_mean=(0.5,) * 3, und_std=(0.5,) * 3, gen_size=cfg.side)
        self.num_visual_tokens = (cfg.side // 4) ** 2
        self.image_token_id = self.tokenizer.token_id(self.template.image_token)
        self.embed = nn.Embedding(512, cfg.width)
        self.patch = nn.Conv2d(3, cfg.width, 4, 4)
        layer = nn.TransformerEncoderLayer(cfg.width, 4, 2 * cfg.width, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.queries = nn.Parameter(torch.randn(self.num_visual_tokens, cfg.width) * 0.02)
        self.out = nn.Linear(cfg.width, 48)
        self.conditioning = Conditioning(self.embed, ops, self.image_token_id)

    def encode_visual_prompt(self, und):
        return self.patch(und).flatten(2).transpose(1, 2)  # [B, 16, D]

    def make_target(self, gen, generator=None):
        return F.unfold(gen, 4, stride=4).transpose(1, 2)  # [B, 16, 48] pixel patches

    def predict(self, prompt_embeds, prompt):
        b, p, _ = prompt_embeds.shape
        seq = torch.cat([prompt_embeds, self.queries.expand(b, -1, -1)], dim=1)
        pad = torch.cat([~prompt.mask, prompt.mask.new_zeros(b, self.num_visual_tokens)], dim=1)
        return self.out(self.body(seq, src_key_padding_mask=pad)[:, p:])

    def generation_loss(self, prompt_embeds, prompt, target, generator=None):
        return LossOutput(F.mse_loss(self.predict(prompt_embeds, prompt), target))

    def sample(self, prompt_embeds, prompt, steps, generator=None):
        side = self.views.gen_size
        return F.fold(self.predict(prompt_embeds, prompt).transpose(1, 2), (side, side), 4, stride=4).clamp(-1, 1)


def test_a_toy_adapter_trains_through_the_engine(tmp_path):
    register_family("toy", ToyConfig, ToyUMM)
    cfg = apply_overrides(reca.preset("tiny"), [f"output.dir={tmp_path / 'run'}", "output.tensorboard=false",
                                                "output.preview_images=2", "train.steps=40", "output.log_every=1",
                                                "optim.lr=3e-3", "sample.max_text_tokens=64"])  # its 512-token BPE splits finer
    cfg.model = ToyConfig()
    cfg = apply_overrides(cfg, [])  # round trip through the saved form, as --resume reads it
    assert isinstance(cfg.model, ToyConfig)
    reca.train(cfg, quiet=True)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert len(losses) == 40 and sum(losses[-5:]) < 0.5 * sum(losses[:5]), losses
    assert (tmp_path / "run" / "recon_step40.png").exists()  # previews through model(batch, "sample")
    import json  # the run names the module that registered its family: reading it back imports it

    code = json.loads((tmp_path / "run" / "config.json").read_text())["code"]
    assert code["modules"] == [__name__] and code["paths"] == [str(Path(__file__).resolve().parent)]


def test_the_engine_reaches_the_model_only_through_forward(tmp_path):
    """Every engine call of a training step goes through `model.forward` (what FSDP2 gathers
    parameters around): the step runs with forward as the only entry point."""
    from reca.engine.build import build
    from reca.engine.train import next_batches

    c = build(apply_overrides(reca.preset("harmon-tiny"), [f"output.dir={tmp_path}", "output.tensorboard=false",
                                                           "mix.cycle=recon"]))
    entered = []
    handle = c.model.register_forward_pre_hook(lambda m, args, kwargs: entered.append(args[1]), with_kwargs=True)
    depth = {"in": 0}
    forward = c.model.forward

    def counted(*a, **k):
        depth["in"] += 1
        try:
            return forward(*a, **k)
        finally:
            depth["in"] -= 1

    outside = []
    for name in ("encode_visual_prompt", "make_target", "generation_loss", "encode_views"):
        real = getattr(c.model, name)
        setattr(c.model, name, lambda *a, _r=real, _n=name, **k: (outside.append(_n) if depth["in"] == 0 else None)
                or _r(*a, **k))
    c.model.forward = counted
    c.update(c, next_batches(c))
    handle.remove()
    c.close()
    assert entered == ["recon"] and outside == []


def test_models_never_import_the_engine():
    code = ("import sys, pkgutil, importlib, reca.models as M\n"
            "for m in pkgutil.walk_packages(M.__path__, 'reca.models.'): importlib.import_module(m.name)\n"
            "bad = [m for m in sys.modules if m.startswith('reca.engine')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_family_declares_its_objectives_and_capabilities():
    from reca.engine.presets import PRESETS

    for name, make in PRESETS.items():
        cfg = make()
        with torch.device("meta"):
            model = build_model(cfg.model)
        assert {"recon", "sample"} <= model.objectives, name
        assert model.capabilities <= {"init_from", "export", "flop_plan"}, name
        assert isinstance(model.conditioning, Conditioning), name
        for member in ("input_embeddings", "lm_head_weight"):  # the engine reads no raw weight
            assert not hasattr(model, member), (name, member)


def test_frozen_parts_the_family_names_stay_in_eval_mode():
    """`model.train()` (the engine's, at build and after each preview) puts every submodule in
    training mode, as PyTorch does, except those the family's `eval_modules()` names."""
    class Frozen(RecaModule):
        def __init__(self):
            super().__init__()
            self.vision = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).requires_grad_(False)
            self.head = nn.Dropout(0.5)

        def eval_modules(self):
            return ("vision",)

    m = Frozen()
    for _ in range(2):
        assert m.train() is m and m.training and m.head.training
        assert not m.vision.training and not m.vision[1].training
        m.eval()
        assert not m.head.training
    x = torch.randn(3, 4)
    m.train()
    assert torch.equal(m.vision(x), m.vision(x))  # its dropout is off


def test_a_metric_is_named_once_with_its_objective():
    """The engine logs a model metric KEY as OBJECTIVE/KEY, and one already named OBJECTIVE/KEY
    as it is (it was "recon/recon/acc")."""
    from types import SimpleNamespace

    from reca.engine.train import MicroBatch, train_step

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, batch, objective, generator=None):
            loss = 2 * self.w
            return LossOutput(loss, {"mse": loss.detach(), f"{objective}/acc": loss.detach()})

    m = M()
    c = SimpleNamespace(model=m, cfg=reca.preset("tiny"), device=torch.device("cpu"), objectives=["recon"],
                        params=[m.w], optimizer=torch.optim.AdamW([m.w], fused=True), ema=None, generator=None)
    out = train_step(c, [MicroBatch("recon", None)])
    assert {"recon/mse", "recon/acc"} <= set(out) and not any(k.count("recon/") > 1 for k in out), sorted(out)


def test_flops_are_counted_eagerly_through_compiled_blocks():
    """`reca bench step` counts the FLOPs of an adapter without `flop_plan` with FlopCounterMode;
    compiled frames refuse it (it failed with "fullgraph=True found no compiled frames"), so
    compiled blocks run eagerly while it counts. A block of torch.nn's own classes, which
    torch.compile cannot trace at the top of a frame, is refused when compiled, in one line."""
    from reca.engine.bench.flops import counted_flops
    from reca.engine.compile import apply_compile
    from reca.engine.errors import UserError

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            return torch.relu(self.lin(x))

    model = nn.Module()
    model.layers = nn.ModuleList([Block(), Block()])
    assert apply_compile(model) == ["layers.0", "layers.1"]
    x = torch.randn(4, 8)
    assert counted_flops(lambda: model.layers[1](model.layers[0](x))) == 2 * (2 * 4 * 8 * 8)
    model.layers = nn.ModuleList([nn.TransformerEncoderLayer(8, 2, 16, batch_first=True) for _ in range(2)])
    with pytest.raises(UserError, match="layers.0 is a torch.nn.modules.transformer.TransformerEncoderLayer"):
        apply_compile(model)
