"""Janus family on transformers' own JanusForConditionalGeneration: the published shapes' counts
per part (meta device), sampling against transformers' generate(generation_mode="image") code for
code, the recon and caption losses against transformers' forward, the unconditional rows, which
parts learn, the release layout in and out, and the CLI path (train, resume, sample, export)."""
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from reca.engine.build import seeded_model
from reca.engine.cli import main
from reca.engine.config import apply_overrides
from reca.engine.presets import preset
from reca.engine.sample import SampleBuilder, load_instructions
from reca.kernels import get_ops
from reca.models.adapter import CaptionBatch, PromptBatch, ReconBatch, SampleBatch
from reca.models.janus import JanusModel


def _model(**kw) -> JanusModel:
    cfg = preset("janus-tiny").model
    torch.manual_seed(0)
    return JanusModel(dataclasses.replace(cfg, **kw))


def _builder(m, template=None, text=16) -> SampleBuilder:
    pool = [s for s in load_instructions() if len(m.tokenizer.encode(s)) <= text]  # short: fast; never cut
    return SampleBuilder(m.tokenizer, template or m.template, m.num_visual_tokens, pool, max_text_tokens=text, seed=0)


def _images(b=2, seed=0) -> torch.Tensor:
    return torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _spread(m) -> None:
    """Weights that vary the codes (at transformers' 0.02 a tiny model emits one code over and
    over): embedding tables at 1, the LLM's matrices at 2 / sqrt(fan-in), the rest at 1 / sqrt(fan-in)."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2 and "vision_model" not in name and "vqmodel" not in name:
                p.normal_(0, 1.0 if "embed" in name else (2 if ".layers." in name else 1) * p.shape[1] ** -0.5)


def test_reca_info_prints_the_published_shapes_counts(capsys):
    """Janus-Pro-1B / -7B as released. Sources of the shapes: transformers' configuration_janus.py
    (JanusVisionConfig defaults = SigLIP-Large-Patch16-384: 1024 wide, 24 layers, 16 heads, MLP
    ratio 4, 384 px / 16; aligner depth 2; JanusVQVAEConfig defaults = VQ-16: codebook 16,384 x 8,
    latent 256, base 128, multipliers (1, 1, 2, 2, 4), 2 ResNet blocks), convert_janus_weights_to_hf.py
    (projection_dim and image_token_embed_dim = the aligners' n_embed = the LLM width; text_config
    from the original language_config), the releases' text_config (deepseek-community/Janus-Pro-1B:
    2048 wide, MLP 5632, 24 layers, 16 heads, vocabulary 102,400; Janus-Pro-7B's language_config
    gives 30 layers and 102,400 and LlamaConfig's defaults the rest: 4096, 11008, 32 heads), and the
    Janus-Pro report's Table 1 (embedding 2048 / 4096, 16 / 32 heads, 24 / 30 layers)."""
    def layer(d, ff):  # q, k, v, o (no bias, as many KV heads as heads) + gate, up, down + 2 RMSNorms
        return 4 * d * d + 3 * d * ff + 2 * d

    # SigLIP-L/16-384: 24 x (q, k, v, o with biases; MLP 1024 -> 4096 -> 1024; 2 LayerNorms), the
    # 16 x 16 patch embedding, 576 positions, the post-LayerNorm
    siglip = 24 * (4 * (1024**2 + 1024) + (1024 * 4096 + 4096) + (4096 * 1024 + 1024) + 2 * 2048) \
        + (3 * 16 * 16 * 1024 + 1024) + 576 * 1024 + 2048
    assert siglip == 303_688_704
    vq = 71_883_403  # transformers' JanusVQVAE at its defaults (LlamaGen's VQ-16, "72M")
    want = {
        "janus-pro-1b": {"language_model.layers": 24 * layer(2048, 5632), "language_model.embed_tokens": 102_400 * 2048,
                         "lm_head": 102_400 * 2048, "aligner": (1024 * 2048 + 2048) + (2048 * 2048 + 2048),
                         "generation_head": (2048 * 2048 + 2048) + (2048 * 16_384 + 16_384),
                         "generation_aligner": (8 * 2048 + 2048) + (2048 * 2048 + 2048),
                         "generation_embeddings": 16_384 * 8, "total": 2_076_636_811},
        "janus-pro-7b": {"language_model.layers": 30 * layer(4096, 11008), "language_model.embed_tokens": 102_400 * 4096,
                         "lm_head": 102_400 * 4096, "aligner": (1024 * 4096 + 4096) + (4096 * 4096 + 4096),
                         "generation_head": (4096 * 4096 + 4096) + (4096 * 16_384 + 16_384),
                         "generation_aligner": (8 * 4096 + 4096) + (4096 * 4096 + 4096),
                         "generation_embeddings": 16_384 * 8, "total": 7_407_773_323},
    }
    assert want["janus-pro-7b"]["language_model.layers"] == 6_071_500_800
    for name, parts in want.items():
        main(["info", "--preset", name])
        out = capsys.readouterr().out
        printed = {line.strip().split(": ")[0]: int(line.split(": ")[1].replace(",", ""))
                   for line in out.splitlines() if line.startswith("    ")}
        assert printed["vision_model (frozen)"] == siglip and printed["vqmodel (frozen)"] == vq, out
        for part, n in parts.items():
            if part != "total":
                assert printed[part] == n, (name, part)
        total = next(line for line in out.splitlines() if line.strip().startswith("total"))
        assert f"{parts['total']:,}" in total
        assert "384 px -> 576 visual tokens" in out and "384 px -> 576 generation tokens" in out
    with torch.device("meta"):
        m = JanusModel(preset("janus-pro-7b").model)
    frozen = {n.split(".")[2] for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen == {"vision_model", "vqmodel"}
    assert m.janus.lm_head.weight is not m.lm.embed_tokens.weight  # Janus-Pro's head is its own


def _generate_reference(m, ids: torch.Tensor) -> torch.Tensor:
    """transformers' own image generation, greedy, CFG at the model's scale. The cache is given:
    transformers 5.17's generate fails preparing its own (_prepare_static_cache lacks
    prefill_chunk_size); this is the one generate would make (prompt + N positions)."""
    import inspect

    from transformers import GenerationConfig, StaticCache

    gc = GenerationConfig(guidance_scale=m.cfg.guidance_scale, do_sample=False, bos_token_id=m.bos_id,
                          pad_token_id=m.pad_id, generation_kwargs={"boi_token_id": m.boi_id}, max_new_tokens=m.num_codes)
    key = "cache" if "cache" in inspect.signature(type(m.lm).forward).parameters else "past_key_values"
    cache = StaticCache(config=m.janus.config.get_text_config(), max_cache_len=ids.shape[1] + m.num_codes)
    return m.janus.generate(ids, attention_mask=torch.ones_like(ids), generation_mode="image", generation_config=gc,
                            **{key: cache})


def _text_rows(m, texts, same_length=True):
    rows = [m.tokenizer.encode(f"<｜begin▁of▁sentence｜><|User|>: {t}\n\n<|Assistant|>:<begin_of_image>") for t in texts]
    assert not same_length or len({len(r) for r in rows}) == 1
    return rows


def test_sample_equals_transformers_generate_code_for_code():
    """Greedy with CFG (scale 5): the prompt `reca sample --prompt` lays out (Janus's own
    text-to-image prompt) sampled by the model gives transformers' generate(generation_mode=
    "image") codes exactly, on the same weights and ids; guidance changes them (so the
    unconditional rows are in play)."""
    from reca.engine.generate import text_prompt

    m = _model(sample_temperature=0.0).eval()
    _spread(m)
    texts = ["a red bus on a bridge", "two cats asleep in the"]
    prompt = text_prompt(m, preset("janus-tiny"), texts)
    for ids, t in zip(prompt.input_ids, texts):
        assert m.tokenizer.decode(ids.tolist()) == f"<｜begin▁of▁sentence｜><|User|>: {t}\n\n<|Assistant|>:<begin_of_image>"
    assert prompt.mask.all()  # one length with the tiny BPE: no padding for transformers either
    mine = m.generate_codes(SampleBatch(None, prompt, 1))
    ref = _generate_reference(m, prompt.input_ids)
    assert torch.equal(mine, ref), (mine, ref)
    assert mine.unique().numel() > 3  # not one code repeated
    images = m(SampleBatch(None, prompt, 1), "sample")
    assert images.shape == (2, 3, 32, 32) and torch.equal(images, m.janus.model.vqmodel.decode(ref).clamp(-1, 1))
    m.cfg = dataclasses.replace(m.cfg, guidance_scale=1.0)
    assert not torch.equal(m.generate_codes(SampleBatch(None, prompt, 1)), ref)


def test_rows_of_different_lengths_sample_as_they_do_alone():
    """A batch's shorter prompt is left-padded for sampling, its positions counting its own
    tokens: each row gets the codes it gets alone (where transformers would shift its positions)."""
    m = _model(sample_temperature=0.0).eval()
    _spread(m)
    rows = _text_rows(m, ["a dog", "green fields at dawn under a pale sky"], same_length=False)
    p = max(map(len, rows)) + 3
    ids = torch.full((2, p), m.pad_id)
    mask = torch.zeros(2, p, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), True
    from reca.models.janus.sampling import sample_codes

    both = sample_codes(m, m.lm.embed_tokens(ids), PromptBatch(ids, mask))
    for i, r in enumerate(rows):
        alone = torch.tensor([r])
        assert torch.equal(both[i:i + 1], sample_codes(m, m.lm.embed_tokens(alone), PromptBatch(alone, alone > -1)))
    assert torch.equal(both[1:], _generate_reference(m, torch.tensor(rows[1:])))


def _recon(m, b=3):
    """b images and prompts of b different lengths (right-padded to one P)."""
    sb = _builder(m)
    by_length = {len(sb.ids(sb.choose(pos))): pos for pos in range(200)}
    x = _images(b)
    return ReconBatch(x, x, sb.build(sorted(by_length.values())[:b]))


def test_recon_loss_equals_transformers_forward_per_row():
    """The teacher-forced loss of a right-padded batch = the mean over rows of transformers'
    own forward on each row's unpadded sequence (prompt with its visual prompt, then the codes'
    generation embeddings), the generation head's logits at the N positions before each code."""
    m = _model(cfg_dropout=0.0)
    batch = _recon(m)
    assert batch.prompt.mask.sum(1).unique().numel() > 1  # rows of different lengths
    out = m(batch, "recon", generator=torch.Generator().manual_seed(0))
    codes = m.make_target(batch.gen)
    visual = m.encode_visual_prompt(batch.und)
    ces = []
    for row in range(3):
        n_valid = int(batch.prompt.mask[row].sum())
        ids = batch.prompt.input_ids[row:row + 1, :n_valid]
        embeds = m.lm.embed_tokens(ids).masked_scatter((ids == m.image_token_id)[..., None], visual[row:row + 1])
        full = torch.cat([embeds, m.janus.prepare_embeddings_for_image_generation(codes[row:row + 1, :-1])], 1)
        hidden = m.janus.model(inputs_embeds=full).last_hidden_state
        logits = m.janus.model.generation_head(hidden[:, n_valid - 1:])
        ces.append(F.cross_entropy(logits[0], codes[row], reduction="none"))
    torch.testing.assert_close(out.loss, torch.cat(ces).mean(), rtol=1e-5, atol=1e-6)


def test_unconditional_rows_drop_the_prompt_and_its_visual_prompt():
    m = _model(cfg_dropout=0.999)
    batch = _recon(m)
    ids = m.unconditional(batch.prompt.input_ids)
    kept = ids != m.pad_id
    assert (ids[kept] == m.bos_id).sum() == 3 and (ids[kept] == m.boi_id).sum() == 6  # the image's and the last
    a = m(batch, "recon", generator=torch.Generator().manual_seed(0))
    other = ReconBatch(_images(3, seed=5), batch.gen, batch.prompt)  # another visual prompt, the same target
    b = m(other, "recon", generator=torch.Generator().manual_seed(0))
    assert a.metrics["unconditional"] == 1 and torch.equal(a.loss, b.loss)
    m.cfg = dataclasses.replace(m.cfg, cfg_dropout=0.0)
    assert not torch.equal(m(other, "recon").loss, m(batch, "recon").loss)


def test_which_parts_learn_and_the_caption_loss():
    """recon: the LLM, the understanding aligner (the visual prompt's path) and the generation
    side, never SigLIP or the VQ model; caption: lm_head (tied: the embedding table), never the
    generation head; its loss is transformers' LM logits' cross-entropy on the answer."""
    m = _model(cfg_dropout=0.0)
    m(_recon(m), "recon").loss.backward()
    learnt = {n.split(".")[2] for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert learnt == {"language_model", "aligner", "generation_embeddings", "generation_aligner", "generation_head"}
    m.zero_grad(set_to_none=True)
    cb = _builder(m, m.caption_template)
    prompt, ids, mask, target = cb.build_caption(m.tokenizer, ["a red square", "a blue sky"], "Describe it.", 8)
    x = _images(2)
    out = m(CaptionBatch(x, prompt, ids, mask, target), "caption")
    out.loss.backward()
    grads = {n: p.grad for n, p in m.named_parameters()}
    assert grads["janus.model.language_model.embed_tokens.weight"] is not None  # lm_head is this table (tied)
    assert all(grads[n] is None for n in grads if "generation_" in n or "vision_model" in n or "vqmodel" in n)
    visual = m.encode_visual_prompt(x)
    ces = []
    for row in range(2):
        n_valid, n_answer = int(prompt.mask[row].sum()), int(mask[row].sum())
        seq = torch.cat([prompt.input_ids[row, :n_valid], ids[row, :n_answer]])[None]
        embeds = m.lm.embed_tokens(seq).masked_scatter((seq == m.image_token_id)[..., None], visual[row:row + 1])
        logits = m.janus(inputs_embeds=embeds).logits[0, n_valid - 1:-1]
        ces.append(F.cross_entropy(logits, ids[row, :n_answer], reduction="none"))
    torch.testing.assert_close(out.loss, torch.cat(ces).mean(), rtol=1e-5, atol=1e-6)
    assert ids[0, int(mask[0].sum()) - 1] == m.eos_id  # an answer ends with <｜end▁of▁sentence｜>


def test_a_tied_preset_refuses_a_release_with_its_own_head(tmp_path, capsys):
    """Janus-Pro's releases hold an lm_head apart from the embedding table; the tied tiny preset
    refuses it in one line (transformers would warn and untie), --set model.tie_word_embeddings=false
    loads it."""
    cfg = apply_overrides(preset("janus-tiny"), ["model.tie_word_embeddings=false"])
    donor = seeded_model(cfg, get_ops("torch"), torch.device("cpu"))
    with torch.no_grad():
        donor.janus.lm_head.weight.normal_()
    donor.export(str(tmp_path / "w" / "model.safetensors"))
    with pytest.raises(SystemExit) as e:
        main(["train", "--preset", "janus-tiny", "--init-from", str(tmp_path / "w"), "--out", str(tmp_path / "run"),
              "--steps", "1", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "tie_word_embeddings=false" in err, err
    loaded = seeded_model(apply_overrides(cfg, [f"train.init_from={tmp_path / 'w'}"]), get_ops("torch"),
                          torch.device("cpu"))
    assert torch.equal(loaded.janus.lm_head.weight, donor.janus.lm_head.weight)


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.mark.integration  # a whole program: once, not again in the compat tier
def test_cli_trains_resumes_samples_and_exports_a_transformers_release(tmp_path):
    """The user's path, `reca train --preset janus-tiny --data demo` (loss falls), `--resume`,
    `reca sample` (text and image), `reca export`: a directory transformers' from_pretrained
    loads with the trained weights, and `--init-from` reads back."""
    from transformers import JanusForConditionalGeneration

    run = tmp_path / "run"
    sets = ["data.batch_size=4", "optim.warmup_steps=2", "optim.lr=3e-3", "output.log_every=1",
            "output.preview_images=0", "output.tensorboard=false"]
    main(["train", "--quiet", "--preset", "janus-tiny", "--data", "demo", "--steps", "10", "--out", str(run),
          *(f"--set={s}" for s in sets)])
    losses = [r["loss"] for r in _rows(run)]  # from ln(256) = 5.545, the codebook's uniform guess
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    main(["train", "--quiet", "--resume", str(run), "--steps", "12"])
    assert [r["step"] for r in _rows(run)] == list(range(1, 13))
    main(["sample", str(run), "--prompt", "a red bus", "--num", "2", "--out", str(tmp_path / "s")])
    photo = tmp_path / "photo.png"
    from PIL import Image

    Image.new("RGB", (48, 40), (200, 30, 30)).save(photo)
    main(["sample", str(run), "--image", str(photo), "--out", str(tmp_path / "s")])
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["photo.png", "text_00.png", "text_01.png"]
    main(["export", str(run), "--to", str(tmp_path / "release")])
    from reca.engine.generate import load_model

    _, trained = load_model(run=str(run), device="cpu")
    hf = JanusForConditionalGeneration.from_pretrained(str(tmp_path / "release"))
    theirs = hf.state_dict()
    for key, value in trained.janus.state_dict().items():
        assert torch.equal(theirs[key], value), key
    again = seeded_model(apply_overrides(preset("janus-tiny"), [f"train.init_from={tmp_path / 'release'}"]),
                         get_ops("torch"), torch.device("cpu"))
    for key, value in trained.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    assert "agrees with the preset" in again.init_from_report


def test_engine_trains_recon_and_image_to_text_in_one_step(tmp_path):
    """The real presets' mix through the engine (janus shares its LLM: image-to-text beside
    RecA): one step of recon and caption micro-batches, each loss logged; the caption images are
    padded to a square (Janus's understanding input), the recon views one square crop."""
    from PIL import Image

    from reca.engine.metrics import read_metrics
    from reca.engine.train import train

    assert preset("janus-pro-7b").mix.cycle == ("recon", "caption")
    m = _model()
    assert m.caption_views.und_resize == "pad" and m.views.same_pixels()
    root = tmp_path / "captioned"
    root.mkdir()
    for i in range(2):
        Image.new("RGB", (40, 24), (40 * i, 180, 60)).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"a flat green field, shade {i}")
    cfg = apply_overrides(preset("janus-tiny"), [
        f"output.dir={tmp_path / 'run'}", "output.tensorboard=false", "output.preview_images=0", "data.batch_size=2",
        "train.steps=1", "mix.cycle=recon,caption", "optim.grad_accum=2", "output.log_every=1",
        f"mix.caption_source={root}"])
    train(cfg, quiet=True)
    (row,) = read_metrics(cfg.output.dir)
    assert row["loss"] == pytest.approx((row["loss/recon"] + row["loss/caption"]) / 2, rel=1e-5)
    assert row["caption/caption_tokens"] > 0
