"""BAGEL family: packed sequences and their mask, routing, isolation, freezing, EMA, the
released layout, the counts of BAGEL-7B-MoT (FAMILY_FACTS.md A10)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

from reca.engine.config import OptimConfig
from reca.engine.ema import EMA
from reca.engine.optim import build_optimizer
from reca.engine.presets import preset
from reca.models import build_model
from reca.models.adapter import PromptBatch, ReconBatch, SampleBatch
from reca.models.bagel import BagelConfig, BagelModel, VitShape
from reca.models.bagel.pack import attention_mask, build_pack
from reca.models.layers import Qwen2Shape
from reca.models.vae import VAEConfig

V = 6  # vit split of the small packs: <|vision_start|> 4 tokens <|vision_end|>


def small_config(**kw) -> BagelConfig:
    base = dict(llm=Qwen2Shape(vocab_size=1024, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                               num_kv_heads=2),
                vit=VitShape(hidden_size=32, intermediate_size=48, num_layers=3, num_heads=2, image_size=8,
                             patch_size=4, max_side=3),
                vae=VAEConfig(kind="patch", patch=2), gen_size=8, latent_patch=2, max_latent_size=3,
                pack_multiple=16)
    return BagelConfig(**{**base, **kw})


def small_model(seed: int = 0, **kw) -> BagelModel:
    torch.manual_seed(seed)
    m = BagelModel(small_config(**kw))
    with torch.no_grad():  # a trained-looking velocity head: BAGEL zero-initialises it
        m.llm2vae.weight.normal_(0, 0.1)
    return m


def prompts(m: BagelModel, text_lens: list[int], p: int = 14, seed: int = 0) -> PromptBatch:
    """Prompts in the model's template with the given instruction lengths (random ids)."""
    g = torch.Generator().manual_seed(seed)
    tok = m.tokenizer
    vs, ve, ims, ime = (tok.token_id(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>"))
    ids = torch.full((len(text_lens), p), tok.token_id("<|endoftext|>"))
    mask = torch.zeros(len(text_lens), p, dtype=torch.bool)
    for row, n in enumerate(text_lens):
        seq = [vs] + [m.image_token_id] * m.num_visual_tokens + [ve, ims] + torch.randint(10, 1000, (n,), generator=g).tolist() + [ime]
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = True
    return PromptBatch(ids, mask)


# --- the mask ---------------------------------------------------------------------------------

def reference_layout(mask: torch.Tensor, keep_text: torch.Tensor, keep_vit: bool, t: int):
    """BAGEL's pack in BAGEL's own order, from the split lengths alone: per sample the vit split
    (full), the text split (causal), the vae split (noise), then padding. -> (dense bool mask
    [S, S] with the net visibility of FAMILY_FACTS A5, written block by block; the global index
    of each (sample, source column) and of each (sample, latent))."""
    b, p = mask.shape
    splits, index_und, index_gen, start = [], {}, {}, 0
    for i in range(b):
        vit = V if keep_vit else 0
        text = int(mask[i, V:].sum()) if bool(keep_text[i]) else 0
        for j in range(vit):
            index_und[(i, j)] = start + j
        for j in range(text):
            index_und[(i, V + j)] = start + vit + j
        index_und[(i, p)] = start + vit + text
        for k in range(t):
            index_gen[(i, k)] = start + vit + text + 1 + k
        index_und[(i, p + 1)] = start + vit + text + 1 + t
        splits.append((start, vit, text, t + 2))
        start += vit + text + t + 2
    return splits, index_und, index_gen, start


def reference_mask(splits, total: int, size: int) -> torch.Tensor:
    ref = torch.zeros(size, size, dtype=torch.bool)
    for start, vit, text, vae in splits:
        a, bt, c = start, start + vit, start + vit + text
        ref[a:bt, a:bt] = True  # the vit split sees itself only
        ref[bt:c, a:bt] = True  # text sees the vit split ...
        ref[bt:c, bt:c] = torch.ones(text, text, dtype=torch.bool).tril()  # ... and earlier text
        ref[c:c + vae, a:c + vae] = True  # latents see the sample's past and their whole split
    ref[total:, total:] = torch.ones(size - total, size - total, dtype=torch.bool).tril()  # padding
    return ref


def pack_to_reference_order(pack, b: int, p: int, t: int, index_und, index_gen, total: int) -> torch.Tensor:
    """Global BAGEL-order index of every pack slot, from the slot's source token."""
    order, pad = [], total
    for slot, src in enumerate(pack.src.tolist()):
        if src == b * (p + 2):
            order.append(pad)
            pad += 1
        else:
            order.append(index_und[(src // (p + 2), src % (p + 2))])
    order += [index_gen[(k // t, k % t)] for k in range(b * t)]
    return torch.tensor(order)


@pytest.mark.parametrize("seed", range(6))
def test_mask_equals_reference_on_random_packs(seed):
    g = torch.Generator().manual_seed(seed)
    b = int(torch.randint(1, 5, (1,), generator=g))
    p, t = 14, int(torch.randint(1, 6, (1,), generator=g))
    lens = torch.randint(V + 2, p + 1, (b,), generator=g)
    mask = torch.arange(p)[None] < lens[:, None]
    keep_text = torch.rand(b, generator=g) > 0.3
    keep_vit = seed % 3 != 2
    pack = build_pack(mask, V, t, keep_text, keep_vit=keep_vit, multiple=16)
    splits, iu, ig, total = reference_layout(mask, keep_text, keep_vit, t)
    size = pack.doc.numel()
    assert size % 16 == 0 and size >= total
    order = pack_to_reference_order(pack, b, p, t, iu, ig, total)
    assert sorted(order.tolist()) == list(range(size))  # every kept token once, the rest padding
    ref = reference_mask(splits, total, size)
    dense = attention_mask(pack, "dense")
    assert torch.equal(dense, ref[order][:, order])
    # RoPE ids as BAGEL assigns them: the vit split one id, text consecutive, the vae split one id
    for i, (start, vit, text, _) in enumerate(splits):
        rope = torch.empty(size, dtype=torch.long)
        rope[order] = pack.rope
        first = 1 if keep_vit else 0
        assert (rope[start:start + vit] == 0).all()
        assert rope[start + vit:start + vit + text].tolist() == list(range(first, first + text))
        assert (rope[start + vit + text:start + vit + text + t + 2] == first + text).all()


def test_block_mask_attention_equals_dense_reference():
    """The flex BlockMask (its block sparsity and its mask_mod), through flex attention, gives
    SDPA's output under the independent reference mask. One shape: the compile happens once."""
    from reca.models.bagel.mot import attend

    b, p, t = 3, 14, 5
    mask = torch.arange(p)[None] < torch.tensor([[9], [14], [11]])
    keep_text = torch.tensor([True, False, True])
    pack = build_pack(mask, V, t, keep_text, multiple=16)
    splits, iu, ig, total = reference_layout(mask, keep_text, True, t)
    order = pack_to_reference_order(pack, b, p, t, iu, ig, total)
    size = pack.doc.numel()
    ref = reference_mask(splits, total, size)[order][:, order]
    block = attention_mask(pack, "flex", block_size=16)
    blocks = ref.view(size // 16, 16, size // 16, 16).any(3).any(1)
    assert torch.equal(block.to_dense()[0, 0].bool(), blocks)  # exactly the blocks with a visible pair
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, size, 16, generator=g), torch.randn(1, 2, size, 16, generator=g), torch.randn(1, 2, size, 16, generator=g)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=ref, enable_gqa=True)
    torch.testing.assert_close(attend(q, k, v, block), want, rtol=1e-5, atol=1e-5)  # fp32 reduction order


# --- the model --------------------------------------------------------------------------------

def test_packed_sample_isolation():
    """A token of one sample gets exactly zero gradient from another sample's loss."""
    m = small_model(freeze_und=False)
    pr = prompts(m, [3, 5, 1])
    visual = torch.randn(3, m.num_visual_tokens, 64)
    pack, mask, und = m._prefix(visual, pr, torch.tensor([True, True, False]))
    und = und.detach().requires_grad_(True)
    x_t = torch.randn(3, m.latent_grid**2, m.llm2vae.out_features, requires_grad=True)
    pred = m.velocity(pack, mask, und, x_t, torch.tensor([0.3, 0.6, 0.9]))
    pred[1].square().sum().backward()
    doc = pack.doc[: pack.n_und]
    assert (und.grad[doc != 1] == 0).all() and (und.grad[doc == 1] != 0).any()
    assert (x_t.grad[[0, 2]] == 0).all() and (x_t.grad[1] != 0).all()


def test_routing_und_hidden_states_ignore_the_generation_expert():
    m = small_model()
    pr = prompts(m, [4, 2])
    pack, mask, und = m._prefix(torch.randn(2, m.num_visual_tokens, 64), pr, torch.tensor([True, True]))
    gen = torch.randn(2 * m.latent_grid**2, 64)
    with torch.no_grad():
        hu, hg = m.language_model(und, gen, pack.rope, mask)
        for name, p in m.language_model.named_parameters():
            if "_moe_gen" in name:
                p.add_(torch.randn_like(p))
        hu2, hg2 = m.language_model(und, gen, pack.rope, mask)
    # BAGEL routes the vae split's two markers to the understanding expert, but they sit in the
    # noise split and attend to its latents: every other understanding token is untouched
    in_vae_split = pack.mode[: pack.n_und] == 2
    assert in_vae_split.sum() == 4
    assert torch.equal(hu[~in_vae_split], hu2[~in_vae_split])
    assert not torch.allclose(hu[in_vae_split], hu2[in_vae_split])
    assert not torch.allclose(hg, hg2)


def test_frozen_parts_get_no_gradient_and_no_optimizer_state():
    m = small_model()
    pr = prompts(m, [3, 6])
    batch = ReconBatch(torch.rand(2, 3, 8, 8) * 2 - 1, torch.rand(2, 3, 8, 8) * 2 - 1, pr)
    out = m(batch, "recon", generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    frozen = [n for n, p in m.named_parameters() if not p.requires_grad]
    trained = [n for n, p in m.named_parameters() if p.requires_grad]
    gen_side = ("_moe_gen", "time_embedder.", "vae2llm.", "llm2vae.")
    assert trained and all(any(s in n for s in gen_side) for n in trained)
    assert any(n.startswith("connector.") for n in frozen) and any(n.startswith("vit_model.") for n in frozen)
    assert any(".mlp.gate_proj" in n for n in frozen) and "language_model.model.embed_tokens.weight" in frozen
    params = dict(m.named_parameters())
    assert all(params[n].grad is None for n in frozen)
    assert all(params[n].grad is not None for n in trained)
    opt = build_optimizer(m, OptimConfig(lr=1e-3), torch.device("cpu"))
    opt.step()
    with_state = {id(p) for p in opt.state}
    assert with_state == {id(params[n]) for n in trained}


def test_packed_loss_equals_unpacked_per_sample():
    """Each sample's velocity in a pack of three equals its velocity packed alone (fp32; the
    attention reduces over a different number of masked keys: tolerance 1e-5)."""
    m = small_model()
    pr = prompts(m, [2, 5, 3])
    visual = torch.randn(3, m.num_visual_tokens, 64)
    keep = torch.tensor([True, False, True])
    x_t, t = torch.randn(3, m.latent_grid**2, m.llm2vae.out_features), torch.tensor([0.2, 0.5, 0.8])
    with torch.no_grad():
        packed = m.velocity(*m._prefix(visual, pr, keep), x_t, t)
        for i in range(3):
            one = PromptBatch(pr.input_ids[i:i + 1], pr.mask[i:i + 1])
            alone = m.velocity(*m._prefix(visual[i:i + 1], one, keep[i:i + 1]), x_t[i:i + 1], t[i:i + 1])
            torch.testing.assert_close(packed[i:i + 1], alone, rtol=1e-5, atol=1e-5)


def test_text_dropout_drops_the_text_never_the_image():
    m = small_model(text_dropout=1.0)
    pr = prompts(m, [4, 4])
    keep = torch.rand(2, generator=torch.Generator().manual_seed(0)) >= m.cfg.text_dropout
    pack = build_pack(pr.mask, m.vit_split, m.latent_grid**2, keep, multiple=16)
    assert pack.text_tokens.tolist() == [0, 0]
    src = pack.src[pack.src < 2 * (pr.input_ids.shape[1] + 2)] % (pr.input_ids.shape[1] + 2)
    assert (src < m.vit_split).sum() == 2 * m.vit_split  # both vit splits kept whole
    batch = ReconBatch(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8), pr)
    assert m(batch, "recon", generator=torch.Generator().manual_seed(0)).metrics["text_kept"] == 0


def test_sampling_shapes_with_and_without_the_image():
    m = small_model()
    pr = prompts(m, [3, 2])
    for und in (torch.zeros(2, 3, 8, 8), None):
        img = m(SampleBatch(und, pr, 2), "sample", generator=torch.Generator().manual_seed(0))
        assert img.shape == (2, 3, 8, 8) and torch.isfinite(img).all() and img.abs().max() <= 1


# --- weights ----------------------------------------------------------------------------------

def released_keys(layers: int, vit_layers: int) -> list[str]:
    """BAGEL-7B-MoT's key names, typed from FAMILY_FACTS A2 (not read from the model)."""
    keys = ["language_model.model.embed_tokens.weight", "language_model.model.norm.weight",
            "language_model.model.norm_moe_gen.weight", "language_model.lm_head.weight",
            "latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed"]
    for i in range(layers):
        pre = f"language_model.model.layers.{i}."
        for s in ("", "_moe_gen"):
            keys += [pre + f"self_attn.{x}_proj{s}.{w}" for x in "qkv" for w in ("weight", "bias")]
            keys += [pre + f"self_attn.o_proj{s}.weight", pre + f"self_attn.q_norm{s}.weight",
                     pre + f"self_attn.k_norm{s}.weight", pre + f"input_layernorm{s}.weight",
                     pre + f"post_attention_layernorm{s}.weight"]
            keys += [pre + f"mlp{s}.{x}_proj.weight" for x in ("gate", "up", "down")]
    wb = ("weight", "bias")
    keys += [f"{m}.{w}" for m in ("time_embedder.mlp.0", "time_embedder.mlp.2", "vae2llm", "llm2vae",
                                  "connector.fc1", "connector.fc2") for w in wb]
    vm = "vit_model.vision_model."
    keys += [vm + f"embeddings.patch_embedding.{w}" for w in wb] + [vm + "embeddings.position_embedding.weight"]
    keys += [vm + f"post_layernorm.{w}" for w in wb]
    for i in range(vit_layers):
        pre = vm + f"encoder.layers.{i}."
        keys += [pre + f"{m}.{w}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                            "self_attn.out_proj", "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2")
                 for w in wb]
    return keys


def test_released_layout_load_and_export_round_trip(tmp_path):
    m = small_model()
    keys = released_keys(2, 2)
    from reca.models.bagel.weights import bagel_state_dict

    own = bagel_state_dict(m)
    assert sorted(own) == sorted(keys)
    g = torch.Generator().manual_seed(1)
    state = {k: torch.randn(own[k].shape, generator=g) for k in keys}
    save_file(state, str(tmp_path / "ema.safetensors"))
    assert m.load_pretrained(str(tmp_path))["ema.safetensors"] == len(keys) - 2  # the fixed tables popped
    for k, v in m.state_dict().items():
        if not k.startswith("codec."):
            assert torch.equal(v, state[k]), k
    m.export(str(tmp_path / "out"))
    back = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(back) == sorted(keys)
    assert all(torch.equal(back[k], state[k]) for k in keys if not k.endswith("pos_embed"))
    assert torch.equal(back["latent_pos_embed.pos_embed"], m.latent_pos_embed.pos_embed)
    del state["llm2vae.bias"]
    save_file(state, str(tmp_path / "ema.safetensors"))
    with pytest.raises(ValueError, match="llm2vae.bias"):
        m.load_pretrained(str(tmp_path))


def test_ema_update_checkpoint_and_export(tmp_path):
    m = small_model()
    ema = EMA(m, decay=0.9)
    trained = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    ema.update()
    state = ema.state_dict()
    for n, before in trained.items():
        torch.testing.assert_close(state["shadows"][n], before + 0.1, rtol=0, atol=1e-6)  # 0.9 x + 0.1 (x + 1)
    assert set(state["shadows"]) == set(trained)  # frozen parameters have no shadow

    other = EMA(small_model(seed=1), decay=0.5)
    other.load_state_dict(state)
    assert other.decay == 0.9 and all(torch.equal(a, b) for a, b in zip(other.shadows, ema.shadows))

    live = {n: p.detach().clone() for n, p in m.named_parameters()}
    path = ema.export(tmp_path)
    assert path.name == "ema.safetensors"
    assert all(torch.equal(p, live[n]) for n, p in m.named_parameters())  # the model got its weights back
    fresh = small_model(seed=2)
    fresh.load_pretrained(str(tmp_path))
    got = dict(fresh.named_parameters())
    for n, p in m.named_parameters():
        want = state["shadows"][n] if n in trained else p
        assert torch.equal(got[n], want), n


# --- the presets ------------------------------------------------------------------------------

def test_bagel_7b_mot_counts_match_the_fact_sheet():
    """FAMILY_FACTS A10: LLM 14.141B, each expert 6.526B, embed/head 0.545B each, SigLIP 402.6M,
    connector 16.98M, time_embedder 13.77M, trainable (gen side) 6.540B."""
    cfg = preset("bagel-7b-mot").model
    with torch.device("meta"):
        m = build_model(cfg)
    parts = m.parameter_breakdown()
    assert round(parts["llm"] / 1e9, 3) == 14.141
    assert round(parts["und expert (+ norm)"] / 1e9, 3) == round(parts["gen expert (+ norm_moe_gen)"] / 1e9, 3) == 6.526
    assert round(parts["embed_tokens"] / 1e9, 3) == round(parts["lm_head"] / 1e9, 3) == 0.545
    assert round(parts["vit"] / 1e6, 1) == 402.6
    assert round(parts["connector"] / 1e6, 2) == 16.98 and round(parts["time_embedder"] / 1e6, 2) == 13.77
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert round(trainable / 1e9, 3) == 6.540
    assert m.num_visual_tokens == 256 and m.latent_grid == 64


def test_bagel_tiny_recipe():
    cfg = preset("bagel-tiny")
    assert cfg.sample.fixed_prob == 0.0 and cfg.model.text_dropout == 0.1
    assert cfg.model.time_shift == 1.0 and cfg.model.sample_shift == 3.0
    m = build_model(dataclasses.replace(cfg.model))
    assert m.vit_split == m.num_visual_tokens + 2


def test_flop_plan_matches_flop_counter():
    """The analytic plan against FlopCounterMode, module by module, on one unpadded sample.
    Two terms the counter cannot check are taken out and stated: CPU SDPA with a boolean mask is
    not counted by FlopCounterMode (attention terms removed from the plan), and vae2llm takes no
    input gradient (its input is data: the counter sees 4 M n where the plan charges 6 M n).
    time_embedder (one token a sample) is left out: its backward is attributed unevenly."""
    from torch.utils.flop_counter import FlopCounterMode

    from reca.engine.bench.flops import matmul_params, step_flops

    m = small_model(text_dropout=0.0, pack_multiple=1)
    pr = prompts(m, [6], p=14)
    assert pr.mask.all()
    batch = ReconBatch(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), pr)
    with FlopCounterMode(display=False) as counter:
        m(batch, "recon", generator=torch.Generator().manual_seed(0)).loss.backward()
    counted = {k.removeprefix("BagelModel."): sum(v.values()) for k, v in counter.get_flop_counts().items()}
    plan = step_flops(m, prompt_len=14, batch=1)["modules"]
    t, n, v = m.latent_grid**2, m.num_visual_tokens, m.cfg.vit
    llm = sum(f for k, f in plan.items() if k.startswith("language_model.model.layers."))
    assert llm == pytest.approx(counted["language_model"], rel=1e-12)
    vit_attention = (v.num_layers - 1) * 4 * n**2 * v.hidden_size  # frozen: forward only
    assert plan["vit_model"] - vit_attention == pytest.approx(counted["vit_model"], rel=1e-12)
    assert plan["connector"] == pytest.approx(counted["connector"], rel=1e-12)
    assert plan["llm2vae"] == pytest.approx(counted["llm2vae"], rel=1e-12)
    assert plan["vae2llm"] - 2 * matmul_params(m.vae2llm) * t == pytest.approx(counted["vae2llm"], rel=1e-12)
