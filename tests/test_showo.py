"""Show-o family: vocabulary layout, real-size counts (meta device), masks against the public
code's rules, MaskGIT masking, the loss against materialised logits, which parts learn, weights
round trip, sampling, the VQ variant."""
import math

import pytest
import torch
import torch.nn.functional as F

from reca.engine.sample import SampleBuilder, load_instructions
from reca.models.adapter import CaptionBatch, ReconBatch, SampleBatch
from reca.models.showo import ClipShape, CodecConfig, PhiShape, ShowoConfig, ShowoModel
from reca.models.showo.vocab import VocabLayout


def _tiny(**kw) -> ShowoConfig:
    return ShowoConfig(llm=PhiShape(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, max_position=512),
                       clip=ClipShape(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, image_size=16,
                                      patch_size=8),
                       codec=CodecConfig(kind="patch", patch=4), image_size=16, **kw)


def _fitting(model, text: int) -> list[str]:
    """The bundled instructions that fit `text` tokens (a short prompt keeps these tests fast;
    a longer instruction would be refused, never cut)."""
    return [s for s in load_instructions() if len(model.tokenizer.encode(s)) <= text]


def _batch(model, b=2, seed=0, text=12):
    sb = SampleBuilder(model.tokenizer, model.template, model.num_visual_tokens, _fitting(model, text),
                       max_text_tokens=text, seed=seed)
    g = torch.Generator().manual_seed(seed)
    gen = torch.rand(b, 3, model.cfg.image_size, model.cfg.image_size, generator=g) * 2 - 1
    und = F.interpolate(gen, size=model.views.und_size, mode="bilinear") if model.views.und_size != gen.shape[-1] else gen
    return ReconBatch(und, gen, sb.build(list(range(b)))), sb


def test_vocabulary_layout_of_show_o():
    lay = VocabLayout(text=50295, codebook=8192)
    assert (lay.code_offset, lay.mask_id, lay.size) == (50305, 58497, 58498)


def test_tokenizer_specials_follow_the_text_vocabulary():
    m = ShowoModel(_tiny())
    t, text = m.tokenizer, m.layout.text
    assert [t.token_id(s) for s in ("[PAD]", "<|soi|>", "<|eoi|>", "<|t2i|>", "<|mmu|>")] == \
        [text, text + 1, text + 2, text + 5, text + 6]
    assert t.token_id("<|mask|>") == m.layout.size - 1 == m.image_token_id
    ids = t.encode("<|mmu|>a<|soi|>")
    assert ids[0] == text + 6 and ids[-1] == text + 1 and len(ids) >= 3


