"""Harmon family (AR + MAR): shapes, masking, the fixed-slot equivalence with Harmon's packed path,
the visual-prompt gradient scale, captioning, checkpoint layout, training, backends."""
import math

import pytest
import torch

from reca.engine.config import apply_overrides
from reca.engine.metrics import read_metrics
from reca.engine.presets import preset
from reca.engine.sample import SampleBuilder, load_instructions
from reca.engine.compile import apply_checkpointing
from reca.engine.train import train
from reca.kernels import get_ops
from reca.models import build_model
from reca.models.adapter import CaptionBatch, ReconBatch
from reca.models.harmon.weights import export_harmon, harmon_state_dict, load_harmon_checkpoint, load_pretrained
from reca.models.harmon.mar import _interpolate, kept_slots, mask_ratio, max_kept, random_masking

B = 3


def _model(seed=0, ops=None, **sets):
    cfg = apply_overrides(preset("harmon-tiny"), ["model.head.sample_steps=4"] + [f"{k}={v}" for k, v in sets.items()])
    torch.manual_seed(seed)
    return build_model(cfg.model, ops or get_ops("torch")), cfg


@pytest.fixture(scope="module")
def tiny():
    model, cfg = _model()
    with torch.no_grad():  # MAR zero-initialises the head's output: nothing upstream would get a gradient
        for p in model.mar.diffloss.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    builder = SampleBuilder(model.tokenizer, model.template, model.num_visual_tokens, load_instructions(),
                            max_text_tokens=cfg.sample.max_text_tokens, seed=0)
    torch.manual_seed(1)
    images = torch.rand(B, 3, 32, 32) * 2 - 1
    return model, builder, images


def _embeds(model, builder, images, scale=1.0, fixed=False):
    prompt = builder.build(list(range(images.shape[0])), fixed=fixed)
    visual = model.encode_visual_prompt(images)
    embeds = model.ops.condition(prompt.input_ids, model.llm.model.embed_tokens.weight, visual.flatten(0, 1),
                                 model.image_token_id, scale)
    return embeds, prompt, visual


def test_shapes_through_the_whole_path(tiny):
    model, builder, images = tiny
    grid, nb = model.latent_grid, model.cfg.mar.buffer_size
    assert (grid, nb, model.num_visual_tokens) == (8, 8, 72)
    embeds, prompt, visual = _embeds(model, builder, images)
    assert visual.shape == (B, grid * grid + nb, model.cfg.llm.hidden_size)
    assert int((prompt.input_ids == model.image_token_id).sum()) == B * model.num_visual_tokens
    x0 = model.make_target(images)
    assert x0.shape == (B, grid * grid, model.latent_channels)
    out = model.generation_loss(embeds, prompt, x0, torch.Generator().manual_seed(0))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert 0.7 <= float(out.metrics["mask_ratio"]) <= 1.0
    img = model.sample(embeds, prompt, 2, torch.Generator().manual_seed(0))
    assert img.shape == (B, 3, 32, 32) and img.abs().max() <= 1.0
    torch.testing.assert_close(model.decode_target(x0), images)  # the patch "VAE" is exact


def test_mask_ratio_is_truncated_normal_and_orders_differ():
    from scipy.stats import truncnorm

    g = torch.Generator().manual_seed(0)
    ratios = torch.cat([mask_ratio(g, "cpu") for _ in range(4000)])
    assert ratios.min() >= 0.7 and ratios.max() <= 1.0
    want = truncnorm((0.7 - 1.0) / 0.25, 0, loc=1.0, scale=0.25)
    # 4000 draws: the standard error of the mean is std/63 ~ 1.4e-3; 5e-3 is > 3 of them.
    assert abs(ratios.mean().item() - want.mean()) < 5e-3 and abs(ratios.std().item() - want.std()) < 5e-3
    mask, orders, ratio = random_masking(4, 64, g, "cpu")
    assert mask.dtype == torch.bool and mask.shape == (4, 64)
    assert (mask.sum(1) == math.ceil(64 * ratio.item())).all()  # one ratio per batch, MAR's ceil
    assert (orders.sort(1).values == torch.arange(64)).all()  # permutations
    assert len({tuple(o.tolist()) for o in orders}) == 4  # a different order per sample
    assert len({tuple(m.tolist()) for m in mask}) == 4 or mask.all()


