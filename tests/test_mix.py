"""Mixing RecA with image-to-text captioning micro-batches (Harmon's 2 : 2 cycle)."""
import pytest
import torch
from PIL import Image

from reca.engine.checkpoint import load_checkpoint
from reca.engine.config import apply_overrides
from reca.engine.metrics import read_metrics
from reca.engine.presets import harmon_1_5b, harmon_tiny
from reca.engine.train import build, next_batches, train


def _captioned(tmp_path, n=6):
    root = tmp_path / "captioned"
    root.mkdir()
    for i in range(n):
        Image.new("RGB", (48, 40), (30 * i, 200 - 20 * i, 90)).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"a flat colour field, shade number {i}, with nothing else in it")
    return root


def _cfg(tmp_path, *sets):
    return apply_overrides(harmon_tiny(), [f"output.dir={tmp_path / 'run'}", "output.tensorboard=false",
                                           "output.preview_images=0", "data.batch_size=2",
                                           f"mix.caption_source={_captioned(tmp_path)}", *sets])


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_cycle_order_across_steps(tmp_path):
    c = build(_cfg(tmp_path, "mix.cycle=recon,recon,caption,caption", "optim.grad_accum=2"))
    kinds = []
    for _ in range(4):  # the cycle position follows the optimizer step, so step by hand
        batches = next_batches(c)
        kinds.append([b.objective for b in batches])
        c.scheduler.step()
    assert kinds == [["recon", "recon"], ["caption", "caption"], ["recon", "recon"], ["caption", "caption"]]
    c.close()


def test_caption_batches_carry_answers_only_in_the_answer(tmp_path):
    c = build(_cfg(tmp_path, "mix.cycle=caption", "mix.max_answer_tokens=24"))
    (mb,) = next_batches(c)
    b, tok = mb.batch, c.model.tokenizer
    assert mb.objective == "caption" and not hasattr(b, "gen")
    assert b.answer_ids.shape == (2, 24) and b.answer_mask.any(1).all()
    for ids, mask in zip(b.answer_ids, b.answer_mask):
        answer = ids[mask].tolist()
        assert answer[-1] == tok.token_id("<|im_end|>")
        assert "flat colour field" in tok.decode(answer[:-1])
    # the question sits in the prompt; the caption is nowhere in it
    question = tok.encode(c.cfg.mix.caption_prompt)
    row = b.prompt.input_ids[0, b.prompt.mask[0]].tolist()
    assert any(row[i : i + len(question)] == question for i in range(len(row)))
    assert (b.prompt.input_ids == c.model.image_token_id).sum(1).eq(c.model.num_visual_tokens).all()


def test_mixed_training_runs_and_resumes_exactly(tmp_path):
    sets = ("mix.cycle=recon,caption", "optim.grad_accum=2", "train.steps=6", "output.ckpt_every=3",
            "output.log_every=3")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight, split = _cfg(tmp_path / "a", *sets), _cfg(tmp_path / "b", *sets)
    train(straight, quiet=True)
    train(split, quiet=True, stop_after=3)
    train(split, resume=True, quiet=True)
    a, b = load_checkpoint(straight.output.dir), load_checkpoint(split.output.dir)
    assert a["data"] == b["data"] and "captions" in a["data"]
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    losses = [r["loss"] for r in read_metrics(straight.output.dir)]
    assert len(losses) == 6 and all(x == x and x > 0 for x in losses)


def test_the_published_recipe_asks_for_captioned_images():
    cfg = harmon_1_5b()
    assert cfg.mix.cycle == ("recon", "recon", "caption", "caption") and cfg.optim.grad_accum == 4


def test_caption_images_are_padded_with_grey_not_cut(tmp_path):
    """Harmon's image-to-text input: the whole image, padded to a square with grey 127."""
    root = tmp_path / "wide"
    root.mkdir()
    Image.new("RGB", (64, 32), (250, 10, 10)).save(root / "red.png")  # 2:1, pure red
    (root / "red.txt").write_text("a red band")
    cfg = _cfg(tmp_path, "mix.cycle=recon,caption", "optim.grad_accum=2", f"mix.caption_source={root}")
    c = build(cfg)
    (cap,) = [b.batch for b in next_batches(c) if b.objective == "caption"]
    assert c.model.caption_views.gen_resize == "pad" and c.model.views.gen_resize == "stretch"
    und = cap.und[0] * 0.5 + 0.5  # the understanding view, back to [0, 1]
    side = und.shape[-1]
    grey, red = und[:, : side // 4 - 1], und[:, side // 2]  # a top band row, the middle row
    torch.testing.assert_close(grey, torch.full_like(grey, 127 / 255), atol=2e-2, rtol=0)
    assert red[0].min() > 0.9 and red[1].max() < 0.1  # the image itself, uncut
