"""What trains and what is frozen, for the families whose own test files do not pin it (flow,
harmon, janus; bagel, showo and openuni have theirs): through the engine's own step, a frozen
parameter gets no gradient and no AdamW state, and every trained one both. The real presets'
frozen parts (built on the meta device) are those the README's families table names."""
import pytest
import torch

from reca.engine.config import apply_overrides
from reca.engine.presets import preset
from reca.engine.train import build, next_batches
from reca.models import build_model
from reca.kernels import get_ops


# Trainable but never reached by RecA's loss (HARMON_LAYOUT.md: MAR's ImageNet class table, kept
# for the checkpoint layout): no gradient, hence no AdamW state either.
UNREACHED = {"harmon-tiny": {"mar.class_emb.weight"}}


@pytest.mark.parametrize("name", ["tiny", "harmon-tiny", "janus-tiny"])
def test_the_step_leaves_frozen_parts_alone(tmp_path, name):
    cfg = apply_overrides(preset(name), [f"output.dir={tmp_path}", "data.batch_size=2",
                                         "optim.clip_grad=0", "optim.warmup_steps=0"])
    c = build(cfg)
    named = dict(c.model.named_parameters())
    grads = {}
    hooks = [p.register_post_accumulate_grad_hook(lambda p, n=n: grads.__setitem__(n, p.grad is not None))
             for n, p in named.items() if p.requires_grad]
    frozen_before = {n: p.detach().clone() for n, p in named.items() if not p.requires_grad}
    c.update(c, next_batches(c))
    for h in hooks:
        h.remove()
    trained = {n for n, p in named.items() if p.requires_grad} - UNREACHED.get(name, set())
    assert trained and set(grads) == trained and all(grads.values())  # every trained one got a gradient
    assert all(named[n].grad is None for n in frozen_before)
    assert {id(p) for p in c.optimizer.state} == {id(named[n]) for n in trained}
    assert all(torch.equal(named[n], v) for n, v in frozen_before.items())
    c.close()


@pytest.mark.parametrize("name, frozen", [
    ("flow-7b", ("vit.", "connector.", "codec.")),
    ("harmon-1.5b", ("codec.",))  # the VAE,
])
def test_real_presets_freeze_what_the_readme_says(name, frozen):
    cfg = preset(name)
    with torch.device("meta"):
        model = build_model(cfg.model, get_ops("torch"))
    still = sorted({n.split(".")[0] + "." for n, p in model.named_parameters() if not p.requires_grad})
    assert still == sorted(frozen), still
