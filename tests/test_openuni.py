"""OpenUni family: the visual path against transformers' InternVL, the packed LLM call against
OpenUni's left-padded one, the loss against SANA's training table, frozen parts (no gradient, no
optimizer state), sampling, checkpoint layouts (OpenUni's file, InternVL3's remote-code names,
diffusers' SANA and DC-AE) round-tripped, and diffusers imported only when a model is built."""
import dataclasses
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers", reason="the openuni family needs diffusers (pip install 'reca[openuni]')")

from reca.engine.config import OptimConfig  # noqa: E402
from reca.engine.optim import build_optimizer  # noqa: E402
from reca.engine.presets import preset  # noqa: E402
from reca.engine.sample import SampleBuilder, load_instructions  # noqa: E402
from reca.kernels import get_ops  # noqa: E402
from reca.models.adapter import ReconBatch, SampleBatch  # noqa: E402
from reca.models.openuni import OpenUniConfig, OpenUniModel  # noqa: E402
from reca.models.openuni.weights import (export_openuni, internvl_from_reca, internvl_to_reca,  # noqa: E402
                                         load_openuni_checkpoint, load_pretrained)

B = 3
FROZEN = ("lmm.", "vae.")


def tiny_config(**kw) -> OpenUniConfig:
    return dataclasses.replace(preset("openuni-tiny").model, **kw)


def _model(seed=0, **kw) -> OpenUniModel:
    torch.manual_seed(seed)
    return OpenUniModel(tiny_config(**kw), get_ops("torch"))


@pytest.fixture(scope="module")
def tiny():
    model = _model()
    builder = SampleBuilder(model.tokenizer, model.template, model.num_visual_tokens, load_instructions(),
                            max_text_tokens=40, fixed_prob=0.0, seed=0)
    torch.manual_seed(1)
    images = torch.rand(B, 3, 32, 32) * 2 - 1
    return model, builder, images


def test_prompt_is_openuni_recon_template(tiny):
    model, builder, _ = tiny
    ids = builder.ids(0)
    n = model.num_visual_tokens
    first = ids.index(model.image_token_id)
    assert n == 16 and ids[first:first + n] == [model.image_token_id] * n and ids.count(model.image_token_id) == n
    text = model.tokenizer.decode(ids[:first]) + "|" + model.tokenizer.decode(ids[first + n:])
    assert text.startswith("<|im_start|>user\n<img>|</img>\n")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n<img>")