def test_real_size_counts_on_meta():
    with torch.device("meta"):
        m = ShowoModel(ShowoConfig(llm_vocab_size=50295, codec=CodecConfig(kind="magvit2"), image_size=512))
    parts = m.parameter_breakdown()
    layer = 4 * (2048 * 2048 + 2048) + (2048 * 8192 + 8192) + (8192 * 2048 + 2048) + 2 * 2048
    assert layer == 50_354_176  # FAMILY_FACTS B9: 50.35M
    qk = 2 * (64 + 64)  # q/k LayerNorm weight and bias over head_dim 64 (FAMILY_FACTS B1: on in Show-o)
    assert parts["showo.model.layers"] == 24 * (layer + qk)
    assert parts["showo.model.embed_tokens"] == 58498 * 2048
    assert parts["showo.lm_head"] == 58498 * 2048 + 58498  # biased head
    assert parts["showo (LLM)"] == 1_448_176_770  # B9: 1.448B with the 6,144 q/k LayerNorm parameters
    names = [n for n, _ in m.named_parameters() if "_layernorm" in n and "self_attn" in n]
    assert len(names) == 96 and "showo.model.layers.23.self_attn.k_layernorm.bias" in names
    assert parts["mm_projector"] == 6_295_552  # 6.30M
    assert m.num_visual_tokens == 576 and m.num_codes == 1024 and m.layout.size == 58498
    assert m.vq.codebook_size == 8192 and m.vq.downsample == 16
    frozen = {n.split(".")[0] for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen == {"clip", "vq"}


def _upstream_clip_recon_mask(seq_ids, n_codes, n_visual, pad_id):
    """create_attention_mask_for_mmu_vit_recon (RecA Show-o/training/prompting_utils.py), read:
    causal; columns 2 .. 2 + 576 seen by all; the last 1 + N .. -1 block bidirectional; pad
    columns hidden. seq_ids: ids of the spliced sequence [L]."""
    L = len(seq_ids)
    m = torch.tril(torch.ones(L, L, dtype=torch.bool))
    m[:, 2:2 + n_visual] = True
    m[L - 1 - n_codes:L - 1, L - 1 - n_codes:L - 1] = True
    m[:, seq_ids == pad_id] = False
    return m


def test_clip_recon_mask_matches_the_public_rule():
    m = ShowoModel(_tiny())
    batch, _ = _batch(m)
    codes = m.make_target(batch.gen)
    ids, valid, block = m.sequence(batch.prompt, codes)
    p = batch.prompt.mask.shape[1]
    seen = (ids == m.image_token_id) & (torch.arange(ids.shape[1]) < p)
    mask = m.omni_mask(valid, block, seen)[:, 0]
    for row in range(ids.shape[0]):
        ref = _upstream_clip_recon_mask(ids[row], m.num_codes, m.num_visual_tokens, m.tokenizer.token_id("[PAD]"))
        got = mask[row] & ~torch.eye(ids.shape[1], dtype=torch.bool)
        ref &= ~torch.eye(ids.shape[1], dtype=torch.bool)
        assert torch.equal(got, ref)
        assert (ids[row, 2:2 + m.num_visual_tokens] == m.image_token_id).all()  # visual tokens at 2 .. 577


def test_maskgit_masking_counts_and_labels():
    m = ShowoModel(_tiny())
    ids = torch.randint(m.layout.code_offset, m.layout.mask_id, (64, 16))
    g = torch.Generator().manual_seed(3)
    inputs, labels, ratio = m.mask_codes(ids, g)
    masked = inputs == m.layout.mask_id
    assert torch.equal(masked.sum(1), (16 * ratio).round().clamp_min(1).long())
    assert torch.equal(labels[masked], ids[masked]) and (labels[~masked] == -100).all()
    assert torch.equal(inputs[~masked], ids[~masked])
    again = m.mask_codes(ids, torch.Generator().manual_seed(3))[0]
    assert torch.equal(again, inputs)
    assert 0.3 < ratio.mean() < 0.9  # E[cos(pi t / 2)] = 2 / pi


def test_recon_loss_equals_materialised_logits():
    torch.manual_seed(0)
    m = ShowoModel(_tiny())
    with torch.no_grad():
        m.showo.lm_head.bias.normal_()  # the bias must reach the loss
    batch, _ = _batch(m)
    out = m(batch, "recon", generator=torch.Generator().manual_seed(1))
    # reference: Phi's own forward (logits with the bias), CE at the code positions, no shift
    codes = m.make_target(batch.gen)
    inputs, labels, _ = m.mask_codes(codes, torch.Generator().manual_seed(1))
    with torch.no_grad():
        embeds = m.conditioning(batch.prompt.input_ids, m.encode_visual_prompt(batch.und))
    ids, valid, block = m.sequence(batch.prompt, inputs)
    p = batch.prompt.mask.shape[1]
    seen = (ids == m.image_token_id) & (torch.arange(ids.shape[1]) < p)
    full = torch.cat([embeds, m.showo.model.embed_tokens(ids[:, p:])], 1)
    logits = m.showo(inputs_embeds=full, attention_mask=m.omni_mask(valid, block, seen)).logits
    n = m.num_codes
    ref = F.cross_entropy(logits[:, -1 - n:-1].flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-5)


def test_which_parts_learn_from_each_objective():
    m = ShowoModel(_tiny())
    batch, sb = _batch(m)
    m.zero_grad(set_to_none=True)
    m(batch, "recon", generator=torch.Generator().manual_seed(0)).loss.backward()
    grads = {n: p.grad for n, p in m.named_parameters()}
    assert all(grads[n] is None for n in grads if n.startswith(("clip.", "vq.")))
    # public CLIP script: recon embeds built under no_grad
    assert grads["showo.model.embed_tokens.weight"] is None and grads["mm_projector.0.weight"] is None
    assert grads["showo.lm_head.bias"] is not None and grads["showo.model.layers.0.mlp.fc1.weight"] is not None
    cb = SampleBuilder(m.tokenizer, m.caption_template, m.num_visual_tokens, _fitting(m, 12), max_text_tokens=12)
    prompt, ids, mask, _ = cb.build_caption(m.tokenizer, ["a red square", None], "Describe it.", 8)
    m.zero_grad(set_to_none=True)
    out = m(CaptionBatch(batch.und, prompt, ids, mask), "caption")
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.metrics["caption_tokens"] > 0
    assert m.mm_projector[0].weight.grad is not None and m.showo.model.embed_tokens.weight.grad is not None
    assert all(p.grad is None for p in m.clip.parameters())


def test_frozen_parts_have_no_optimizer_state():
    m = ShowoModel(_tiny())
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    batch, _ = _batch(m)
    m(batch, "recon", generator=torch.Generator().manual_seed(0)).loss.backward()
    opt.step()
    held = {id(p) for p in opt.state}
    assert not any(id(p) in held for p in m.clip.parameters())
    assert all(not p.requires_grad for p in m.clip.parameters())


def test_recon_loss_falls_on_one_batch():
    torch.manual_seed(0)
    m = ShowoModel(_tiny())
    batch, _ = _batch(m, b=4)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(15):
        out = m(batch, "recon", generator=torch.Generator().manual_seed(step % 3))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_sample_is_deterministic_and_in_range():
    m = ShowoModel(_tiny()).eval()
    batch, sb = _batch(m)
    sample = SampleBatch(batch.und, sb.build([0, 1], fixed=True), 3)
    a = m(sample, "sample", generator=torch.Generator().manual_seed(0))
    b = m(sample, "sample", generator=torch.Generator().manual_seed(0))
    assert a.shape == (2, 3, 16, 16) and torch.equal(a, b) and a.abs().max() <= 1
    text_only = m(SampleBatch(None, sample.prompt, 2), "sample", generator=torch.Generator().manual_seed(0))
    assert text_only.shape == a.shape


def test_patch_codebook_reconstructs_photographs_closely():
    import skimage.data

    m = ShowoModel(_tiny())
    x = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1).float()[None] / 127.5 - 1
    x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True)
    rec = m.vq.decode_codes(m.vq.encode_codes(x))
    err = (rec - x).pow(2).mean()
    assert rec.shape == x.shape and m.vq.codebook_size == 256
    assert err < 0.15 * x.var()  # viewable: 0.039 against a variance of 0.31 (the fit over all photographs: 0.013)


