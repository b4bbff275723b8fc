"""LLaVA conversation files as a caption source (Harmon's and Show-o's image-to-text halves read
`llava_v1_5_mix665k.json`): the source, the answer layout of a multi-turn conversation (every
assistant turn scored, the later questions seen and not scored), the families' losses on the
scored tokens only, and a run that reads such a file."""
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from reca.engine.data.conversations import LlavaSource
from reca.engine.errors import UserError
from reca.engine.presets import preset
from reca.engine.sample import SampleBuilder
from reca.kernels import get_ops


def _llava(root, n=6):
    (root / "coco").mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries = []
    for k in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / "coco" / f"{k}.jpg")
        entries.append({"id": str(k), "image": f"coco/{k}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": f"Noise number {k}."},
            {"from": "human", "value": "And its colour?"}, {"from": "gpt", "value": "Every colour."}]})
    entries.append({"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]})
    entries.append({"id": "gone", "image": "coco/missing.jpg", "conversations": entries[0]["conversations"]})
    (root / "llava.json").write_text(json.dumps(entries))
    return root / "llava.json"


def test_source_reads_images_and_turns_and_counts_what_it_leaves_out(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="reca.engine.data"):
        src = LlavaSource(str(_llava(tmp_path)))
    assert len(src) == 7 and src.key(0) == "coco/0.jpg" and src.read(0)[:2] == b"\xff\xd8"
    assert src.caption(1) == (("What is in the picture?", "Noise number 1."), ("And its colour?", "Every colour."))
    assert "1 of 8 entries left out" in caplog.text  # the text-only one
    with pytest.raises(OSError):
        src.read(6)  # the missing image: a bad sample when read (the loader skips and counts it)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not a JSON conversation file"):
        LlavaSource(str(bad))


def _harmon():
    from reca.models.harmon import HarmonModel

    torch.manual_seed(0)
    return HarmonModel(preset("harmon-tiny").model, get_ops("torch"))


def test_a_conversation_scores_every_answer_and_sees_the_later_questions():
    m = _harmon()
    tok, t = m.tokenizer, m.caption_template
    b = SampleBuilder(tok, t, m.num_visual_tokens, ["unused"], fixed_prob=0.0, max_text_tokens=32)
    turns = (("What is it?", "A bus."), ("What colour?", "Red."))
    prompt, ids, mask, target = b.build_caption(tok, [turns, "A plain caption.", None], "Describe.", 48)
    end = tok.token_id("<|im_end|>")
    a1, a2 = tok.encode("A bus.") + [end], tok.encode("Red.") + [end]
    between = tok.encode(t.next_turn.replace("{instruction}", "What colour?"))
    want = a1 + between + a2
    assert ids[0, :len(want)].tolist() == want and int(mask[0].sum()) == len(want)
    assert target[0, :len(want)].tolist() == [True] * len(a1) + [False] * len(between) + [True] * len(a2)
    # the first question is the row's own, in the prompt; the plain caption keeps the config's question
    q0 = tok.encode("What is it?")
    assert prompt.input_ids[0, prompt.mask[0]].tolist()[-len(q0) - len(tok.encode("<|im_end|>\n<|im_start|>assistant\n")):][
        :len(q0)] == q0
    assert target[1].sum() == mask[1].sum() > 0 and not mask[2].any() and not target[2].any()


@pytest.mark.parametrize("family", ["harmon", "showo"])
def test_the_caption_loss_scores_only_the_targets(family):
    """Flipping the labels of seen-not-scored tokens leaves the loss as it is; scoring them too changes it."""
    from reca.models.adapter import CaptionBatch

    if family == "harmon":
        m = _harmon()
    else:
        from reca.models.showo import ShowoModel
        torch.manual_seed(0)
        m = ShowoModel(preset("showo-tiny").model, get_ops("torch"))
    tok, t = m.tokenizer, m.caption_template
    b = SampleBuilder(tok, t, m.num_visual_tokens, ["unused"], fixed_prob=0.0, max_text_tokens=32)
    turns = (("What is it?", "A bus."), ("What colour is the bus in the picture?", "Red."))
    prompt, ids, mask, target = b.build_caption(tok, [turns, turns], "Describe.", 48)
    und = torch.rand(2, 3, m.caption_views.und_size, m.caption_views.und_size) * 2 - 1
    loss = lambda tg: m(CaptionBatch(und, prompt, ids, mask, tg), "caption").loss  # noqa: E731
    with torch.no_grad():
        scored, everything = loss(target), loss(mask)
        out = m(CaptionBatch(und, prompt, ids, mask, target), "caption")
    assert not torch.allclose(scored, everything)
    assert out.metrics["caption_tokens"] == target.sum()


def test_harmon_tiny_trains_on_a_llava_file(tmp_path):
    from reca.engine.cli import main
    from reca.engine.metrics import read_metrics

    llava = _llava(tmp_path / "llava")
    run = tmp_path / "run"
    main(["train", "--preset", "harmon-tiny", "--out", str(run), "--steps", "4", "--quiet",
          "--set", f"mix.caption_source={llava}", "--set", "mix.cycle=recon,caption", "--set", "output.log_every=1"])
    rows = read_metrics(run)
    tokens = [r["caption/caption_tokens"] for r in rows if "caption/caption_tokens" in r]
    assert len(rows) == 4 and tokens and all(n > 0 for n in tokens), rows
    assert all(np.isfinite(r["loss"]) for r in rows)