def test_visual_prompt_is_internvl_image_features(tiny):
    """OpenUni's preprocessing, then transformers' own InternVL feature path (CLS dropped, pixel
    shuffle, mlp1) gives the same 256-style tokens as the model's visual prompt."""
    model, _, images = tiny
    x = ((images + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model.lmm.get_image_features(pixel_values=x, vision_feature_layer=-1,
                                           vision_feature_select_strategy="default")
    want = out.pooler_output if hasattr(out, "pooler_output") else out
    got = model.encode_visual_prompt(images)
    assert got.shape == (B, model.num_visual_tokens, 64) and not got.requires_grad
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # fp32, same ops in the same order


def test_packed_llm_equals_openuni_left_padding(tiny):
    """The right-padded prompt packed before the LLM gives the query states of OpenUni's call:
    left padding, 2-D mask (prompt mask + ones for the queries), position_ids cumsum(mask) - 1."""
    model, builder, images = tiny
    prompt = builder.build(list(range(B)))
    assert prompt.mask.sum(1).unique().numel() > 1  # prompts of different lengths: padding matters
    with torch.no_grad():
        embeds = model.conditioning(prompt.input_ids, model.encode_visual_prompt(images))
        p, q = prompt.mask.shape[1], model.cfg.num_queries
        queries = model.meta_queries[None].expand(B, -1, -1)
        got = model.llm_hidden(torch.cat([embeds, queries], 1),
                               torch.cat([prompt.mask, torch.ones(B, q, dtype=torch.bool)], 1))[:, p:]
        rows, masks = [], []
        for b in range(B):  # OpenUni's left-padded batch
            n = int(prompt.mask[b].sum())
            pad = p - n
            rows.append(torch.cat([embeds[b, n:], embeds[b, :n], queries[b]]))
            masks.append(torch.cat([torch.zeros(pad, dtype=torch.bool), torch.ones(n + q, dtype=torch.bool)]))
        mask = torch.stack(masks)
        pos = (mask.long().cumsum(1) - 1).clamp_min(0)
        want = model.lmm.language_model(inputs_embeds=torch.stack(rows), attention_mask=mask.long(),
                                        position_ids=pos, use_cache=False).last_hidden_state[:, -q:]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # fp32; sdpa with vs without a mask


def test_noise_levels_are_sana_training_table():
    """s = 1 - floor(1000 u) / 1000 is FlowMatchEulerDiscreteScheduler's sigmas[floor(1000 u)]
    (shift 1), and its timesteps are 1000 s: what OpenUni's diff_loss feeds SANA."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    u = torch.rand(4096, generator=torch.Generator().manual_seed(0))
    idx = (u * 1000).long()
    s = 1 - torch.floor(u * 1000) / 1000
    torch.testing.assert_close(s, sched.sigmas[idx].float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(1000 * s, sched.timesteps[idx].float(), rtol=0, atol=1e-3)


def test_recon_loss_is_flow_matching_mse(tiny):
    """The loss equals OpenUni's formula recomputed from the same draws: x_s = (1 - s) x0 + s eps,
    target eps - x0, mean of the squared error over every latent element."""
    model, builder, images = tiny
    prompt = builder.build(list(range(B)))
    out = model(ReconBatch(images, images, prompt), "recon", generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        x0 = model.make_target(images)
        s = 1 - torch.floor(torch.rand(B, generator=g) * 1000) / 1000
        eps = torch.randn(x0.shape, generator=g)
        embeds = model.conditioning(prompt.input_ids, model.encode_visual_prompt(images))
        pred = model.velocity((1 - s[:, None, None]) * x0 + s[:, None, None] * eps, model.condition(embeds, prompt), s)
        want = ((pred - (eps - x0)) ** 2).mean()
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss.detach(), want, rtol=1e-5, atol=0)
    assert x0.shape == (B, 64, 4)  # 32 px / 4 = 8 x 8 tokens of 4 channels


def test_frozen_parts_get_no_gradient_and_no_optimizer_state():
    model = _model()
    builder = SampleBuilder(model.tokenizer, model.template, model.num_visual_tokens, load_instructions(),
                            max_text_tokens=32)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    opt = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.05), torch.device("cpu"))
    out = model(ReconBatch(images, images, builder.build([0, 1])), "recon", generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    opt.step()
    named = dict(model.named_parameters())
    frozen = [n for n in named if n.startswith(FROZEN)]
    trained = [n for n in named if not n.startswith(FROZEN)]
    assert frozen and all(not named[n].requires_grad and named[n].grad is None for n in frozen)
    assert {n.split(".")[0] for n in trained} == {"meta_queries", "connector", "projector", "transformer"}
    assert all(named[n].requires_grad for n in trained)
    assert named["meta_queries"].grad.abs().sum() > 0 and named["projector.weight"].grad.abs().sum() > 0
    stateful = {id(p) for p in opt.state}
    assert stateful == {id(named[n]) for n in trained}  # Adam moments for exactly the trained tensors
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert id(named["meta_queries"]) in decayed  # OpenUni decays every >= 2-D tensor, the queries too


def test_transformer_frozen_variant():
    """RecA's reca_2_1.6_3o freezes SANA: `trainable` without "transformer"."""
    model = _model(trainable=("meta_queries", "connector", "projector"))
    assert not any(p.requires_grad for p in model.transformer.parameters())
    assert model.meta_queries.requires_grad and all(p.requires_grad for p in model.connector.parameters())


def test_sample_shapes_and_determinism(tiny):
    model, builder, images = tiny
    batch = SampleBatch(images, builder.build(list(range(B)), fixed=True), 3)
    a = model(batch, "sample", generator=torch.Generator().manual_seed(5))
    b = model(batch, "sample", generator=torch.Generator().manual_seed(5))
    assert a.shape == (B, 3, 32, 32) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_openuni_checkpoint_round_trip(tmp_path, suffix):
    src, dst = _model(seed=0), _model(seed=1)
    path = tmp_path / f"openuni{suffix}"
    export_openuni(src, path)
    assert load_openuni_checkpoint(dst, path) == len([k for k in src.state_dict() if not k.startswith(FROZEN)])
    a, b = src.state_dict(), dst.state_dict()
    for k in a:
        if not k.startswith(FROZEN):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert not torch.equal(a["lmm.multi_modal_projector.linear_1.weight"], b["lmm.multi_modal_projector.linear_1.weight"])


def test_public_part_directories_round_trip(tmp_path):
    """InternVL3 in its remote-code layout, SANA and DC-AE as diffusers directories, and an OpenUni
    checkpoint holding `lmm.` under remote-code names: every tensor of a fresh model is replaced."""
    from safetensors.torch import save_file

    src, dst = _model(seed=0), _model(seed=1)
    remote = internvl_from_reca(src.lmm.state_dict())
    for key in ("vision_model.embeddings.class_embedding", "vision_model.embeddings.patch_embedding.weight",
                "vision_model.embeddings.position_embedding", "vision_model.encoder.layers.1.attn.qkv.weight",
                "vision_model.encoder.layers.1.attn.proj.bias", "vision_model.encoder.layers.1.ls2",
                "vision_model.encoder.layers.1.norm1.weight", "vision_model.encoder.layers.1.mlp.fc2.weight",
                "mlp1.0.weight", "mlp1.1.weight", "mlp1.3.bias", "language_model.model.embed_tokens.weight",
                "language_model.model.layers.1.self_attn.q_proj.weight", "language_model.model.norm.weight"):
        assert key in remote, key  # the names of OpenGVLab/InternVL3-*'s model.safetensors
    assert remote["vision_model.encoder.layers.1.attn.qkv.weight"].shape == (3 * 64, 64)
    assert internvl_to_reca(remote).keys() == src.lmm.state_dict().keys()
    for part, state in (("internvl", {**remote, "language_model.lm_head.weight": torch.zeros(1024, 64)}),
                        ("transformer", src.transformer.state_dict()), ("vae", src.vae.state_dict())):
        (tmp_path / part).mkdir()
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / part / "model.safetensors"))
    export_openuni(src, tmp_path / "openuni_b.pth")
    loaded = load_pretrained(dst, tmp_path)
    assert set(loaded) == {"internvl/", "transformer/", "vae/", "openuni_b.pth"}
    a, b = src.state_dict(), dst.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # an OpenUni file with the frozen MLLM inside, under remote-code names, loads too
    full = {**{k: v for k, v in a.items() if not k.startswith("lmm.")}, **{f"lmm.{k}": v for k, v in remote.items()}}
    torch.save(full, tmp_path / "full.pth")
    assert load_openuni_checkpoint(_model(seed=2), tmp_path / "full.pth") == len(a)


