"""RecA sample builder: placeholders, instruction dropout, fixed shapes, no loss on the prompt."""
import re

import numpy as np
import pytest
import torch

from reca.engine.errors import UserError
from reca.engine.sample import SampleBuilder, load_instructions
from reca.models.adapter import PromptTemplate
from reca.models.tokenizer import tiny_tokenizer

HARMON = PromptTemplate(text="<|im_start|>user\n{image}\n{instruction}<|im_end|>\n<|im_start|>assistant\n")
BAGEL = PromptTemplate(text="<|vision_start|>{image}<|vision_end|><|im_start|>{instruction}<|im_end|>")


def _builder(template=HARMON, nv=37, prob=0.1, seed=0, max_text=64):
    tok = tiny_tokenizer()
    return SampleBuilder(tok, template, nv, load_instructions(), fixed_prob=prob, max_text_tokens=max_text, seed=seed), tok


@pytest.mark.parametrize("template", [HARMON, BAGEL], ids=["harmon", "bagel"])
def test_placeholder_count_equals_visual_tokens(template):
    builder, tok = _builder(template, nv=37)
    batch = builder.build(range(50))
    image_id = tok.token_id("<|image_pad|>")
    assert batch.input_ids.shape == (50, builder.length)
    assert ((batch.input_ids == image_id).sum(1) == 37).all()
    # placeholders are contiguous and sit where the template puts {image}
    prefix = tok.encode(template.text.split("{image}")[0])
    row = batch.input_ids[0].tolist()
    assert row[: len(prefix)] == prefix and row[len(prefix) : len(prefix) + 37] == [image_id] * 37


def test_padding_mask_and_fixed_length():
    builder, tok = _builder()
    batch = builder.build(range(64))
    pad = tok.token_id("<|endoftext|>")
    lengths = batch.mask.sum(1)
    assert lengths.unique().numel() > 1  # instructions differ in length...
    assert batch.input_ids.shape[1] == builder.length  # ...the batch shape does not
    for row, n in zip(batch.input_ids, lengths):
        assert (row[n:] == pad).all() and not (row[:n] == pad).any()
        assert int(n) <= builder.length


def test_instruction_dropout_rate():
    builder, tok = _builder(prob=0.1)
    n = 5000
    fixed = sum(builder.choose(p) == -1 for p in range(n))
    # binomial(5000, 0.1): std 21; 5 sigma either side
    assert abs(fixed - 0.1 * n) < 5 * np.sqrt(n * 0.1 * 0.9)
    fixed_ids = tok.encode("Generate an image.")
    rows = builder.build([p for p in range(200) if builder.choose(p) == -1])
    text = rows.input_ids[0, rows.mask[0]].tolist()
    suffix = tok.encode(HARMON.text.split("{instruction}")[1])
    assert text[-len(suffix) - len(fixed_ids) : -len(suffix)] == fixed_ids
    # visual tokens are kept when the instruction is the fixed one
    assert (rows.input_ids == tok.token_id("<|image_pad|>")).sum(1).eq(37).all()


def test_choices_are_pure_functions_of_seed_and_position():
    a, _ = _builder(seed=3)
    b, _ = _builder(seed=3)
    c, _ = _builder(seed=4)
    pos = list(range(100, 300))
    assert [a.choose(p) for p in pos] == [b.choose(p) for p in pos]
    assert [a.choose(p) for p in pos] != [c.choose(p) for p in pos]
    assert len({a.choose(p) for p in pos}) > 50  # the pool is really drawn from