def test_vq_variant_left_pads_and_trains_embeddings():
    m = ShowoModel(_tiny(visual="vq", vq_input_size=8, recon_embed_grad=True))
    assert not hasattr(m, "clip") and not hasattr(m, "mm_projector") and m.num_visual_tokens == 4
    batch, _ = _batch(m)
    prompt = m.layout_prompt(batch.prompt)
    n_valid = batch.prompt.mask.sum(1)
    for row in range(2):
        assert torch.equal(prompt.input_ids[row, -int(n_valid[row]):], batch.prompt.input_ids[row, :int(n_valid[row])])
        assert not prompt.mask[row, : prompt.mask.shape[1] - int(n_valid[row])].any()
    ids, valid, block = m.sequence(prompt, m.make_target(batch.gen))
    soi = m.tokenizer.token_id("<|soi|>")
    first = int((ids[0] == soi).nonzero()[0])
    assert (block[0, first:first + m.num_visual_tokens + 2] == 1).all()
    assert (block[0, -m.num_codes - 2:] == 2).all() and (block[0, :first] == 0).all()
    out = m(batch, "recon", generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert m.showo.model.embed_tokens.weight.grad is not None


def test_weights_round_trip_in_show_o_layout(tmp_path):
    a, b = ShowoModel(_tiny()), ShowoModel(_tiny())
    a.export(str(tmp_path / "model.safetensors"))
    from safetensors.torch import load_file
    keys = set(load_file(str(tmp_path / "model.safetensors")))
    assert "showo.lm_head.bias" in keys and "mm_projector.2.weight" in keys
    layers = a.cfg.llm.num_layers
    assert {f"showo.model.layers.{i}.self_attn.{q}_layernorm.{w}" for i in range(layers) for q in "qk"
            for w in ("weight", "bias")} <= keys  # Show-o's q/k LayerNorms are exported
    assert not any(k.startswith(("clip.", "vq.")) for k in keys)
    loaded = b.load_pretrained(str(tmp_path))
    assert loaded["model.safetensors"] == len(keys)
    for k in keys:
        assert torch.equal(a.state_dict()[k], b.state_dict()[k]), k


def test_phi_directory_fills_the_text_rows(tmp_path):
    from safetensors.torch import save_file
    from transformers import PhiForCausalLM

    m = ShowoModel(_tiny())
    phi = PhiForCausalLM(m.cfg.llm.hf_config(m.layout.text + 5))  # a smaller text vocabulary
    (tmp_path / "phi").mkdir()
    save_file({k: v.contiguous() for k, v in phi.state_dict().items()}, str(tmp_path / "phi" / "model.safetensors"))
    before = m.showo.model.embed_tokens.weight[m.layout.text:].clone()
    m.load_pretrained(str(tmp_path))
    t = m.layout.text
    assert torch.equal(m.showo.model.embed_tokens.weight[:t], phi.model.embed_tokens.weight[:t])
    assert torch.equal(m.showo.lm_head.bias[:t], phi.lm_head.bias[:t])
    assert torch.equal(m.showo.model.embed_tokens.weight[t:], before)
    assert torch.equal(m.showo.model.layers[1].mlp.fc2.weight, phi.model.layers[1].mlp.fc2.weight)


def test_presets_build_and_count_on_meta():
    from reca.engine.bench.info import describe
    from reca.engine.presets import preset

    info = describe(preset("showo-1.3b-512"))
    assert info["family"] == "showo" and info["modules"]["showo"]["parameters"] == 1_448_176_770
    assert info["modules"]["mm_projector"] == {"parameters": 6_295_552, "trainable": True}
    assert not info["modules"]["clip"]["trainable"] and not info["modules"]["vq"]["trainable"]
    small = describe(preset("showo-1.3b-256"))
    assert small["parameters"] == info["parameters"] and small["shapes"]["batch"] == 4
    tiny = preset("showo-tiny")
    assert tiny.model.visual == "clip" and tiny.sample.fixed_prob == 0.0


def test_engine_trains_showo_tiny_with_image_to_text_every_step(tmp_path):
    """The public recipe's mix through the engine: recon and caption in every optimizer step
    (mix.cycle recon,caption, accumulation 2: each weighted 1/2 by the engine's averaging)."""
    from PIL import Image

    from reca.engine.config import apply_overrides
    from reca.engine.metrics import read_metrics
    from reca.engine.presets import showo_tiny
    from reca.engine.train import train

    root = tmp_path / "captioned"
    root.mkdir()
    for i in range(4):
        Image.new("RGB", (40, 32), (40 * i, 180, 60)).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"a flat green field, shade {i}")
    cfg = apply_overrides(showo_tiny(), [f"output.dir={tmp_path / 'run'}", "output.tensorboard=false",
                                         "output.preview_images=0", "data.batch_size=2", "train.steps=1",
                                         "mix.cycle=recon,caption", "optim.grad_accum=2", "output.log_every=1",
                                         f"mix.caption_source={root}"])
    train(cfg, quiet=True)
    rows = read_metrics(cfg.output.dir)
    assert len(rows) == 1
    for r in rows:
        assert math.isfinite(r["loss/recon"]) and math.isfinite(r["loss/caption"])
        assert r["loss"] == pytest.approx((r["loss/recon"] + r["loss/caption"]) / 2, rel=1e-5)


def test_qk_layernorm_is_built_loaded_exported_and_used(tmp_path):
    """Show-o's q/k LayerNorms (FAMILY_FACTS B1): a checkpoint's values load into every layer,
    come back out on export, and change the forward (the queries are normalised per head)."""
    a, b = ShowoModel(_tiny()), ShowoModel(_tiny())
    g = torch.Generator().manual_seed(3)
    qk = {n: p for n, p in a.named_parameters() if "self_attn" in n and "_layernorm" in n}
    assert len(qk) == 4 * a.cfg.llm.num_layers
    batch, _ = _batch(a)
    before = a(batch, "recon", generator=torch.Generator().manual_seed(0)).loss.detach()
    with torch.no_grad():
        for p in qk.values():
            p.copy_(torch.randn(p.shape, generator=g))
    after = a(batch, "recon", generator=torch.Generator().manual_seed(0)).loss.detach()
    assert not torch.allclose(before, after)
    a.export(str(tmp_path / "model.safetensors"))
    b.load_pretrained(str(tmp_path))
    for n, p in qk.items():
        assert torch.equal(b.state_dict()[n], p), n