def test_position_tables_interpolate_bilinearly():
    table = torch.arange(16.0).reshape(1, 16, 1).expand(1, 16, 3)
    assert _interpolate(table, 4, 4) is table
    big = _interpolate(table, 4, 8)
    ref = torch.nn.functional.interpolate(table.reshape(1, 4, 4, 3).permute(0, 3, 1, 2), size=(8, 8), mode="bilinear")
    torch.testing.assert_close(big, ref.permute(0, 2, 3, 1).reshape(1, 64, 3))
    model, _ = _model(**{"model.mar.pos_grid": 4})  # a 4x4 stored grid used on the 8x8 latent grid
    assert model.mar.encode(torch.randn(2, 64, model.latent_channels)).shape == (2, 72, 64)


def _harmon_conditions(model, embeds, prompt_mask, x0, keep):
    """Harmon's text-to-image conditioning for ONE sample, literally (variable lengths): MAR's
    encoder over the gathered kept tokens (no mask), the LLM over the packed sequence (valid
    prompt | kept tokens | buffers, plain causal), MAR's decoder with mask tokens elsewhere."""
    m, nb, t = model.mar, model.mar.buffer_size, x0.shape[0]
    side, grid = int(t**0.5), m.shape.pos_grid
    sel = torch.cat([torch.ones(nb, dtype=torch.bool), keep])
    h = torch.cat([m.fake_latent.expand(nb, -1), m.z_proj(x0)]) + m._pos(m.encoder_pos_embed_learned, side, nb)[0]
    h = m.z_proj_ln(h)[sel][None]
    for blk in m.encoder_blocks:
        h = blk(h)
    enc = m.encoder_norm(h)[0]  # [nb + kept, W]
    z = model.proj_in(enc)
    seq = torch.cat([embeds[prompt_mask], z[nb:], z[:nb]])[None]
    hid = model.llm.model(inputs_embeds=seq, use_cache=False).last_hidden_state[0, int(prompt_mask.sum()):]
    y = m.decoder_embed(enc + model.proj_out(torch.cat([hid[-nb:], hid[:-nb]])))
    full = m.mask_token[0].expand(nb + t, -1).clone()
    full[sel] = y
    h = (full + m._pos(m.decoder_pos_embed_learned, side, nb)[0])[None]
    for blk in m.decoder_blocks:
        h = blk(h)
    return m.decoder_norm(h)[0, nb:] + _interpolate(m.diffusion_pos_embed_learned, grid, side)[0]


@pytest.mark.parametrize("ratio_seed", [3, 4])
def test_fixed_slots_equal_harmons_variable_length_path(tiny, ratio_seed):
    """The kept tokens in fixed slots (padding slots as non-keys; positions count keys only)
    give, at every position, the conditions of Harmon's gathered, packed sequence; so do T slots
    (the sampler's) and a row with nothing kept."""
    model, builder, images = tiny
    model.eval()
    x0 = model.make_target(images)
    keep = ~random_masking(B, 64, torch.Generator().manual_seed(ratio_seed), "cpu", low=0.7)[0]
    keep[2] = False  # ratio 1.0: only the buffers are visible
    assert int(keep.sum(1).max()) <= model.gen_slots < 64
    embeds, prompt, _ = _embeds(model, builder, images)
    with torch.no_grad():
        fixed = model.condition_tokens(embeds, prompt, x0, keep, model.gen_slots)
        assert torch.equal(model.condition_tokens(embeds, prompt, x0, keep, model.gen_slots), fixed)
        torch.testing.assert_close(model.condition_tokens(embeds, prompt, x0, keep, 64), fixed, rtol=1e-5, atol=1e-5)
        for i in range(B):
            ref = _harmon_conditions(model, embeds[i], prompt.mask[i], x0[i], keep[i])
            torch.testing.assert_close(fixed[i], ref, rtol=1e-4, atol=1e-4)
    model.train()