def test_long_instructions_are_refused_never_cut(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("short one\n" + "word " * 500 + "\nanother\n")
    tok = tiny_tokenizer()
    with pytest.raises(UserError, match=r"instruction 2 of 3 is \d+ tokens .* past sample.max_text_tokens=16 .*'word word"):
        SampleBuilder(tok, HARMON, 5, load_instructions(str(f)), fixed_prob=0.0, max_text_tokens=16)
    fits = SampleBuilder(tok, HARMON, 5, ["short one", "another"], fixed_prob=0.0, max_text_tokens=16)
    assert all(len(p) <= 16 for p in fits._pool)


AUTHORS_FORMAT = """import os
os.makedirs("EXECUTED")  # would show if the file were run


def get_recon_prompt_list():
    return ["Describe every visual detail of this image",
            "Reproduce the picture: "
            "its colours, shapes and textures",
            "Describe every visual detail of this image",
            ]


def other():
    return ["not this one"]
"""


def test_authors_consts_py_is_read_as_a_literal_never_run(tmp_path, monkeypatch):
    """`--prompts consts.py` in the RecA authors' format: get_recon_prompt_list's literal list,
    duplicates kept (they weight the draw), adjacent literals joined; the file never runs."""
    monkeypatch.chdir(tmp_path)
    f = tmp_path / "consts.py"
    f.write_text(AUTHORS_FORMAT)
    got = load_instructions(str(f))
    assert got == ["Describe every visual detail of this image", "Reproduce the picture: its colours, shapes and textures",
                   "Describe every visual detail of this image"]
    assert not (tmp_path / "EXECUTED").exists()
    (tmp_path / "assign.py").write_text("PROMPTS = ['a', 'b', 'a']\n")
    assert load_instructions(str(tmp_path / "assign.py")) == ["a", "b", "a"]


@pytest.mark.parametrize("source,needle", [
    ("def get_recon_prompt_list():\n    return [f'{x}']\n", "element 1 of get_recon_prompt_list (line 2) is JoinedStr"),
    ("def get_recon_prompt_list():\n    return ['a', NAME]\n", "element 2 of get_recon_prompt_list (line 2) is Name"),
    ("def get_recon_prompt_list():\n    return [s for s in 'ab']\n", "found 0 (none)"),
    ("A = ['x']\nB = ['y']\n", "found 2 (A, B)"),
    ("def get_recon_prompt_list():\n    return [\n", "is not valid Python"),
    ("def get_recon_prompt_list():\n    return []\n", "is an empty list"),
])
def test_a_consts_py_that_is_not_a_literal_list_is_one_line(tmp_path, source, needle):
    f = tmp_path / "consts.py"
    f.write_text(source)
    with pytest.raises(UserError, match=re.escape(needle)):
        load_instructions(str(f))


def test_no_loss_on_prompt_positions():
    """The flow family's loss reads only the latent block: changing the target of prompt
    positions is impossible by construction, so check that perturbing the target changes the
    loss while the per-position loss map is zero over the whole prompt."""
    from reca.engine.presets import tiny
    from reca.models import build_model

    cfg = tiny().model
    torch.manual_seed(0)
    model = build_model(cfg)
    builder = SampleBuilder(model.tokenizer, model.template, model.num_visual_tokens, load_instructions())
    prompt = builder.build(range(2))
    x0 = torch.randn(2, model.latent_grid**2, model.gen_out.out_features)
    embeds = torch.randn(2, builder.length, cfg.llm.hidden_size, requires_grad=True)
    x_t = torch.randn_like(x0, requires_grad=True)
    pred = model.velocity(embeds, prompt, x_t, torch.rand(2))
    # the prediction covers exactly the generation tokens: one output per latent token
    assert pred.shape == x0.shape
    # and no output depends on padding: perturbing padded prompt positions changes nothing
    pad = ~prompt.mask
    embeds2 = embeds.detach().clone()
    embeds2[pad] += 100.0
    pred2 = model.velocity(embeds2, prompt, x_t, torch.rand(2) * 0 + 0.5)
    pred1 = model.velocity(embeds.detach(), prompt, x_t, torch.rand(2) * 0 + 0.5)
    torch.testing.assert_close(pred1, pred2, rtol=1e-5, atol=1e-5)


def test_reca_train_refuses_an_overlong_instruction_at_start(tmp_path, capsys):
    from reca.engine.cli import main

    f = tmp_path / "consts.py"
    f.write_text("def get_recon_prompt_list():\n    return ['short', '" + "word " * 100 + "']\n")
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--preset", "tiny", "--prompts", str(f), "--out", str(tmp_path / "run"), "--steps", "1", "--quiet"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 2 and len(lines) == 1
    assert "instruction 2 of 2 is" in lines[0] and "past sample.max_text_tokens=32" in lines[0], lines
    assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.parametrize("name,file", [
    ("harmon-0.5b", "Harmon/src/datasets/text2image/consts.py"), ("harmon-1.5b", "Harmon/src/datasets/text2image/consts.py"),
    ("openuni-b-512", "OpenUni/src/datasets/image2image/consts.py"),
    ("openuni-l-512", "OpenUni/src/datasets/image2image/consts.py"), ("bagel-7b-mot", "BAGEL/data/consts.py"),
    ("showo-1.3b-256", "Show-o/training/consts.py"), ("showo-1.3b-512", "Show-o/training/consts.py")])
def test_each_real_preset_names_the_authors_instruction_file(name, file):
    from reca.engine.presets import PRESETS

    assert f"--prompts {file}" in " ".join(PRESETS[name].__doc__.split())


def test_export_never_replaces_an_earlier_export_in_silence_and_sample_refuses_zero_steps(tmp_path, capsys):
    from reca.engine.cli import main

    run = tmp_path / "run"
    main(["train", "--preset", "tiny", "--out", str(run), "--steps", "1", "--quiet", "--set", "output.preview_images=0"])
    main(["export", str(run), "--to", str(tmp_path / "out")])
    first = (tmp_path / "out" / "model.safetensors").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(run), "--to", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "already holds" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == first
    main(["export", str(run), "--to", str(tmp_path / "out"), "--overwrite"])
    with pytest.raises(SystemExit) as exit_:
        main(["sample", str(run), "--prompt", "a cat", "--steps", "0", "--out", str(tmp_path / "s")])
    assert exit_.value.code == 2 and "--steps and --num must be at least 1" in capsys.readouterr().err


TEXT_PROMPTS = {  # reca sample --prompt: each family's own text-to-image prompt (model.text_prompt)
    "tiny": "<|im_start|>{instruction}<|im_end|>",
    "harmon-tiny": "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n",
    "openuni-tiny": "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n<img>",
    "showo-tiny": "<|mmu|><|endoftext|>USER: \n {instruction} ASSISTANT:<|endoftext|>",
}


def test_text_prompts_are_the_families_own():
    """Text-only sampling lays out the adapter's `text_prompt` (the engine holds no list of the
    built-in families' markers); without one, the RecA template with `{image}` removed; one
    without `{instruction}` is one line."""
    import reca
    from reca.engine.generate import text_prompt
    from reca.models import build_model

    for name, layout in TEXT_PROMPTS.items():
        cfg = reca.preset(name)
        with torch.device("meta"):
            model = build_model(cfg.model)
        tok = model.tokenizer
        head, tail = layout.split("{instruction}")
        assert text_prompt(model, cfg, ["a red bus"]).input_ids[0].tolist() == (
            tok.encode(head) + tok.encode("a red bus") + tok.encode(tail)), name

    class Plain:  # an adapter without text_prompt
        tokenizer, template = tiny_tokenizer(), PromptTemplate(text="<|im_start|>{image}{instruction}<|im_end|>")

    cfg = reca.preset("tiny")
    tok = tiny_tokenizer()
    assert text_prompt(Plain(), cfg, ["a cat"]).input_ids[0].tolist() == (
        tok.encode("<|im_start|>") + tok.encode("a cat") + tok.encode("<|im_end|>"))
    Plain.text_prompt = "<|im_start|>no slot<|im_end|>"
    with pytest.raises(UserError, match="instruction"):
        text_prompt(Plain(), cfg, ["a cat"])