def test_checkpoint_errors_name_the_tensor(tmp_path):
    model = _model()
    state = {k: v for k, v in model.state_dict().items() if k.startswith(("meta_queries", "connector.", "projector."))}
    torch.save({**state, "head.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="head.weight"):
        load_openuni_checkpoint(model, tmp_path / "extra.pth")
    torch.save({k: v for k, v in state.items() if k != "projector.weight"}, tmp_path / "short.pth")
    with pytest.raises(ValueError, match="projector.weight"):
        load_openuni_checkpoint(model, tmp_path / "short.pth")
    torch.save({**state, "projector.weight": torch.zeros(3, 3)}, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="projector.weight has shape"):
        load_openuni_checkpoint(model, tmp_path / "shape.pth")


def test_diffusers_imported_only_when_a_model_is_built():
    code = "import sys, reca.models, reca.models.openuni; print('diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_recon_loss_falls_on_a_fixed_batch(tiny):
    """The trained parts learn: 30 AdamW steps on one batch with fixed draws lower the loss."""
    _, builder, images = tiny
    model = _model(seed=4)
    prompt = builder.build(list(range(B)))
    opt = build_optimizer(model, OptimConfig(lr=3e-3), torch.device("cpu"))
    losses = []
    for _ in range(30):
        out = model(ReconBatch(images, images, prompt), "recon", generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("name, sana, connector, projector, queries", [
    ("openuni-b-512", 591.7, 52.4, 2.07, 0.23),  # FAMILY_FACTS.md C5, C8
    ("openuni-l-512", 1604.5, 221.9, 3.54, 0.39),
])
def test_real_size_counts_match_family_facts(name, sana, connector, projector, queries):
    """`reca info`'s numbers, built on the meta device (nothing allocated)."""
    from reca.engine.bench.info import describe

    info = describe(preset(name))
    parts, modules = info["parts"], info["modules"]
    assert round(parts["transformer (SANA)"] / 1e6, 1) == sana
    assert round(parts["connector"] / 1e6, 1) == connector
    assert round(parts["projector"] / 1e6, 2) == projector
    assert round(parts["meta_queries"] / 1e6, 2) == queries
    assert not modules["lmm"]["trainable"] and not modules["vae"]["trainable"]
    assert modules["transformer"]["trainable"] and modules["connector"]["trainable"]
    assert info["trainable"] == sum(parts[k] for k in ("meta_queries", "connector", "projector", "transformer (SANA)"))
    assert info["shapes"]["understanding view"].endswith("256 visual tokens")


def test_blocks_for_compile_and_checkpointing(tiny):
    from reca.engine.compile import find_blocks

    model = tiny[0]
    names = {n.rsplit(".", 1)[0] for n, _ in find_blocks(model)}
    assert names == {"lmm.vision_tower.encoder.layer", "lmm.language_model.layers", "connector.layers",
                     "transformer.transformer_blocks"}