def test_llm_attention_is_mask_free_causal(tiny, monkeypatch):
    """Packed rows let SDPA run the LLM as plain causal attention (flash, native GQA): no mask
    tensor, K/V not repeated per query group; the MAR encoder keeps its key-padding mask."""
    model, builder, images = tiny
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        calls.append((q.shape[2], q.shape[1], k.shape[1], attn_mask is None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    embeds, prompt, _ = _embeds(model, builder, images)
    x0 = model.make_target(images)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        model.generation_loss(embeds, prompt, x0, torch.Generator().manual_seed(0))
    q, nb = model.cfg.llm, model.mar.buffer_size
    n = prompt.input_ids.shape[1] + model.gen_slots + nb  # prompt | slots | buffers
    llm = [c[1:] for c in calls if c[0] == n]
    assert llm == [(q.num_heads, q.num_kv_heads, True, True)] * q.num_layers
    assert (nb + model.gen_slots, model.cfg.mar.num_heads, model.cfg.mar.num_heads, False, False) in calls


def test_kept_slots_hold_every_kept_token_in_raster_order():
    assert max_kept(1024, 0.7) == 308 and max_kept(64, 0.7) == 20 and max_kept(64, 0.0) == 64
    g = torch.Generator().manual_seed(0)
    for _ in range(200):  # the truncated normal's whole range, ratios near 0.7 included
        keep = ~random_masking(4, 1024, g, "cpu", low=0.7)[0]
        idx, valid = kept_slots(keep, max_kept(1024, 0.7))
        n = keep.sum(1)
        assert bool((valid.sum(1) == n).all())  # nothing kept is lost
        for r in range(4):
            assert torch.equal(idx[r, : n[r]], keep[r].nonzero().flatten())  # raster order
            assert not keep[r, idx[r, n[r]:]].any() and bool(valid[r, : n[r]].all())


def test_loss_falls_only_on_masked_tokens(tiny):
    model, builder, images = tiny
    embeds, prompt, _ = _embeds(model, builder, images)
    x0 = model.make_target(images)
    mask = random_masking(B, 64, torch.Generator().manual_seed(5), "cpu")[0]
    keep = ~mask
    other = torch.randn_like(x0)
    with torch.no_grad():
        z = model.condition_tokens(embeds, prompt, x0, keep, model.gen_slots)
        # nothing of a masked token reaches the conditions; a visible token does
        assert torch.equal(model.condition_tokens(embeds, prompt, torch.where(mask[..., None], other, x0), keep,
                                                  model.gen_slots), z)
        seen = torch.where(keep[..., None], other, x0)
        assert not torch.allclose(model.condition_tokens(embeds, prompt, seen, keep, model.gen_slots), z)

        def head_loss(target):
            return model.mar.diffloss.loss(z, target, mask, model.ops, torch.Generator().manual_seed(7))

        base = head_loss(x0)
        assert torch.equal(head_loss(torch.where(keep[..., None], other, x0)), base)  # unmasked targets: no loss
        assert not torch.equal(head_loss(torch.where(mask[..., None], other, x0)), base)
        # end to end with a fixed generator: masked targets are what the loss is about
        g = lambda: torch.Generator().manual_seed(11)  # noqa: E731
        m_used = random_masking(B, 64, g(), "cpu")[0]
        full = model.generation_loss(embeds, prompt, x0, g()).loss
        changed = model.generation_loss(embeds, prompt, torch.where(m_used[..., None], other, x0), g()).loss
        assert torch.isfinite(full) and not torch.equal(full, changed)


def test_visual_prompt_gradient_is_scaled_by_the_conditioning(tiny):
    """model(ReconBatch, "recon") with the conditioning's grad scale 0.1 vs 1.0 (same inputs, same generator): the gradient
    reaching the visual prompt, and its contribution to every parameter, scale by 0.1."""
    model, builder, images = tiny
    prompt = builder.build(list(range(B)))
    captured, grads = {}, {}
    encode = model._visual_prompt  # latents -> visual prompt, whichever way the step gets there

    def hooked(x):
        v = encode(x)
        v.retain_grad()
        captured["v"] = v
        return v

    model._visual_prompt = hooked
    try:
        for scale in (0.0, 0.1, 1.0):
            model.conditioning.grad_scale = scale
            model.zero_grad(set_to_none=True)
            model(ReconBatch(images, images, prompt), "recon", generator=torch.Generator().manual_seed(0)).loss.backward()
            params = {n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None and n.startswith(("mar.z_proj", "proj_in"))}
            grads[scale] = (captured["v"].grad.clone(), params)
    finally:
        del model._visual_prompt
        model.conditioning.grad_scale = model.cfg.visual_grad_scale
        model.zero_grad(set_to_none=True)
    assert grads[1.0][0].abs().sum() > 0
    torch.testing.assert_close(grads[0.1][0], grads[1.0][0])  # the op scales what flows past it
    for name, g1 in grads[1.0][1].items():  # what flows past it into the parameters: 0.1 x
        g0, g01 = grads[0.0][1][name], grads[0.1][1][name]
        assert (g1 - g0).abs().max() > 0, name
        torch.testing.assert_close(g01 - g0, 0.1 * (g1 - g0), rtol=1e-4, atol=1e-6 * g1.abs().max().item())


def test_caption_loss_equals_packed_cross_entropy(tiny):
    model, builder, images = tiny
    embeds, prompt, _ = _embeds(model, builder, images, scale=model.cfg.visual_grad_scale)
    torch.manual_seed(0)
    answers = torch.randint(10, model.tokenizer.vocab_size, (B, 7))
    amask = torch.ones(B, 7, dtype=torch.bool)
    amask[1, 4:] = False
    amask[2, 2:] = False
    got = model(CaptionBatch(images, prompt, answers, amask), "caption").loss
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(B):
            ans = answers[i][amask[i]]
            seq = torch.cat([embeds[i][prompt.mask[i]], model.llm.model.embed_tokens(ans)])
            logits = model.llm(inputs_embeds=seq[None], use_cache=False).logits[0]
            n = len(ans)
            total = total + torch.nn.functional.cross_entropy(logits[-n - 1:-1], ans, reduction="sum")
            count += n
    torch.testing.assert_close(got, total / count, rtol=1e-5, atol=1e-5)
    assert model.llm.lm_head.weight is model.llm.model.embed_tokens.weight  # tied, as Qwen2.5 small sizes


def test_checkpoint_round_trip_and_layout_names(tmp_path):
    a, _ = _model(seed=1)
    with torch.no_grad():  # the head's zero-initialised layers would compare equal by accident
        for p in a.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    for name in ("harmon.pth", "harmon.safetensors"):
        export_harmon(a, tmp_path / name)
        b, _ = _model(seed=2)
        assert load_harmon_checkpoint(b, tmp_path / name) > 0
        sa, sb = harmon_state_dict(a), harmon_state_dict(b)
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    # a directory: HF Qwen2.5 llm/ then the Harmon .pth on top
    (tmp_path / "dir").mkdir()
    a.llm.save_pretrained(tmp_path / "dir" / "llm", safe_serialization=True)
    c, _ = _model(seed=3)
    assert set(load_pretrained(c, tmp_path / "dir")) == {"llm/"}
    assert torch.equal(c.llm.model.layers[0].mlp.up_proj.weight, a.llm.model.layers[0].mlp.up_proj.weight)
    state = torch.load(tmp_path / "harmon.pth", weights_only=True)
    torch.save({**state, "mar.unknown": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="mar.unknown"):
        load_harmon_checkpoint(c, tmp_path / "bad.pth")


def test_real_size_layout_names_and_counts():
    """Names and shapes of HARMON_LAYOUT.md on the 1.5B preset (meta device: nothing allocated)."""
    with torch.device("meta"):
        model = build_model(preset("harmon-1.5b").model)
    shapes = {k: tuple(v.shape) for k, v in harmon_state_dict(model).items()}
    want = {
        "llm.model.embed_tokens.weight": (151936, 1536), "llm.lm_head.weight": (151936, 1536),
        "llm.model.layers.27.self_attn.q_proj.bias": (1536,), "llm.model.layers.0.self_attn.k_proj.weight": (256, 1536),
        "proj_in.0.weight": (1536, 1280), "proj_in.2.weight": (1536, 1536), "proj_out.2.weight": (1280, 1536),
        "mar.z_proj.weight": (1280, 16), "mar.z_proj_ln.weight": (1280,), "mar.fake_latent": (1, 1280),
        "mar.class_emb.weight": (1000, 1280), "mar.encoder_pos_embed_learned": (1, 320, 1280),
        "mar.encoder_blocks.0.attn.qkv.weight": (3840, 1280), "mar.encoder_blocks.19.attn.qkv.bias": (3840,),
        "mar.encoder_blocks.0.mlp.fc1.weight": (5120, 1280), "mar.decoder_blocks.19.norm2.weight": (1280,),
        "mar.decoder_embed.weight": (1280, 1280), "mar.mask_token": (1, 1, 1280),
        "mar.decoder_pos_embed_learned": (1, 320, 1280), "mar.diffusion_pos_embed_learned": (1, 256, 1280),
        "mar.encoder_norm.weight": (1280,), "mar.decoder_norm.bias": (1280,),
        "mar.diffloss.net.time_embed.mlp.0.weight": (1536, 256),
        "mar.diffloss.net.time_embed.mlp.2.weight": (1536, 1536),
        "mar.diffloss.net.cond_embed.weight": (1536, 1280), "mar.diffloss.net.input_proj.weight": (1536, 16),
        "mar.diffloss.net.res_blocks.0.in_ln.weight": (1536,),
        "mar.diffloss.net.res_blocks.11.mlp.2.weight": (1536, 1536),
        "mar.diffloss.net.res_blocks.0.adaLN_modulation.1.weight": (4608, 1536),
        "mar.diffloss.net.final_layer.linear.weight": (32, 1536),
        "mar.diffloss.net.final_layer.adaLN_modulation.1.weight": (3072, 1536),
    }
    for k, shape in want.items():
        assert shapes.get(k) == shape, (k, shapes.get(k))
    assert "mar.diffloss.net.final_layer.norm_final.weight" not in shapes  # no affine
    assert "mar.encoder_blocks.20.norm1.weight" not in shapes and not any(k.startswith("codec.") for k in shapes)
    parts = model.parameter_breakdown()
    assert parts["llm"] == 1_543_714_304  # Qwen2.5-1.5B, tied embeddings
    assert parts["mar (encoder, decoder, tables)"] == 791_196_160 and parts["mar.diffloss (head)"] == 151_206_944
    assert model.num_visual_tokens == 1088 and model.latent_grid == 32
    assert all(k.startswith(model.no_weight_decay_modules()) == k.startswith("mar.diffloss.") for k in shapes)


@pytest.fixture
def one_thread():
    """Two OpenMP threads on two cores shared with other processes run tiny ops ~30x slower than
    one (seen: 300 s instead of 14 s for this test); `train.threads=1` sets it, this restores it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_train_end_to_end_loss_falls(tmp_path, one_thread):
    cfg = apply_overrides(preset("harmon-tiny"), [
        f"output.dir={tmp_path / 'run'}", "output.tensorboard=false", "train.steps=100", "output.log_every=50",
        "train.threads=1",
        "output.ckpt_every=1000", "output.preview_images=2", "output.preview_steps=2", "model.head.sample_steps=4"])
    train(cfg, quiet=True)
    losses = [r["loss"] for r in read_metrics(cfg.output.dir)]
    assert len(losses) == 100 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last <= 0.5 * first, (first, last)  # seen: ~1.7 -> ~0.2
    assert (tmp_path / "run" / "recon_step100.png").exists()


def test_backends_give_the_same_generation_loss(tiny):
    pytest.importorskip("triton")
    model, builder, images = tiny
    embeds, prompt, _ = _embeds(model, builder, images[:2])
    x0 = model.make_target(images[:2])
    answers = torch.randint(10, model.tokenizer.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    losses, captions = {}, {}
    ones = torch.ones(2, 5, dtype=torch.bool)
    for backend in ("torch", "triton"):
        model.ops = model.conditioning.ops = get_ops(backend)  # the loss's ops and the conditioning's
        with torch.no_grad():
            losses[backend] = model.generation_loss(embeds, prompt, x0, torch.Generator().manual_seed(0)).loss
            captions[backend] = model(CaptionBatch(images[:2], prompt, answers, ones), "caption").loss
    model.ops = model.conditioning.ops = get_ops("torch")
    torch.testing.assert_close(captions["triton"], captions["torch"], rtol=1e-5, atol=1e-6)  # fp32 LSE order
    # Same network output; the Triton loss sums per token in another order and takes the
    # posterior-mean difference in closed form (kernels/schedule.py: mean_eps_coef), so the
    # float32 losses differ by rounding: 1e-5 relative is > 10x what was seen.
    torch.testing.assert_close(losses["triton"], losses["torch"], rtol=1e-5, atol=1e-6)


def test_shared_views_take_one_vae_pass(tiny, monkeypatch):
    """Harmon's views are the same pixels: the loader hands one tensor as both, and the visual
    prompt reuses the target's latents, equal to encoding the two views apart."""
    model, _, images = tiny
    assert model.views.same_pixels(1.0) and not model.views.same_pixels(0.5)
    calls, encode = [], model.codec.encode
    monkeypatch.setattr(model.codec, "encode", lambda x, generator=None: calls.append(1) or encode(x, generator))
    with torch.no_grad():
        visual, target = model.encode_views(images, images)
        assert len(calls) == 1
        apart_visual, apart_target = model.encode_visual_prompt(images.clone()), model.make_target(images.clone())
        assert len(calls) == 3  # distinct tensors: two passes
    torch.testing.assert_close(visual, apart_visual)
    torch.testing.assert_close(target, apart_target)


def test_checkpointing_changes_nothing_even_with_dropout():
    """Activation checkpointing (LLM, MAR, head) recomputes blocks in the backward: with MAR's
    dropout 0.1 the recomputation must see the same dropout masks (RNG saved where a block has
    dropout, and only there), so loss and every gradient equal the plain run's."""
    grads = []
    for ckpt in (False, True):
        model, cfg = _model(**{"model.mar.dropout": 0.1})
        if ckpt:  # from outside, over the LLM layers, MAR blocks and head blocks
            names = apply_checkpointing(model, 1)
            assert {n.rsplit(".", 1)[0] for n in names} == {"llm.model.layers", "mar.encoder_blocks",
                                                            "mar.decoder_blocks", "mar.diffloss.net.res_blocks"}
        builder = SampleBuilder(model.tokenizer, model.template, model.num_visual_tokens, load_instructions(),
                                max_text_tokens=cfg.sample.max_text_tokens, seed=0)
        with torch.no_grad():
            for p in model.mar.diffloss.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
        images = torch.rand(B, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
        torch.manual_seed(5)  # dropout draws from the global generator
        loss = model(ReconBatch(images, images, builder.build(list(range(B)))), "recon",
                     generator=torch.Generator().manual_seed(0)).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = grads
    torch.testing.assert_close(l1, l0)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)


def test_expected_kept_matches_the_masking_and_useful_flops_are_fewer():
    from reca.engine.bench.flops import step_flops
    from reca.models.harmon.mar import expected_kept

    g = torch.Generator().manual_seed(0)
    kept = [float((~random_masking(2, 1024, g, "cpu")[0]).sum()) / 2 for _ in range(4000)]
    assert sum(kept) / len(kept) == pytest.approx(expected_kept(1024), rel=0.02)
    assert expected_kept(1024) < max_kept(1024, 0.7)
    model, _ = _model()
    executed, useful = step_flops(model, 40, 2), step_flops(model, 30.5, 2, useful=True)
    assert 0 < useful["total"] < executed["total"]
    assert useful["tokens_per_sample"]["llm.model"] == pytest.approx(30.5 + expected_kept(64) + 8)
